"""Every setting of LLM Bench Shower, defined once and read from the environment here.

Each setting is one field of `Settings` made with `setting(...)`: the environment
variable, its default, the parser that validates it, the values it accepts (for
error messages) and its help. The loader (`load_settings`), the dataclass defaults
and the settings table of docs/settings.md (`lbs config --markdown`, checked by
tests/test_config.py) all come from those fields, so a setting is spelled once.

Values come from, in increasing priority: the defaults, a `.env` file in the
working directory (or the file named by `LBS_ENV_FILE`), the process environment,
and finally the `overrides` passed to `load_settings` (tests). A bad value raises
`ConfigError`, whose message names the variable and the values it accepts;
`lbs serve` prints it and exits.

The parsers live in backend/common/setting_parsers.py, byte amounts and their one
unit in backend/common/units.py, and the table as people read it (docs/settings.md,
`lbs config`) in backend/common/settings_table.py.

This module is the only place that touches `os.environ` (`apply_allocator_settings`
and `select_cuda_device` write it in a worker before torch starts).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from backend.common import setting_parsers as parse


class ConfigError(ValueError):
    """A setting has a value the product cannot use."""


def _cache_path(raw: str) -> Path | None:
    """Empty: the user's cache folder ($XDG_CACHE_HOME or ~/.cache)/llm-bench-shower;
    `off`: no cache."""
    text = raw.strip()
    if text.lower() == "off":
        return None
    if text:
        return parse.path(text)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return parse.path(base) / "llm-bench-shower"


def _hf_datasets_cache() -> Path:
    if os.environ.get("HF_DATASETS_CACHE", "").strip():
        return parse.path(os.environ["HF_DATASETS_CACHE"])
    home = os.environ.get("HF_HOME", "").strip() or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache"),
        "huggingface")
    return parse.path(home) / "datasets"



@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (as text), parser and documentation.

    `accepted` is what a bad value's error message offers; `help` is the table's
    meaning (Markdown); `default_means` says what the default stands for where the
    text alone does not ('= 80% of RAM'). `seed_name`: the variable keeps the name
    the product brief gave it, without the LBS_ prefix, so the brief's `.env` lines
    work as written. `attr` is the `Settings` field it fills.
    """

    name: str
    default: str
    parse: Callable[[str], Any]
    accepted: str
    help: str
    default_means: str = ""
    seed_name: bool = False
    attr: str = ""


def setting(name: str, default: str, parse: Callable[[str], Any], accepted: str, help: str,
            *, default_means: str = "", seed_name: bool = False, secret: bool = False) -> Any:
    """A `Settings` field read from the variable `name`; its default is `parse(default)`.
    `secret` keeps the value out of the repr (and so out of logs)."""
    spec = Setting(name, default, parse, accepted, help, default_means, seed_name)
    return field(default=parse(default), repr=not secret, metadata={"setting": spec})


