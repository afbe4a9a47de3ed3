"""Where weights go and what the GPU memory limit caps, proven without a GPU: the
loader's from_pretrained arguments under a torch.cuda stand-in (tests/fake_cuda.py), and
the device maps transformers computes from them for pretend GPUs, on models built on
the meta device (accelerate's init_empty_weights)."""

from __future__ import annotations

import pytest
import torch

from backend.engine.contracts import GenerationRequest
from backend.runners.hf.loading import LoadOptions
from backend.runners.hf.placement import cap_process_memory, load_placement
from backend.runners.hf.runner import HFRunner
from backend.runners.models import resolve_model
from tests.fake_cuda import FakeCuda, install

GiB = 1024**3


@pytest.fixture(autouse=True)
def _no_cap_yet(monkeypatch):
    """Each test starts in a process whose allocator nothing has capped."""
    from backend.runners.hf import placement

    monkeypatch.setattr(placement, "_capped", {})


class _Stop(Exception):
    """Ends a load after from_pretrained's arguments were seen (no GPU to load onto)."""


@pytest.fixture
def from_pretrained(monkeypatch):
    """Records every AutoModelForCausalLM.from_pretrained call; `real` lets it load."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__

    class Spy:
        calls: list[dict] = []
        real = False
        order: list | None = None

        @classmethod
        def load(cls, auto, source, **kwargs):
            cls.calls.append(kwargs)
            if cls.order is not None:
                cls.order.append(("from_pretrained",))
            if not cls.real:
                raise _Stop
            return original(auto, source, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(Spy.load))
    Spy.calls = []
    return Spy


def _load(settings, limit=0.0, num_gpus=1, headroom=0):
    spec = resolve_model("builtin:tiny", settings)
    options = LoadOptions("auto", False, limit, "default", num_gpus)
    return HFRunner.load(spec, options, settings, headroom_bytes=headroom)


def test_without_a_limit_the_model_loads_straight_onto_the_gpu(settings, with_tiny,
                                                                 monkeypatch, from_pretrained):
    """Not into RAM then .to("cuda:0") (twice the traffic, a RAM peak the model's size):
    a device map of the worker's GPU makes transformers load each tensor there."""
    fake = install(monkeypatch, FakeCuda([24 * GiB]))
    with pytest.raises(_Stop):
        _load(settings)
    (kwargs,) = from_pretrained.calls
    assert kwargs["device_map"] == {"": "cuda:0"}
    assert "max_memory" not in kwargs
    assert not fake.fractions, "no limit: the allocator is not capped"


def test_on_the_cpu_the_same_path_gives_the_same_model(settings, with_tiny, from_pretrained):
    from transformers import AutoModelForCausalLM

    from backend.runners.hf.loading import model_source

    from_pretrained.real = True
    runner = _load(settings)
    (kwargs,) = from_pretrained.calls
    assert kwargs["device_map"] == {"": "cpu"}
    assert {str(p.device) for p in runner.model.parameters()} == {"cpu"}
    assert runner.device == "cpu" and runner.movable()
    reference = AutoModelForCausalLM.from_pretrained(
        model_source(runner.spec, settings), dtype=torch.float32).eval()
    for (name, a), (_, b) in zip(runner.model.state_dict().items(),
                                 reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    prompt = runner.render("Where is the library?")
    assert runner.generate([GenerationRequest(prompt, 6)])[0].output_tokens == 6


def test_the_limit_caps_the_process_and_leaves_headroom(settings, with_tiny, monkeypatch,
                                                        from_pretrained):
    """LBS_GPU_MEMORY_LIMIT=0.5 on a worker holding two 80 GiB GPUs: the allocator of
    each is capped at half (torch.cuda.set_per_process_memory_fraction, before loading),
    and the weights of a one-GPU job are placed under half of GPU 0 less the job's
    KV/activation estimate."""
    fake = install(monkeypatch, FakeCuda([80 * GiB, 80 * GiB]))
    from_pretrained.order = fake.calls
    with pytest.raises(_Stop):
        _load(settings, limit=0.5, headroom=3 * GiB)
    (kwargs,) = from_pretrained.calls
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"][0] == 40 * GiB - 3 * GiB
    assert set(kwargs["max_memory"]) == {0, "cpu"}
    sets = [c for c in fake.calls if c[0] == "set_per_process_memory_fraction"]
    assert sets == [("set_per_process_memory_fraction", 0.5, 0),
                    ("set_per_process_memory_fraction", 0.5, 1)]
    assert fake.calls.index(("from_pretrained",)) > fake.calls.index(sets[-1])


def test_cap_process_memory_without_a_limit_or_gpu(monkeypatch):
    if not torch.cuda.is_available():
        assert cap_process_memory(0.5) == []  # no GPU here: nothing to cap
    fake = install(monkeypatch, FakeCuda([24 * GiB, 24 * GiB]))
    assert cap_process_memory(0.0) == []  # no limit, nothing capped before
    assert cap_process_memory(0.25) == [(0, 0.25), (1, 0.25)]
    assert fake.fractions == {0: 0.25, 1: 0.25}
    assert cap_process_memory(0.0) == [(0, 1.0), (1, 1.0)]  # the limit is lifted
    assert fake.fractions == {0: 1.0, 1: 1.0}


# --- device maps for pretend GPUs -------------------------------------------------------

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                max_position_embeddings=131072, tie_word_embeddings=False)
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64)


