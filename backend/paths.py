"""Confining paths that arrive from the API to the folders the operator configured.

A job names model folders, dataset folders and haystack files. On a shared server
those names come from anyone with API access, so they must not reach the rest
of the file system: `..` is refused outright, relative paths are looked up
under the allowed folders, and the fully resolved path (symlinks followed) must
still lie under one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class OutsideAllowedFolders(ValueError):
    """A path from a job lies outside the configured folders (or uses `..`)."""


def confine(given: str, roots: Sequence[Path | str], setting: str) -> Path:
    """The resolved path `given` names, if it lies under one of `roots`.

    A relative path is looked up under each root in turn (the first that exists
    wins). Raises OutsideAllowedFolders naming `setting`, the setting that lists
    the folders. The path need not exist: the caller reports a missing one.
    """
    path = Path(given).expanduser()
    if ".." in path.parts:
        raise OutsideAllowedFolders(f"{given!r}: '..' is not allowed in paths")
    folders = [Path(r).expanduser().resolve() for r in roots]
    if not folders:
        raise OutsideAllowedFolders(
            f"{given!r}: paths are not accepted because {setting} is not set "
            f"(set it to the folders that may be read)")
    if path.is_absolute():
        candidate = path
    else:
        candidates = [folder / path for folder in folders]
        candidate = next((c for c in candidates if c.exists()), candidates[0])
    resolved = candidate.resolve()
    if not any(resolved.is_relative_to(folder) for folder in folders):
        via = " through a symbolic link" if candidate.absolute() != resolved else ""
        raise OutsideAllowedFolders(
            f"{given!r} leads{via} outside the folders in {setting} "
            f"({', '.join(str(f) for f in folders)})")
    return resolved
