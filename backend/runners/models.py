"""Resolving what a user typed as a model into something loadable, without torch.

A model is `<runner>:<name>` for a registered runner plugin (`openai:gpt-4o`, see
backend.runners.registry), else one for the transformers runner: `builtin:<name>`,
the path of a local Hugging Face checkpoint folder, or a hub id that is already in
the local cache (downloads only with LBS_ALLOW_DOWNLOAD=1). The server uses this
at submit time to refuse unknown models and over-long contexts before anything
loads; the worker uses it again before loading.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from backend.common.config import Settings
from backend.common.paths import (
    InvalidPath,
    OutsideAllowedFolders,
    check_path_text,
    confine_folder,
)
from backend.common.paths import confine as confine_path
from backend.common.suggest import did_you_mean, listing
from backend.engine.contracts import ModelInfo, ModelNotFound, ModelPathRefused, ModelSpec
from backend.runners import builtin
from backend.runners.registry import DEFAULT, get_runner, runner_name_for

__all__ = ["estimate_model_bytes",
           "list_local_models", "max_length_from_config", "model_info", "resolve_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name: str, settings: Settings, confine: bool = True) -> ModelSpec:
    """Resolve the model reference `name` with the runner that serves it (its scheme,
    see backend.runners.registry); raise ModelNotFound saying where it looked.

    With `confine` (jobs from the API) a folder must lie under LBS_MODEL_DIRS, where a
    relative name is also looked up; raises ModelPathRefused otherwise. The command
    line, run by the machine's own user, passes False.
    """
    name = name.strip()
    runner = runner_name_for(name)
    if runner != DEFAULT:
        return get_runner(runner).resolve(name, settings, confine)
    return resolve_local_model(name, settings, confine)


def resolve_local_model(name: str, settings: Settings, confine: bool = True) -> ModelSpec:
    """The transformers runner's `resolve`: a built-in model, a checkpoint folder or a
    cached hub id (see resolve_model)."""
    name = name.strip()
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in builtin.BUILTIN_MODELS:
            names = [f"builtin:{k}" for k in builtin.BUILTIN_MODELS]
            raise ModelNotFound(f"unknown built-in model {name!r}{did_you_mean(name, names)} "
                                f"(built-in models: {', '.join(names)})")
        return ModelSpec(name=name, path=builtin.model_dir(settings.data_dir, key), builtin=key)
    try:
        check_path_text(name)
    except InvalidPath as exc:
        raise ModelNotFound(f"model {name[:80]!r}…: {exc}" if len(name) > 80
                            else f"model {name!r}: {exc}") from None
    path: Path | None = Path(name).expanduser()
    looks_like_path = path.is_absolute() or name.startswith((".", "~")) or ".." in path.parts
    if confine and (looks_like_path or _under_model_dirs(name, settings)):
        try:
            path = confine_path(name, settings.model_dirs, "LBS_MODEL_DIRS")
        except OutsideAllowedFolders as exc:
            raise ModelPathRefused(f"model folder refused: {exc}") from None
        if not path.is_dir():
            raise ModelNotFound(f"model folder {name!r} not found under LBS_MODEL_DIRS")
    elif confine:
        path = None  # not a folder under LBS_MODEL_DIRS: only a hub id is left
    if path is not None and path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{name!r} is a folder but has no config.json; "
                                "give a Hugging Face checkpoint folder")
        if confine:
            try:
                confine_folder(path, settings.model_dirs)
            except OutsideAllowedFolders as exc:
                raise ModelPathRefused(f"model folder {name!r} refused: {exc}") from None
        return ModelSpec(name=name, path=path.resolve())
    if _HUB_ID.match(name) and not Path(name).is_absolute() and not name.startswith("."):
        cached = _hub_cache_path(name)
        if cached is not None:
            return ModelSpec(name=name, path=cached, hub_id=name)
        if settings.allow_download:
            return ModelSpec(name=name, path=None, hub_id=name)
        raise ModelNotFound(f"hub model {name!r} is not in the local Hugging Face cache and "
                            "downloads are off (set LBS_ALLOW_DOWNLOAD=1 to allow them)"
                            + did_you_mean(name, _cached_hub_ids()))
    known = _known_models(settings, confine)
    raise ModelNotFound(f"model {name!r} not found: not a built-in model, not an existing "
                        f"checkpoint folder, not a cached hub id{did_you_mean(name, known)} "
                        f"(models here: {listing(list(known.values()))})")


def _known_models(settings: Settings, confine: bool) -> dict[str, str]:
    """The models a job could name instead, each by what a user would type -> how to
    name it: built-in models, the checkpoint folders under LBS_MODEL_DIRS (by their
    name there; by path for the command line, which does not look names up there), the
    hub ids in the local cache."""
    names = {f"builtin:{k}": f"builtin:{k}" for k in builtin.BUILTIN_MODELS}
    for folder in settings.model_dirs:
        root = Path(folder).expanduser()
        if root.is_dir():
            for config in sorted([*root.glob("*/config.json"), *root.glob("*/*/config.json")]):
                relative = config.parent.relative_to(root).as_posix()
                names[relative] = relative if confine else str(config.parent)
    return names | {hub_id: hub_id for hub_id in _cached_hub_ids()}


def _cached_hub_ids() -> list[str]:
    """The model repos in the Hugging Face cache (`models--org--name` folders)."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    if not cache.is_dir():
        return []
    return sorted(repo.name.removeprefix("models--").replace("--", "/")
                  for repo in cache.glob("models--*") if (repo / "snapshots").is_dir())