def _meta_model(shape: dict):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)


def _device_map(model, placement: dict) -> dict:
    """The device map from_pretrained computes from the loader's arguments
    (transformers/integrations/accelerate.py _get_device_map, as modeling_utils calls it)."""
    from transformers.integrations.accelerate import _get_device_map

    if placement["device_map"] != "auto":
        return placement["device_map"]
    return _get_device_map(model, "auto", dict(placement["max_memory"]), None)


def _size(model) -> int:
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(model)[""]  # parameters and buffers


def _per_device(model, device_map: dict) -> dict:
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    totals: dict = {}
    for name, device in device_map.items():
        totals[device] = totals.get(device, 0) + sizes[name]
    return totals


def test_one_24_gib_card_at_half_spills_what_does_not_fit():
    model = _meta_model(LLAMA_8B)  # ~15 GiB of bfloat16 weights
    size = _size(model)
    headroom = 2 * GiB  # e.g. an 8k-token job's KV cache and activations
    placement = load_placement(0.5, num_gpus=1, headroom_bytes=headroom, totals=[24 * GiB],
                               cpu_bytes=64 * GiB)
    on = _per_device(model, _device_map(model, placement))
    assert set(on) == {0, "cpu"}
    assert on[0] <= 12 * GiB - headroom  # the cap less the job's room
    assert on[0] > 12 * GiB - headroom - 2 * GiB  # filled up to it (a layer is ~0.4 GiB)
    assert on[0] + on["cpu"] == size


def test_two_80_gib_cards_hold_an_8b_model_without_spilling():
    model = _meta_model(LLAMA_8B)
    size = _size(model)
    headroom = 20 * GiB  # a 128k-token job: 16 GiB of KV cache plus activations
    placement = load_placement(0.0, num_gpus=2, headroom_bytes=headroom,
                               totals=[80 * GiB, 80 * GiB], cpu_bytes=64 * GiB)
    assert placement["max_memory"] == {0: 60 * GiB, 1: 60 * GiB, "cpu": 64 * GiB}
    on = _per_device(model, _device_map(model, placement))
    assert set(on) == {0, 1}, "spread over both GPUs, nothing on the CPU"
    assert on[0] + on[1] == size
    assert all(on[i] <= 80 * GiB - headroom for i in (0, 1))