@dataclass(frozen=True)
class Settings:
    """Every setting, parsed. Build with `load_settings()`; never read os.environ elsewhere.

    The fields made with `setting(...)` are the settings table: their order is the
    table's in docs/settings.md. A few fields below them are derived or read from
    other tools' variables.
    """

    # -- where things live, and who may reach the server
    data_dir: Path = setting(
        "LBS_DATA_DIR", "./data", parse.path, "a folder path",
        "Folder for the SQLite database, the built-in model and logs.")
    cache_dir: Path | None = setting(
        "LBS_CACHE_DIR", "", _cache_path, "a folder path, `off`, or empty",
        "Folder for caches shared by every server and worker of this user (lm-eval's task "
        "index, read in under a second instead of built in ~15 s); empty means "
        "`$XDG_CACHE_HOME/llm-bench-shower` (`~/.cache/llm-bench-shower`); `off` keeps "
        "no cache.", default_means="`~/.cache/llm-bench-shower`")
    database_url: str = setting(
        "LBS_DATABASE_URL", "", parse.text, "a SQLAlchemy URL, or empty",
        "SQLAlchemy database URL; empty means the SQLite file `<data dir>/lbs.sqlite3`. "
        "`postgresql+psycopg://user:password@host:5432/dbname` shares one queue between the "
        "server and workers on several machines (see [Several workers and machines]"
        "(operations.md#several-workers-and-machines)).", secret=True)
    host: str = setting(
        "LBS_HOST", "127.0.0.1", parse.text, "an IP address or host name",
        "Address the HTTP server binds.")
    port: int = setting(
        "LBS_PORT", "8080", parse.port, "an integer from 0 to 65535",
        "Port the HTTP server listens on.")
    server_url: str = setting(
        "LBS_SERVER_URL", "", parse.server_url, "a URL (empty = http://127.0.0.1:<LBS_PORT>)",
        "Where clients of a running server reach it: the MCP server "
        "(`lbs mcp`) and `clear_gpu_memory.py`.",
        default_means="`http://127.0.0.1:<LBS_PORT>`")
    api_token: str = setting(
        "LBS_API_TOKEN", "", parse.text, "any secret text (empty = no token)",
        "When set, every endpoint except `/healthz` and the page itself needs "
        "`Authorization: Bearer <token>` (the page asks for it once and keeps it in the "
        "browser). The server refuses to bind a non-loopback `LBS_HOST` without it.",
        secret=True)
    openai_base_url: str = setting(
        "LBS_OPENAI_BASE_URL", "", parse.url, "an http:// or https:// URL, or empty",
        "Default base URL (e.g. `http://127.0.0.1:8000/v1`) for `openai:<name>` models; a "
        "job's `api.base_url` wins.")
    openai_api_key: str = setting(
        "LBS_OPENAI_API_KEY", "", parse.text, "any secret text (empty = no key)",
        "API key for `LBS_OPENAI_BASE_URL` (sent as a bearer token, never logged), and only "
        "there: a job that names another `base_url` sends its own `api.api_key` or none.",
        secret=True)
    openai_allowed_hosts: tuple[str, ...] = setting(
        "LBS_OPENAI_ALLOWED_HOSTS", "", parse.hosts,
        "host names or IP addresses separated by ',' (host:port for one port; '*' = any)",
        "Hosts (`host` or `host:port`, comma-separated; `*` = any) a job's `api.base_url` "
        "may name besides `LBS_OPENAI_BASE_URL`'s host and port; loopback addresses are "
        "allowed too while no `LBS_API_TOKEN` is set. See [What the server promises]"
        "(security.md#what-the-server-promises).")
    allowed_hosts: tuple[str, ...] = setting(
        "LBS_ALLOWED_HOSTS", "", parse.hosts, "host names or IP addresses separated by ','",
        "Names the server answers to in the `Host` header besides its bind address and "
        "`localhost`, `127.0.0.1`, `[::1]` (e.g. the machine's DNS name when serving on "
        "`0.0.0.0` behind a token); other names get 400 (DNS rebinding).")
    secret_key: str = setting(
        "LBS_SECRET_KEY", "", parse.text, "any secret text (empty = <data dir>/secret.key)",
        "Encrypts the API keys jobs carry while stored; empty = a random key in "
        "`<data dir>/secret.key` (mode 0600). Give the server and remote workers the same "
        "value.", secret=True)
    cors_origins: tuple[str, ...] = setting(
        "LBS_CORS_ORIGINS", "", parse.comma_list, "origins separated by ','",
        "Origins (comma-separated) allowed to call the API from a browser; none by default.")

    # -- workers and models
    workers: int | None = setting(
        "LBS_WORKERS", "auto", parse.workers,
        "'auto' or an integer of at least 0, or GPU groups such as '0,1;2;3'",
        "Worker processes started by the server: `auto` = one per visible GPU (each pinned "
        "with `CUDA_VISIBLE_DEVICES`), or one on CPU when there is none; `0` starts none; "
        "GPU groups such as `0,1;2;3` start one worker per group (here one holding GPUs 0 "
        "and 1, for jobs with `num_gpus: 2`, and one each on GPUs 2 and 3).")
    gpu_memory_limit: float = setting(
        "LBS_GPU_MEMORY_LIMIT", "0.0", parse.fraction, "a number from 0.0 (no limit) to 1.0",
        "Fraction of each GPU's memory a worker process may use; 0.0 = no limit. See "
        "[What the GPU memory limit caps](gpus-and-memory.md#what-the-gpu-memory-limit-caps).")
    enable_memory_management: bool = setting(
        "LBS_ENABLE_MEMORY_MANAGEMENT", "1", parse.boolean, parse.BOOL_ACCEPTED,
        "Set `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` in workers before CUDA "
        "starts (a value you set yourself wins).")
    torch_dtype: str = setting(
        "LBS_TORCH_DTYPE", "auto", parse.dtype, "auto, float16, bfloat16, float32",
        "dtype models are loaded in: `auto` (the checkpoint's on GPU, float32 on CPU), "
        "`float16`, `bfloat16` or `float32`.")
    use_model_cache: bool = setting(
        "LBS_USE_MODEL_CACHE", "1", parse.boolean, parse.BOOL_ACCEPTED,
        "Keep models of cached datasets loaded between jobs; `0` makes every job uncached.")
    trust_remote_code: bool = setting(
        "LBS_TRUST_REMOTE_CODE", "0", parse.boolean, parse.BOOL_ACCEPTED,
        "Allow models that ship their own Python code (`trust_remote_code`).")
    allow_download: bool = setting(
        "LBS_ALLOW_DOWNLOAD", "0", parse.boolean, parse.BOOL_ACCEPTED,
        "Allow downloading hub models that are not in the local cache (the job shows a "
        "`downloading model` phase until the model has loaded).")
    allow_data_download: bool = setting(
        "LBS_ALLOW_DATA_DOWNLOAD", "0", parse.boolean, parse.BOOL_ACCEPTED,
        "Allow jobs to fetch a dataset's official data from the Hugging Face hub when it is "
        "neither in `LBS_DATASETS_DIR` nor in the hub cache (the first job shows a "
        "`fetching data` phase with bytes; later jobs read the cache), and show the page's "
        "Fetch button. Separate from `LBS_ALLOW_DOWNLOAD` (models). "
        "`lbs data fetch` works either way. `HF_ENDPOINT`, "
        "`HF_HOME`/`HF_HUB_CACHE` and `HF_TOKEN` apply as in huggingface_hub; with "
        "`HF_HUB_OFFLINE=1` or `HF_DATASETS_OFFLINE=1` data is read from the cache only.")

    # -- the queue
    lease_seconds: float = setting(
        "LBS_LEASE_SECONDS", "60", parse.positive_float, "a number of seconds greater than 0",
        "A running job whose worker has not renewed its lease for this long is re-queued "
        "and resumes after its last stored sample.")
    job_timeout: float = setting(
        "LBS_JOB_TIMEOUT", "0", parse.non_negative_float, "a number of seconds (0 = none)",
        "A job running longer than this many seconds fails with the reason, keeping the "
        "samples it finished; a job's own `timeout_s` (in the submit body) overrides it. "
        "Measured per attempt, checked between samples.", default_means="none")
    max_attempts: int = setting(
        "LBS_MAX_ATTEMPTS", "3", parse.positive_int, "an integer of at least 1",
        "How many times a job may be started before it fails for good, with the reason.")
    max_queued_per_submitter: int = setting(
        "LBS_MAX_QUEUED_PER_SUBMITTER", "1000", parse.non_negative_int,
        "an integer of at least 0 (0 = no cap)",
        "Most jobs one submitter (the job's `submitter`, `anonymous` when it names none) may "
        "have waiting at once, each shard of a data-parallel job counted; a submission that "
        "would pass it is refused whole with 429 naming `submitter`.", default_means="no cap")
    poll_interval: float = setting(
        "LBS_POLL_INTERVAL", "0.5", parse.positive_float, "a number of seconds greater than 0",
        "Seconds an idle worker waits before looking at the queue again (SQLite; on "
        "PostgreSQL see `LBS_LISTEN_TIMEOUT`).")
    listen_timeout: float = setting(
        "LBS_LISTEN_TIMEOUT", "10", parse.positive_float, "a number of seconds greater than 0",
        "PostgreSQL only: an idle worker sleeps on `LISTEN` until a submit or re-queue "
        "sends `NOTIFY`, and at most this many seconds before looking at the queue anyway "
        "(expired leases and jobs waiting for memory are found by looking).")
    worker_labels: tuple[str, ...] = setting(
        "LBS_WORKER_LABELS", "", parse.labels, "labels separated by ',' (letters, digits, _.:@-)",
        "Labels (comma-separated) of the workers started with this setting; a job with "
        "`worker_label` runs only on a worker that has it. Every worker also has its host "
        "name and its id as labels.")
    cluster_from_api: bool = setting(
        "LBS_CLUSTER_FROM_API", "0", parse.boolean, parse.BOOL_ACCEPTED,
        "Let `POST /api/cluster` (and the Workers view's form) start controllers that place "
        "workers with Ray or Slurm, as child processes of the server; off, the API only "
        "shows the controllers' decisions and pools are started with `lbs cluster`.")
    simulated_gpu_memory: tuple[int, ...] = setting(
        "LBS_SIMULATED_GPU_MEMORY", "", parse.sizes, "sizes separated by ',' such as 24GB,24GB",
        "**For testing only.** Sizes (comma-separated, e.g. `24GB,24GB`) of pretend GPUs: "
        "workers report them (all free) and use them for `num_gpus` and memory admission, "
        "so scheduling can be tried on a machine without GPUs. Jobs still run on the CPU.")

    # -- datasets, models and plugins on disk
    datasets_dir: Path | None = setting(
        "LBS_DATASETS_DIR", "", parse.optional_path, "a folder path (empty = <data dir>/datasets)",
        "Where dataset files are looked for: `<folder>/<dataset name>/` in the official "
        "layout, unless a job gives `data_dir`. A job's `data_dir` or haystack file must lie "
        "under it (relative paths are taken from it).",
        default_means="`<data dir>/datasets`")
    max_context_length: int = setting(
        "LBS_MAX_CONTEXT_LENGTH", "131072", parse.positive_int, "an integer of at least 1",
        "Longest context (tokens) a job may ask for on this server, whatever the model "
        "says it takes (a remote `openai:` model's `api.max_length` included): "
        "Needle-in-a-Haystack `context_lengths`, LongBench `max_length`. Above it the job "
        "is refused with 422 naming the field; a LongBench job that names no `max_length` "
        "gets this as its prompt budget when the model takes more (shown in the job's "
        "params). The model's own maximum (from its `config.json`) is always checked too. "
        "Raise it knowingly: building a Needle-in-a-Haystack prompt takes about 1 KB of "
        "RAM per token, counted before a job runs.")
    max_haystack_bytes: int = setting(
        "LBS_MAX_HAYSTACK_BYTES", "32MiB", parse.size, "a size such as 32MiB",
        "Largest haystack file a Needle-in-a-Haystack job may name. Submission and "
        "estimates only check its size and read its first 64 KiB; the worker reads it "
        "whole (two files kept at most). A larger file is refused with 422 on "
        "`params.haystack`.")
    max_grid_cells: int = setting(
        "LBS_MAX_GRID_CELLS", "2500", parse.positive_int, "an integer of at least 1",
        "Most (context length × depth) cells a Needle-in-a-Haystack job may ask for; more "
        "is refused with 422 on `params.context_lengths`.")
    model_dirs: tuple[str, ...] = setting(
        "LBS_MODEL_DIRS", "", parse.path_list, "folder paths separated by ':'",
        "Folders (separated by `:`) scanned two levels deep for Hugging Face checkpoints "
        "(folders with a `config.json`), offered on the web page and listed by "
        "`GET /api/models`. A model folder named in a job must lie under one of them (a "
        "relative name is looked up in them); while it is empty, jobs may name only "
        "built-in models and cached hub ids.")
    lm_eval_include_path: tuple[str, ...] = setting(
        "LBS_LM_EVAL_INCLUDE_PATH", "", parse.path_list, "folder paths separated by ':'",
        "Folders (separated by `:`) of local lm-evaluation-harness task YAMLs the `lm_eval` "
        "dataset offers beside lm-eval's own tasks (`lm_eval --include_path`).")
    plugin_dirs: tuple[str, ...] = setting(
        "LBS_PLUGIN_DIRS", "", parse.path_list, "folder paths separated by ':'",
        "Folders (separated by `:`) whose `*.py` modules are imported at start to register "
        "dataset and runner plugins (see `docs/adding-a-dataset.md`, "
        "`docs/adding-a-runner.md`).")

    # -- the model manager. The four names without LBS_ are the product brief's own
    # (its .env example lists MAX_MEMORY_USAGE, MEMORY_CHECK_INTERVAL,
    # AUTO_CLEANUP_ENABLED and GPU_IDLE_TIMEOUT), kept so its lines work as written.
    max_memory_usage: int = setting(
        "MAX_MEMORY_USAGE", "0", parse.size,
        "a number of bytes or a size such as 8GB (0 = 80% of RAM)",
        "Bytes (or a size such as `8GB`) of model memory (RAM and GPU copies) each worker's "
        "model manager may hold; least recently used unpinned models are released to stay "
        "under it, and a model that cannot fit is refused with the sizes.",
        default_means="80% of RAM", seed_name=True)
    memory_check_interval: float = setting(
        "MEMORY_CHECK_INTERVAL", "60", parse.positive_float, "a number of seconds greater than 0",
        "Seconds between the model manager's memory pressure checks.", seed_name=True)
    auto_cleanup_enabled: bool = setting(
        "AUTO_CLEANUP_ENABLED", "true", parse.boolean, parse.BOOL_ACCEPTED,
        "When a check finds pressure, unload least recently used unpinned models until it "
        "is gone.", seed_name=True)
    gpu_idle_timeout: float = setting(
        "GPU_IDLE_TIMEOUT", "600", parse.positive_float, "a number of seconds greater than 0",
        "A model idle on the GPU this long is offloaded to CPU RAM; changeable at run time "
        "with `POST /api/gpu/timeout`.", seed_name=True)
    release_timeout: float = setting(
        "LBS_RELEASE_TIMEOUT", "3600", parse.positive_float, "a number of seconds greater than 0",
        "A model idle in CPU RAM this long is released (pinned models never are).")
    pressure_ratio: float = setting(
        "LBS_PRESSURE_RATIO", "0.8", parse.fraction, "a number from 0.0 to 1.0",
        "Memory pressure when managed memory passes this share of `MAX_MEMORY_USAGE`…")
    min_available_gb: float = setting(
        "LBS_MIN_AVAILABLE_GB", "2.0", parse.non_negative_float,
        "a number of GB (2**30 bytes) of at least 0",
        "…or when the system's available RAM falls under this many GB.")
    pinned_memory_budget: int = setting(
        "LBS_PINNED_MEMORY_BUDGET", "0", parse.size,
        "a number of bytes or a size such as 8GB (0 = 25% of RAM)",
        "Bytes (or a size such as `8GB`) of pinned host memory offloaded models may keep, "
        "so that a restore is one fast host-to-device copy. Counted as torch's host "
        "allocator takes it: each weight's block rounded up to a power of two (a 22 MiB "
        "weight takes 32 MiB). A copy that does not fit, or whose pinning fails, is kept "
        "in pageable memory instead.", default_means="25% of RAM")
    affinity_seconds: float = setting(
        "LBS_AFFINITY_SECONDS", "300", parse.non_negative_float,
        "a number of seconds of at least 0",
        "A worker takes a queued job for the model it already holds before older jobs, if "
        "it is at most this much younger than the oldest queued job (0 = strict queue "
        "order).")
    log_level: str = setting(
        "LBS_LOG_LEVEL", "INFO", parse.log_level, "DEBUG, INFO, WARNING, ERROR",
        "Logging level of the server and workers.")

    # -- derived from the settings above, or read from other tools' variables
    worker_gpu_groups: tuple[str, ...] = ()
    """LBS_WORKERS as GPU groups ('0,1', '2'), one per worker; empty for 'auto' or a count."""
    cuda_visible_devices: str | None = None
    """CUDA_VISIBLE_DEVICES as the process found it (read here, like every setting)."""
    hub_offline: bool = False
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: dataset data is read from the cache only
    (huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT itself as well)."""
    hf_datasets_cache: Path | None = None
    """The `datasets` library's cache folder, as it computes it: HF_DATASETS_CACHE, else
    HF_HOME/datasets, else $XDG_CACHE_HOME (~/.cache)/huggingface/datasets."""
    raw: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    """Each setting's text as read, handed on to child processes."""

    def __post_init__(self) -> None:
        """Fill the defaults that depend on other settings. Idempotent, so that
        `dataclasses.replace` keeps them."""
        put = object.__setattr__
        if isinstance(self.workers, tuple):  # LBS_WORKERS gave GPU groups
            put(self, "worker_gpu_groups", self.workers)
            put(self, "workers", len(self.workers))
        if not self.database_url:
            put(self, "database_url", f"sqlite:///{self.data_dir / 'lbs.sqlite3'}")
        if not self.server_url:
            put(self, "server_url", f"http://127.0.0.1:{self.port}")
        if self.datasets_dir is None:
            put(self, "datasets_dir", self.data_dir / "datasets")
        if self.hf_datasets_cache is None:
            put(self, "hf_datasets_cache", _hf_datasets_cache())

    def child_env(self) -> dict[str, str]:
        """The whole environment of a child process of ours: this one's (PATH, HF_*…)
        with the settings on top."""
        return {**os.environ, **self.raw}


