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


class InvalidPath(ValueError):
    """A path from a job cannot name a file at all (NUL byte, name too long)."""


NAME_MAX = 255
"""Longest file name (bytes, UTF-8) Linux file systems take."""
PATH_MAX = 4096


def check_path_text(given: str) -> None:
    """Raise InvalidPath unless `given` could be a path on this system."""
    if "\x00" in given:
        raise InvalidPath("a path cannot contain a NUL character")
    try:
        encoded = given.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath("a path must be valid Unicode (no lone surrogates)") from None
    if len(encoded) > PATH_MAX:
        raise InvalidPath(f"the path is longer than {PATH_MAX} bytes")
    longest = max((len(part.encode()) for part in given.split("/")), default=0)
    if longest > NAME_MAX:
        raise InvalidPath(f"a file or folder name in the path is longer than {NAME_MAX} "
                          "bytes")


def confine_file(path: Path, roots: Sequence[Path | str]) -> Path:
    """`path` resolved (symbolic links followed), if it still lies under one of
    `roots`; OutsideAllowedFolders otherwise. For each file read inside an allowed
    folder: a link in there may lead anywhere."""
    resolved = path.resolve()
    folders = [Path(r).expanduser().resolve() for r in roots]
    if not any(resolved.is_relative_to(folder) for folder in folders):
        raise OutsideAllowedFolders(
            f"{path.name!r} leads through a symbolic link outside the allowed folders "
            f"({', '.join(str(f) for f in folders)})")
    return resolved


FOLDER_MAX_ENTRIES = 100_000
"""Most files and folders `confine_folder` looks at (a checkpoint has a few dozen)."""


def confine_folder(folder: Path, roots: Sequence[Path | str]) -> None:
    """Every file and folder inside `folder` (what a model load may open: config,
    tokenizer files, chat_template.jinja, weights, subfolders) must resolve under one
    of `roots`; OutsideAllowedFolders names the first that does not. Linked folders
    are followed (each once) so that links inside them are checked too."""
    seen: set[Path] = set()
    todo = [Path(folder)]
    count = 0
    while todo:
        current = todo.pop()
        real = confine_file(current, roots)
        if real in seen:
            continue
        seen.add(real)
        for entry in current.iterdir():
            count += 1
            if count > FOLDER_MAX_ENTRIES:
                raise OutsideAllowedFolders(
                    f"{folder.name!r} holds more than {FOLDER_MAX_ENTRIES} files; not a "
                    "model folder")
            if entry.is_dir():
                todo.append(entry)
            elif entry.is_symlink():
                confine_file(entry, roots)


def confine(given: str, roots: Sequence[Path | str], setting: str) -> Path:
    """The resolved path `given` names, if it lies under one of `roots`.

    A relative path is looked up under each root in turn (the first that exists
    wins). Raises OutsideAllowedFolders naming `setting`, the setting that lists
    the folders, or InvalidPath. The path need not exist: the caller reports a missing
    one.
    """
    check_path_text(given)
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
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop, a folder it may not read
        raise OutsideAllowedFolders(f"{given!r} cannot be resolved ({exc})") from None
    if not any(resolved.is_relative_to(folder) for folder in folders):
        via = " through a symbolic link" if candidate.absolute() != resolved else ""
        raise OutsideAllowedFolders(
            f"{given!r} leads{via} outside the folders in {setting} "
            f"({', '.join(str(f) for f in folders)})")
    return resolved