def test_a_70b_model_under_the_limit_spills_and_keeps_the_headroom():
    model = _meta_model(LLAMA_70B)  # ~131 GiB of bfloat16 weights
    size = _size(model)
    headroom = 6 * GiB
    placement = load_placement(0.5, num_gpus=2, headroom_bytes=headroom,
                               totals=[80 * GiB, 80 * GiB], cpu_bytes=256 * GiB)
    on = _per_device(model, _device_map(model, placement))
    assert on.get("cpu", 0) > size - 2 * (40 * GiB - headroom)
    assert all(on[i] <= 40 * GiB - headroom for i in (0, 1))
    assert sum(on.values()) == size


def test_the_loader_passes_the_jobs_estimate_as_headroom(settings, with_tiny):
    """The loader keeps free what admission counted beyond the weights, split by where
    it lands (the KV cache with the layers), and says how large the weights are."""
    from backend.engine.evaluation import _loader
    from backend.engine.preparation import prepare
    from backend.runners import builtin
    from backend.runners.hf.account import estimate_job_bytes
    from backend.runners.models import estimate_model_bytes

    job = prepare("builtin:tiny", "needle_in_haystack", {"context_lengths": [4096]}, settings)
    _, load, weights = _loader(job, settings, None)
    expected = estimate_job_bytes(job.spec, job.dataset, job.params, job.info.max_length,
                                  settings) - \
        estimate_model_bytes(job.spec, settings.torch_dtype)
    headroom = load.keywords["headroom_bytes"]
    assert expected > 0 and headroom.total == expected
    tiny = builtin.BUILTIN_MODELS["tiny"]
    head_dim = tiny.hidden_size // tiny.num_attention_heads
    (plan,) = job.dataset.worst_batches(job.params, job.info.max_length)
    one_row = 2 * tiny.num_hidden_layers * tiny.num_key_value_heads * head_dim * \
        (plan.prompt_tokens + plan.new_tokens) * 4  # float32
    # the kept prefix and the rows continuing it (NIAH's depths decode together by
    # default): the KV cache follows the layers
    assert plan.rows > 1
    assert plan.rows * one_row <= headroom.layers <= (plan.rows + 2) * one_row
    assert headroom.each > 0  # one layer's activations (the logits are gone by the peak)
    assert weights == estimate_model_bytes(job.spec, settings.torch_dtype)
    # the KV cache follows the decoder layers' weights: the embeddings and head apart
    assert headroom.layer_weights == weights - 2 * tiny.vocab_size * tiny.hidden_size * 4


# --- a sharded job's headroom, split by what each GPU holds ------------------------------

H100 = 85_032_601_600  # torch.cuda.get_device_properties(0).total_memory, H100 SXM 80GB


def _job_70b(model, tokens: int) -> dict:
    """What a batch-1 generation of `tokens` tokens holds beyond a Llama-3.1-70B's bf16
    weights: the KV cache of its 80 layers, one layer's activations, one row of logits;
    and the weights of those layers."""
    from accelerate.utils import compute_module_sizes

    kv = 2 * 80 * 8 * 128 * 2 * tokens
    activations = (4 * 8192 + 2 * 28672) * 2 * tokens
    return dict(layers=kv, each=activations, last=128256 * 4,
                layer_weights=compute_module_sizes(model)["model.layers"])


def _kv_on(model, device_map: dict, kv: int) -> dict:
    """The KV cache each device holds: that of the decoder layers placed on it."""
    layers = len(model.model.layers)
    held: dict = {}
    for name, device in device_map.items():
        if name.startswith("model.layers."):
            held[device] = held.get(device, 0) + kv // layers
    return held


def test_a_70b_32k_job_on_two_80_gib_gpus_keeps_every_layer_on_a_gpu():
    """Each GPU holds only its layers' share of the KV cache, so each keeps only that
    share free (plus the activations, and on the last one the logits): the job that
    admission found to fit (146.9 GiB <= 2 x 79.19 GiB) loads without spilling."""
    from backend.runners.hf.placement import Headroom

    model = _meta_model(LLAMA_70B)
    job = _job_70b(model, 32768 + 48)
    placement = load_placement(0.0, num_gpus=2, headroom_bytes=Headroom(**job),
                               totals=[H100, H100], cpu_bytes=512 * GiB)
    device_map = _device_map(model, placement)
    on = _per_device(model, device_map)
    assert set(on) == {0, 1}, f"nothing on the CPU: {on}"
    kv = _kv_on(model, device_map, job["layers"])
    assert on[0] + kv[0] + job["each"] <= H100
    assert on[1] + kv[1] + job["each"] + job["last"] <= H100


