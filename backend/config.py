"""Every setting of LLM Bench Shower, read from the environment in one place.

Values come from, in increasing priority: the defaults below, a `.env` file in
the working directory (or the file named by `LBS_ENV_FILE`), the process
environment, and finally the `overrides` passed to `load_settings` (tests).
A bad value raises `ConfigError`, whose message names the variable and the
values it accepts; `python -m backend.server` prints it and exits.

This module and `apply_allocator_settings` are the only places that touch
`os.environ`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

DTYPES = ("auto", "float16", "bfloat16", "float32")


class ConfigError(ValueError):
    """A setting has a value the product cannot use."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError(raw)
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(raw)
    return value


def _dtype(raw: str) -> str:
    value = raw.strip().lower()
    if value not in DTYPES:
        raise ValueError(raw)
    return value


def _workers(raw: str) -> int | tuple[str, ...] | None:
    """None (auto), a count, or GPU groups: '0,1;2' = a worker on GPUs 0 and 1, one on 2."""
    value = raw.strip().lower()
    if value in ("", "auto"):
        return None
    if "," in value or ";" in value:
        groups = tuple(",".join(e.strip() for e in g.split(",")) for g in value.split(";"))
        if any(not re.fullmatch(r"\d+(,\d+)*", g) for g in groups):
            raise ValueError(raw)
        return groups
    count = int(value)
    if count < 0:
        raise ValueError(raw)
    return count


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(raw: str) -> int:
    """'24GB', '24GiB', '512MB' or a number of bytes -> bytes (ValueError otherwise)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", raw.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(raw)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _sizes(raw: str) -> tuple[int, ...]:
    sizes = tuple(parse_size(part) for part in raw.split(",") if part.strip())
    if any(size <= 0 for size in sizes):
        raise ValueError(raw)
    return sizes


def _labels(raw: str) -> tuple[str, ...]:
    labels = tuple(label.strip() for label in raw.split(",") if label.strip())
    if any(not re.fullmatch(r"[\w.:@-]{1,255}", label) for label in labels):
        raise ValueError(raw)
    return labels


def _url(raw: str) -> str:
    value = raw.strip()
    if value and not re.fullmatch(r"https?://\S+", value):
        raise ValueError(raw)
    return value.rstrip("/")


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _bytes(raw: str) -> int:
    value = int(float(raw))
    if value < 0:
        raise ValueError(raw)
    return value


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(raw)
    return value


def _text(raw: str) -> str:
    return raw.strip()


def _hosts(raw: str) -> tuple[str, ...]:
    hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    if any(not re.fullmatch(r"\*|\[[0-9a-f:.]+\](:\d+)?|[\w.-]+(:\d+)?|[0-9a-f:]+", h)
           for h in hosts):
        raise ValueError(raw)
    return hosts


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, default (as text), parser and help."""

    name: str
    default: str
    parse: Callable[[str], Any]
    accepted: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("LBS_DATA_DIR", "./data", _text, 'a folder path',
            "Folder for the SQLite database, the built-in model and logs."),
    Setting("LBS_DATABASE_URL", "", _text, 'a SQLAlchemy URL, or empty',
            "SQLAlchemy database URL; empty means the SQLite file <data dir>/lbs.sqlite3."),
    Setting("LBS_HOST", "127.0.0.1", _text, "an IP address or host name",
            "Address the HTTP server binds."),
    Setting("LBS_API_TOKEN", "", _text, "any secret text (empty = no token)",
            "When set, every endpoint except /healthz and the web page itself needs "
            "'Authorization: Bearer <token>'; required to bind a non-loopback address."),
    Setting("LBS_CORS_ORIGINS", "", _text, "origins separated by ','",
            "Origins allowed to call the API from a browser (CORS); empty = none."),
    Setting("LBS_OPENAI_BASE_URL", "", _url, "an http:// or https:// URL, or empty",
            "Default base URL (e.g. http://127.0.0.1:8000/v1) of the OpenAI-compatible "
            "server that evaluates openai:<name> models; a job's api.base_url wins."),
    Setting("LBS_OPENAI_API_KEY", "", _text, "any secret text (empty = no key)",
            "API key for LBS_OPENAI_BASE_URL (sent as a bearer token, never logged), and "
            "only there: a job naming another base_url sends its own api.api_key or none."),
    Setting("LBS_OPENAI_ALLOWED_HOSTS", "", _hosts,
            "host names or IP addresses separated by ',' (host:port for one port; '*' = any)",
            "Hosts a job's api.base_url may name, besides LBS_OPENAI_BASE_URL's host; "
            "loopback addresses are allowed too while no LBS_API_TOKEN is set."),
    Setting("LBS_ALLOWED_HOSTS", "", _hosts,
            "host names or IP addresses separated by ','",
            "Names the server answers to in the Host header besides its bind address and "
            "the loopback names (localhost, 127.0.0.1, [::1]); others get 400 (DNS "
            "rebinding)."),
    Setting("LBS_SECRET_KEY", "", _text, "any secret text (empty = <data dir>/secret.key)",
            "Key that encrypts the API keys jobs carry while they wait in the database; "
            "empty = a random key kept in <data dir>/secret.key (mode 0600). Give the "
            "server and every worker on other machines the same value."),
    Setting("LBS_PORT", "8080", _port, "an integer from 0 to 65535",
            "Port the HTTP server listens on."),
    Setting("LBS_SERVER_URL", "", _text, "a URL (empty = http://127.0.0.1:<LBS_PORT>)",
            "Where clients of a running server (the MCP server, clear_gpu_memory.py) reach it."),
    Setting("LBS_WORKERS", "auto", _workers,
            "'auto' or an integer of at least 0, or GPU groups such as '0,1;2;3'",
            "Worker processes started by the server: 'auto' = one per visible GPU, "
            "or one on CPU when there is none; 0 starts none; '0,1;2' starts one worker "
            "holding GPUs 0 and 1 and one holding GPU 2."),
    Setting("LBS_WORKER_LABELS", "", _labels, "labels separated by ',' (letters, digits, _.:@-)",
            "Labels of the workers started here; a job with a worker_label runs only on a "
            "worker that has it (every worker also has its host name and its id)."),
    Setting("LBS_SIMULATED_GPU_MEMORY", "", _sizes, "sizes separated by ',' such as 24GB,24GB",
            "For testing only: workers pretend this machine has GPUs of these sizes (all "
            "free) for num_gpus and memory admission; jobs still run on the CPU."),
    Setting("LBS_GPU_MEMORY_LIMIT", "0.0", _fraction, 'a number from 0.0 (no limit) to 1.0',
            "Fraction of each GPU's memory a worker process may use through PyTorch "
            "(weights, KV cache, activations; set with "
            "torch.cuda.set_per_process_memory_fraction); weights are placed under it "
            "less the job's KV/activation estimate, spilling to RAM. 0.0 = no limit."),
    Setting("LBS_ENABLE_MEMORY_MANAGEMENT", "1", _bool, '1/0, true/false, yes/no, on/off',
            "Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in workers "
            "(a value you set yourself wins)."),
    Setting("LBS_TORCH_DTYPE", "auto", _dtype, 'auto, float16, bfloat16, float32',
            "dtype models are loaded in: auto, float16, bfloat16 or float32."),
    Setting("LBS_USE_MODEL_CACHE", "1", _bool, '1/0, true/false, yes/no, on/off',
            "Keep models of cached datasets loaded between jobs; 0 makes every job uncached."),
    Setting("LBS_TRUST_REMOTE_CODE", "0", _bool, '1/0, true/false, yes/no, on/off',
            "Allow models that ship their own Python code (trust_remote_code)."),
    Setting("LBS_ALLOW_DOWNLOAD", "0", _bool, '1/0, true/false, yes/no, on/off',
            "Allow downloading hub models that are not in the local cache."),
    Setting("LBS_ALLOW_DATA_DOWNLOAD", "0", _bool, '1/0, true/false, yes/no, on/off',
            "Allow jobs to fetch a dataset's official data from the Hugging Face hub when "
            "it is neither in LBS_DATASETS_DIR nor in the hub cache (separate from model "
            "downloads); the web page then offers a Fetch button."),
    Setting("LBS_LEASE_SECONDS", "60", _positive_float, 'a number of seconds greater than 0',
            "A running job whose worker has not renewed its lease for this long is re-queued."),
    Setting("LBS_JOB_TIMEOUT", "0", _non_negative_float, "a number of seconds (0 = none)",
            "A job running longer than this fails (a job's own timeout_s overrides it)."),
    Setting("LBS_MAX_ATTEMPTS", "3", _positive_int, 'an integer of at least 1',
            "How many times a job may be started before it fails for good."),
    Setting("LBS_POLL_INTERVAL", "0.5", _positive_float, 'a number of seconds greater than 0',
            "Seconds an idle worker waits before looking at the queue again (SQLite)."),
    Setting("LBS_LISTEN_TIMEOUT", "10", _positive_float, 'a number of seconds greater than 0',
            "PostgreSQL: an idle worker sleeps until a new-work notification (LISTEN/NOTIFY), "
            "and at most this long before looking at the queue anyway."),
    Setting("MAX_MEMORY_USAGE", "0", _bytes, "a number of bytes (0 = 80% of RAM)",
            "Bytes of model memory (RAM and GPU copies) a worker's model manager may hold; "
            "least recently used unpinned models are evicted to stay under it."),
    Setting("MEMORY_CHECK_INTERVAL", "60", _positive_float, "a number of seconds greater than 0",
            "How often the model manager checks memory pressure."),
    Setting("AUTO_CLEANUP_ENABLED", "true", _bool, "1/0, true/false, yes/no, on/off",
            "Unload least recently used models when a pressure check finds pressure."),
    Setting("GPU_IDLE_TIMEOUT", "600", _positive_float, "a number of seconds greater than 0",
            "A model idle on the GPU this long is offloaded to CPU RAM (changeable at run "
            "time: POST /api/gpu/timeout)."),
    Setting("LBS_RELEASE_TIMEOUT", "3600", _positive_float, "a number of seconds greater than 0",
            "A model idle in CPU RAM this long is released (pinned models never are)."),
    Setting("LBS_PRESSURE_RATIO", "0.8", _fraction, "a number from 0.0 to 1.0",
            "Memory pressure when managed memory passes this share of MAX_MEMORY_USAGE."),
    Setting("LBS_MIN_AVAILABLE_GB", "2.0", _non_negative_float, "a number of GB of at least 0",
            "Memory pressure when the system's available RAM falls under this."),
    Setting("LBS_PINNED_MEMORY_BUDGET", "0", _bytes, "a number of bytes (0 = 25% of RAM)",
            "Pinned host memory offloaded models may keep for fast restores."),
    Setting("LBS_AFFINITY_SECONDS", "300", _non_negative_float, "a number of seconds of at least 0",
            "A worker prefers a queued job for the model it holds when that job is at most "
            "this much younger than the oldest queued job (0 = strict queue order)."),
    Setting("LBS_DATASETS_DIR", "", _text, "a folder path (empty = <data dir>/datasets)",
            "Where dataset files are looked for: <folder>/<dataset name>/ in the official "
            "layout, unless a job gives data_dir. A job's data_dir or haystack file must lie "
            "under it."),
    Setting("LBS_MAX_CONTEXT_LENGTH", "0", _non_negative_int,
            "an integer of at least 0 (0 = only the model's own maximum)",
            "Longest context length (tokens) a job may ask for: Needle-in-a-Haystack "
            "context_lengths, LongBench max_length. Jobs asking for more are refused (422)."),
    Setting("LBS_MAX_GRID_CELLS", "2500", _positive_int, "an integer of at least 1",
            "Most (context length, depth) cells a Needle-in-a-Haystack job may ask for."),
    Setting("LBS_MODEL_DIRS", "", _text, "folder paths separated by ':'",
            "Folders scanned (two levels deep) for Hugging Face checkpoints to offer on the "
            "web page and in GET /api/models. A model folder named in a job must lie under "
            "one of them."),
    Setting("LBS_PLUGIN_DIRS", "", _text, "folder paths separated by ':'",
            "Folders whose *.py modules are imported at start to register dataset and runner "
            "plugins."),
    Setting("LBS_LM_EVAL_INCLUDE_PATH", "", _text, "folder paths separated by ':'",
            "Folders of local lm-evaluation-harness task YAMLs offered by the lm_eval dataset "
            "beside lm-eval's own tasks (the lm_eval command's --include_path)."),
    Setting("LBS_LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING, ERROR",
            "Logging level of the server and workers."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """Parsed settings. Build with `load_settings()`; never read os.environ elsewhere."""

    data_dir: Path
    database_url: str
    host: str
    port: int
    workers: int | None
    gpu_memory_limit: float
    enable_memory_management: bool
    torch_dtype: str
    use_model_cache: bool
    trust_remote_code: bool
    allow_download: bool
    lease_seconds: float
    max_attempts: int
    poll_interval: float
    log_level: str
    max_memory_usage: int = 0
    job_timeout: float = 0.0
    memory_check_interval: float = 60.0
    auto_cleanup_enabled: bool = True
    gpu_idle_timeout: float = 600.0
    release_timeout: float = 3600.0
    pressure_ratio: float = 0.8
    min_available_gb: float = 2.0
    pinned_memory_budget: int = 0
    affinity_seconds: float = 300.0
    plugin_dirs: tuple[str, ...] = ()
    model_dirs: tuple[str, ...] = ()
    lm_eval_include_path: tuple[str, ...] = ()
    datasets_dir: Path | None = None
    api_token: str = field(default="", repr=False)
    openai_base_url: str = ""
    openai_api_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    cors_origins: tuple[str, ...] = ()
    openai_allowed_hosts: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    server_url: str = ""
    worker_gpu_groups: tuple[str, ...] = ()
    """LBS_WORKERS as GPU groups ('0,1', '2'), one per worker; empty for 'auto' or a count."""
    worker_labels: tuple[str, ...] = ()
    simulated_gpu_memory: tuple[int, ...] = ()
    listen_timeout: float = 10.0
    max_context_length: int = 0
    """0: no ceiling beyond the model's own maximum."""
    max_grid_cells: int = 2500
    cuda_visible_devices: str | None = None
    """CUDA_VISIBLE_DEVICES as the process found it (read here, like every setting)."""
    allow_data_download: bool = False
    hub_offline: bool = False
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: dataset data is read from the cache only
    (huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT itself as well)."""
    raw: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, to hand to a child process."""
        return dict(self.raw)

    def child_env(self) -> dict[str, str]:
        """The whole environment of a child process of ours: this one's (PATH, HF_*…)
        with the settings on top."""
        return {**os.environ, **self.raw}


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Read every setting; raise ConfigError naming the first bad variable."""
    env_file = os.environ.get("LBS_ENV_FILE", ".env")
    file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None} \
        if Path(env_file).is_file() else {}
    raw: dict[str, str] = {}
    for setting in SETTINGS:
        value = os.environ.get(setting.name, file_values.get(setting.name, setting.default))
        if overrides and setting.name in overrides:
            value = str(overrides[setting.name])
        raw[setting.name] = value
    unknown = set(overrides or ()) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")

    parsed: dict[str, Any] = {}
    for setting in SETTINGS:
        try:
            parsed[setting.name] = setting.parse(raw[setting.name])
        except ValueError:
            raise ConfigError(
                f"{setting.name}={raw[setting.name]!r} is not valid; "
                f"accepted values: {setting.accepted}") from None

    data_dir = Path(parsed["LBS_DATA_DIR"]).expanduser().resolve()
    database_url = parsed["LBS_DATABASE_URL"] or f"sqlite:///{data_dir / 'lbs.sqlite3'}"
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        host=parsed["LBS_HOST"],
        port=parsed["LBS_PORT"],
        workers=len(parsed["LBS_WORKERS"]) if isinstance(parsed["LBS_WORKERS"], tuple)
        else parsed["LBS_WORKERS"],
        worker_gpu_groups=parsed["LBS_WORKERS"] if isinstance(parsed["LBS_WORKERS"], tuple)
        else (),
        worker_labels=parsed["LBS_WORKER_LABELS"],
        simulated_gpu_memory=parsed["LBS_SIMULATED_GPU_MEMORY"],
        listen_timeout=parsed["LBS_LISTEN_TIMEOUT"],
        gpu_memory_limit=parsed["LBS_GPU_MEMORY_LIMIT"],
        enable_memory_management=parsed["LBS_ENABLE_MEMORY_MANAGEMENT"],
        torch_dtype=parsed["LBS_TORCH_DTYPE"],
        use_model_cache=parsed["LBS_USE_MODEL_CACHE"],
        trust_remote_code=parsed["LBS_TRUST_REMOTE_CODE"],
        allow_download=parsed["LBS_ALLOW_DOWNLOAD"],
        lease_seconds=parsed["LBS_LEASE_SECONDS"],
        max_attempts=parsed["LBS_MAX_ATTEMPTS"],
        poll_interval=parsed["LBS_POLL_INTERVAL"],
        log_level=parsed["LBS_LOG_LEVEL"],
        max_memory_usage=parsed["MAX_MEMORY_USAGE"],
        job_timeout=parsed["LBS_JOB_TIMEOUT"],
        memory_check_interval=parsed["MEMORY_CHECK_INTERVAL"],
        auto_cleanup_enabled=parsed["AUTO_CLEANUP_ENABLED"],
        gpu_idle_timeout=parsed["GPU_IDLE_TIMEOUT"],
        release_timeout=parsed["LBS_RELEASE_TIMEOUT"],
        pressure_ratio=parsed["LBS_PRESSURE_RATIO"],
        min_available_gb=parsed["LBS_MIN_AVAILABLE_GB"],
        pinned_memory_budget=parsed["LBS_PINNED_MEMORY_BUDGET"],
        affinity_seconds=parsed["LBS_AFFINITY_SECONDS"],
        max_context_length=parsed["LBS_MAX_CONTEXT_LENGTH"],
        max_grid_cells=parsed["LBS_MAX_GRID_CELLS"],
        plugin_dirs=tuple(d for d in parsed["LBS_PLUGIN_DIRS"].split(os.pathsep) if d),
        model_dirs=tuple(d for d in parsed["LBS_MODEL_DIRS"].split(os.pathsep) if d),
        lm_eval_include_path=tuple(d for d in parsed["LBS_LM_EVAL_INCLUDE_PATH"]
                                   .split(os.pathsep) if d),
        api_token=parsed["LBS_API_TOKEN"],
        openai_base_url=parsed["LBS_OPENAI_BASE_URL"],
        openai_api_key=parsed["LBS_OPENAI_API_KEY"],
        secret_key=parsed["LBS_SECRET_KEY"],
        openai_allowed_hosts=parsed["LBS_OPENAI_ALLOWED_HOSTS"],
        allowed_hosts=parsed["LBS_ALLOWED_HOSTS"],
        cors_origins=tuple(o.strip() for o in parsed["LBS_CORS_ORIGINS"].split(",")
                           if o.strip()),
        server_url=(parsed["LBS_SERVER_URL"] or f"http://127.0.0.1:{parsed['LBS_PORT']}")
        .rstrip("/"),
        datasets_dir=Path(parsed["LBS_DATASETS_DIR"]).expanduser().resolve()
        if parsed["LBS_DATASETS_DIR"] else data_dir / "datasets",
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        allow_data_download=parsed["LBS_ALLOW_DATA_DOWNLOAD"],
        hub_offline=any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
                        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
        raw=raw,
    )


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


def load_settings_or_report() -> Settings | None:
    """Settings for a command's main(); None after printing the error for a bad value."""
    try:
        return load_settings()
    except ConfigError as exc:
        import sys

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