def _under_model_dirs(name: str, settings: Settings) -> bool:
    """Whether a relative `name` is a folder under one of LBS_MODEL_DIRS."""
    return any((Path(d).expanduser() / name).is_dir() for d in settings.model_dirs)


def _hub_cache_path(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return None
    folder_path = Path(folder)
    return folder_path if (folder_path / "config.json").is_file() else None


def model_info(spec: ModelSpec) -> ModelInfo:
    """What a local model's config says, read without loading it."""
    if spec.builtin:
        return ModelInfo(spec.name, builtin.BUILTIN_MODELS[spec.builtin].max_position_embeddings)
    if spec.path is None:
        return ModelInfo(spec.name, None)
    config = json.loads((spec.path / "config.json").read_text(encoding="utf-8"))
    return ModelInfo(spec.name, max_length_from_config(config))


def max_length_from_config(config: dict) -> int | None:
    """The longest sequence a transformers config admits, or None if it does not say."""
    text_config = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length",
                "seq_length", "n_ctx"):
        value = text_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TARGET_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _safetensors_bytes(folder: Path, target: str) -> int | None:
    """Bytes of the weights per their safetensors headers, in the dtype they will load in."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            size = _DTYPE_BYTES.get(info["dtype"], 4)
            if target in _TARGET_BYTES and info["dtype"] in ("F32", "F16", "BF16"):
                size = _TARGET_BYTES[target]
            total += count * size
    return total


def estimate_model_bytes(spec: ModelSpec, dtype: str = "auto") -> int:
    """About how many bytes the model's weights take once loaded (0 if unknown).

    From the safetensors headers when the weights are on disk, else from the
    config (a built-in model not made yet). `dtype` "auto" keeps the stored
    dtypes, except that the CPU loads float32 (see the runner).
    """
    if spec.builtin:
        recipe = builtin.BUILTIN_MODELS[spec.builtin]
        if spec.path is not None and spec.path.is_dir():
            return _safetensors_bytes(spec.path, dtype) or 0
        h, i, n = recipe.hidden_size, recipe.intermediate_size, recipe.num_hidden_layers
        kv = h * recipe.num_key_value_heads // recipe.num_attention_heads
        params = 2 * recipe.vocab_size * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
        return params * _TARGET_BYTES.get(dtype, 4)
    if spec.path is None:
        return 0
    return _safetensors_bytes(spec.path, dtype) or 0


def list_local_models(model_dirs: tuple[str, ...] | list[str]) -> list[dict]:
    """Built-in models (`random_weights`: they know nothing, near-0 scores are what they
    should score) and the checkpoint folders (with a config.json) found up to two levels
    below each of `model_dirs`, with their maximum length."""
    found = [{"name": f"builtin:{key}", "kind": "builtin",
              "max_length": recipe.max_position_embeddings, "random_weights": True}
             for key, recipe in builtin.BUILTIN_MODELS.items()]
    for folder in model_dirs:
        root = Path(folder).expanduser()
        if not root.is_dir():
            continue
        for config in sorted([*root.glob("*/config.json"), *root.glob("*/*/config.json")]):
            try:
                info = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            found.append({"name": str(config.parent.resolve()), "kind": "folder",
                          "max_length": max_length_from_config(info),
                          "architecture": (info.get("architectures") or [None])[0]})
    return found
