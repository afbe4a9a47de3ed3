"""A job's run manifest: what a score was measured with, so two runs can say why they
differ. Versions of the project and the libraries, the device, the model's identity
(its real location and a fingerprint of its weights' index), the task's identity (the
dataset's effective parameters, a hash of every data file read, hashes of the prompt
code and the chat template), the inference settings and how decoding chose tokens.

Built by the worker once the model is loaded; stored as the job's `manifest` event.
The data files are those the dataset read while building its items
(backend.datasets.files.recording_reads).
"""

from __future__ import annotations

import hashlib
import inspect
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import backend

LIBRARIES = ("torch", "transformers", "accelerate", "tokenizers")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FULL_HASH_BYTES = 256 * 2**20
"""Data files up to this size are hashed whole; larger ones by size, head and tail."""

def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of the file, or, past FULL_HASH_BYTES, of its size, first and last MiB."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            digest.update(fh.read(2**20))
            fh.seek(size - 2**20)
            digest.update(fh.read(2**20))
    return digest.hexdigest()


def data_identity(paths: list[Path]) -> dict[str, Any]:
    files = []
    for path in paths:
        try:
            files.append({"name": path.name, "bytes": path.stat().st_size,
                          "sha256": file_digest(path)})
        except OSError as exc:
            files.append({"name": path.name, "error": exc.strerror or str(exc)})
    combined = _sha256_text("\n".join(f"{f['name']}:{f.get('sha256')}" for f in files))
    return {"files": files, "sha256": combined if files else None}


def weights_fingerprint(folder: Path | None) -> str | None:
    """sha256 of the weights' index (model.safetensors.index.json or the like) when
    there is one, else of the weight files' names and sizes; None without a folder."""
    if folder is None or not folder.is_dir():
        return None
    indexes = sorted(folder.glob("*.index.json"))
    if indexes:
        return hashlib.sha256(b"".join(p.read_bytes() for p in indexes)).hexdigest()
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        return None
    return _sha256_text("\n".join(f"{p.name}:{p.stat().st_size}" for p in weights))


def model_identity(spec: Any) -> dict[str, Any]:
    """Where the model really is: a folder's real path (a hub snapshot's folder names
    its revision), a hub id, a runner target; and its weights' fingerprint."""
    path = Path(spec.path).resolve() if spec.path else None
    revision = None
    if path is not None and path.parent.name == "snapshots":
        revision = path.name  # the hub cache's snapshots/<commit>
    return {"reference": spec.name, "runner": spec.runner,
            "location": str(path) if path else (spec.hub_id or spec.target or spec.name),
            "hub_id": spec.hub_id, "revision": revision,
            "weights_sha256": weights_fingerprint(path)}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def build_manifest(job: Any, runner: Any, method: str | None,
                   data_files: list[Path]) -> dict[str, Any]:
    """The manifest of `job` run by the loaded `runner` (method: a comparison's pass)."""
    versions = {"llm-bench-shower": backend.__version__,
                "python": platform.python_version(),
                **{name: _version(name) for name in LIBRARIES}}
    if job.dataset.name == "lm_eval":
        versions["lm-eval"] = _version("lm-eval")
    chat = job.dataset.chat_template(job.params)
    settings = runner.run_settings()
    template = settings.pop("chat_template", None)
    return {
        "versions": {k: v for k, v in versions.items() if v is not None},
        "model": model_identity(job.spec),
        "task": {
            "dataset": job.dataset.name,
            "params": job.params.model_dump(mode="json"),
            "data": data_identity(data_files),
            "prompt_code_sha256": _sha256_text(inspect.getsource(type(job.dataset))),
            "chat_template": chat,
            "chat_template_sha256": _sha256_text(template) if chat and template else None},
        "inference": {"method": method or "default", **settings},
        "decoding": "greedy (no sampling: no seed involved)",
    }