SETTINGS: tuple[Setting, ...] = tuple(
    _replace(f.metadata["setting"], attr=f.name) for f in fields(Settings)
    if "setting" in f.metadata)
"""The settings table, in the order of docs/settings.md."""

_BY_NAME = {s.name: s for s in SETTINGS}


def environment_with(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment with `extra` on top, for a child process."""
    return {**os.environ, **extra}


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Read every setting; raise ConfigError naming the first bad variable."""
    unknown = set(overrides or ()) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    env_file = os.environ.get("LBS_ENV_FILE", ".env")
    file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None} \
        if Path(env_file).is_file() else {}
    raw: dict[str, str] = {}
    values: dict[str, Any] = {}
    for spec in SETTINGS:
        text = os.environ.get(spec.name, file_values.get(spec.name, spec.default))
        if overrides and spec.name in overrides:
            text = str(overrides[spec.name])
        raw[spec.name] = text
        try:
            values[spec.attr] = spec.parse(text)
        except ValueError:
            raise ConfigError(f"{spec.name}={text!r} is not valid; "
                              f"accepted values: {spec.accepted}") from None
    return Settings(
        **values,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        hub_offline=any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
                        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
        raw=raw)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve on a non-loopback address without LBS_API_TOKEN."""
    if not is_loopback(settings.host) and not settings.api_token:
        raise ConfigError(f"LBS_HOST={settings.host!r} is reachable from other machines; "
                          "set LBS_API_TOKEN to serve there (or bind 127.0.0.1)")


def load_settings_or_report(overrides: dict[str, Any] | None = None) -> Settings | None:
    """Settings for a command's main() (`overrides` from its flags, as in load_settings);
    None after printing the error for a bad value."""
    try:
        return load_settings(overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return None


def apply_allocator_settings(settings: Settings) -> str | None:
    """Set PYTORCH_CUDA_ALLOC_CONF and CUDA_DEVICE_ORDER before torch initialises CUDA.

    Call it in a worker before the first `import torch`. CUDA_DEVICE_ORDER becomes
    PCI_BUS_ID, the order of NVML and nvidia-smi, so that the GPU indices read with
    NVML (the free-GPU choice, LBS_WORKERS, --gpus) name the same GPUs in
    CUDA_VISIBLE_DEVICES; CUDA's default order puts the fastest GPU first. With
    LBS_ENABLE_MEMORY_MANAGEMENT=1 it sets `expandable_segments:True`, unless the
    user already set PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF (their value
    wins). Returns the value in force, or None.
    """
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if os.environ.get(name):
            return os.environ[name]
    if not settings.enable_memory_management:
        return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return os.environ["PYTORCH_CUDA_ALLOC_CONF"]


def select_cuda_device(index: str) -> None:
    """Pin this process to GPUs by NVML index (CUDA_VISIBLE_DEVICES, in the PCI bus
    order NVML uses), before torch starts CUDA."""
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = index