def test_a_70b_job_that_does_not_fit_two_gpus_still_spills_and_gpu_0_keeps_its_kv():
    """At 128k the job does not fit two 80 GiB GPUs: layers spill to the CPU, and the
    spilled layers run on GPU 0 (accelerate's offload hooks), so their KV cache lands
    there: GPU 0 keeps the whole KV cache free."""
    from backend.runners.hf.placement import Headroom

    model = _meta_model(LLAMA_70B)
    size = _size(model)
    job = _job_70b(model, 131072)
    placement = load_placement(0.0, num_gpus=2, headroom_bytes=Headroom(**job),
                               totals=[H100, H100], cpu_bytes=512 * GiB)
    on = _per_device(model, _device_map(model, placement))
    assert on.get("cpu", 0) > 0
    assert on[0] + job["layers"] + job["each"] <= H100
    assert sum(on.values()) == size


# --- restoring beside a running job ------------------------------------------------------

class FakeStreams:
    """torch.cuda's stream calls as torch 2.13 defines them (torch/cuda/streams.py,
    torch/cuda/__init__.py): `Stream(device)` makes a stream, `stream(s)` makes it the
    current stream inside a with-block and puts the previous one back after,
    `default_stream(device)` is the stream every thread's work goes to unless told
    otherwise, `Stream.synchronize()` waits on the host for the work queued on it,
    `Tensor.record_stream(s)` tells the allocator the tensor's memory is used on `s`.
    Every call is recorded with the stream current at that moment."""

    class Stream:
        def __init__(self, owner, name, device=None):
            self.owner, self.name, self.device = owner, name, device

        def synchronize(self):
            self.owner.calls.append(("synchronize", self.name))

    def __init__(self):
        self.calls: list[tuple] = []
        self.default = self.Stream(self, "default")
        self.current = self.default

    def install(self, monkeypatch):
        import contextlib

        import torch

        def new_stream(device=None, priority=0):
            self.calls.append(("Stream", str(device)))
            return self.Stream(self, "side", device)

        @contextlib.contextmanager
        def stream(s):
            previous, self.current = self.current, s
            try:
                yield s
            finally:
                self.current = previous

        to = torch.Tensor.to

        def copy(tensor, *args, **kwargs):
            self.calls.append(("copy", self.current.name))
            return to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.cuda, "Stream", new_stream)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: self.default)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "synchronize",
                            lambda device=None: self.calls.append(("device synchronize",)))
        monkeypatch.setattr(torch.Tensor, "to", copy)
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda t, s: self.calls.append(("record_stream", s.name)))
        return self


def _offloaded(settings, from_pretrained):
    """A tiny model as an offload leaves it: its weights on the host copy."""
    from_pretrained.real = True
    runner = _load(settings)
    runner._host = {name: t.detach().clone() for name, t in runner._tensors()}
    runner.device = "cpu"
    return runner


def test_a_background_restore_copies_on_a_side_stream(settings, with_tiny, monkeypatch,
                                                      from_pretrained):
    """A prefetch restores a model while another job's kernels run on the default
    stream: its copies go on a side stream (not queued behind those kernels), the
    prefetching thread waits for that stream only (not the whole device, which would
    wait for the running job too), and the new weights are marked as used by the
    default stream, where the next job reads them."""
    runner = _offloaded(settings, from_pretrained)
    streams = FakeStreams().install(monkeypatch)
    count = len(runner._host)
    moved = runner.restore("cpu", background=True)  # "cpu": no device here to copy to
    assert moved == runner.size_bytes() and runner.device == "cpu"
    assert streams.calls[0] == ("Stream", "cpu")
    assert streams.calls[1:count + 1] == [("copy", "side")] * count
    assert streams.calls[count + 1:] == [("synchronize", "side")] + \
        [("record_stream", "default")] * count
    for name, t in runner._tensors():
        assert torch.equal(t, runner._host[name])


def test_a_jobs_own_restore_copies_on_the_default_stream(settings, with_tiny, monkeypatch,
                                                         from_pretrained):
    runner = _offloaded(settings, from_pretrained)
    streams = FakeStreams().install(monkeypatch)
    count = len(runner._host)
    runner.restore("cpu")
    assert streams.calls == [("copy", "default")] * count + [("device synchronize",)]


def _checkpoint_70b(folder) -> None:
    """A Llama-3.1-70B-shaped checkpoint without weights: its config and a safetensors
    header saying every tensor's shape (what estimate_model_bytes reads)."""
    import json
    import struct

    config = dict(LLAMA_70B, architectures=["LlamaForCausalLM"], head_dim=128,
                  torch_dtype="bfloat16")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    h, i, v, kv = 8192, 28672, 128256, 8 * 128
    shapes = {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h],
              "model.norm.weight": [h]}
    for n in range(80):
        p = f"model.layers.{n}."
        shapes.update({p + "q": [h, h], p + "k": [kv, h], p + "v": [kv, h], p + "o": [h, h],
                       p + "g": [i, h], p + "u": [i, h], p + "d": [h, i], p + "n1": [h],
                       p + "n2": [h]})
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("gpus,context,limit", [
    (2, 32768, 0.0), (2, 65536, 0.0), (3, 65536, 0.0), (3, 131024, 0.0), (4, 131024, 0.0),
    (2, 8192, 0.9), (2, 16384, 0.9), (2, 32768, 0.95), (3, 65536, 0.8)])
def test_a_sharded_job_is_admitted_exactly_when_its_layers_all_fit_on_the_gpus(
        settings, tmp_path, gpus, context, limit):
    """Admission (the job's estimate against the sum of its GPUs, under the limit if
    one is set) and placement (the loader's headroom, through transformers' device map)
    agree for a 70B NIAH job on H100s: admitted, every layer lands on a GPU; refused,
    it would have spilled. Each GPU runs its layers in turn, so each keeps room for one
    layer's activations."""
    from backend.engine.preparation import prepare

    _checkpoint_70b(tmp_path / "llama-70b")
    job = prepare(str(tmp_path / "llama-70b"), "needle_in_haystack",
                  {"context_lengths": [context], "depth_percents": [50]}, settings,
                  confine=False, num_gpus=gpus)
    cap = int(H100 * limit) if limit else H100  # what a worker offers per GPU
    admitted = HFRunner.estimate_job_bytes(job, settings) <= gpus * cap
    headroom = HFRunner.loader(job, settings, None).keywords["headroom_bytes"]
    placement = load_placement(limit, num_gpus=gpus, headroom_bytes=headroom,
                               totals=[H100] * gpus, cpu_bytes=512 * GiB)
    model = _meta_model(LLAMA_70B)
    on = _per_device(model, _device_map(model, placement))
    assert admitted == ("cpu" not in on), (admitted, on)


def test_the_api_estimates_a_sharded_job_for_its_gpus(client):
    """What a submission stores as `memory_bytes` (admission's figure) counts every GPU
    the job will shard its model over: each keeps room for one layer's activations."""
    def estimate(num_gpus):
        res = client.post("/api/jobs/estimate", json={
            "model": "builtin:tiny", "dataset": "needle_in_haystack", "num_gpus": num_gpus,
            "params": {"context_lengths": [4096], "depth_percents": [50]}})
        assert res.status_code == 200, res.get_json()
        return res.get_json()["data"]["jobs"][0]["memory_bytes"]

    one, two = estimate(1), estimate(2)
    tiny_activations = 4096 * (4 * 64 + 2 * 176) * 4  # one layer's, float32
    assert two >= one + tiny_activations
