"""The `lbs` command line as a user can type it on this install, for the hints the
product shows ("get it with …", "start a worker with …")."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def lbs_command(args: str, cwd: Path | str | None = None) -> str:
    """`lbs <args>` as it runs when typed in `cwd` (default: this process's folder):

    - `lbs …` when the `lbs` beside this interpreter is the one on PATH (an activated
      virtual environment, an install on PATH);
    - `.venv/bin/lbs …` (its path, relative when it lies under `cwd`) when it is
      installed but not on PATH;
    - `<this interpreter> -m backend.apps.lbs …` when no `lbs` is installed (a bare
      checkout): a plain `python` may not be the one that has the dependencies.
    """
    here = Path(cwd if cwd is not None else os.getcwd()).absolute()
    bin_dir = Path(sys.executable).parent
    script = bin_dir / ("lbs.exe" if os.name == "nt" else "lbs")
    if script.is_file():
        found = shutil.which("lbs")
        if found is not None and Path(found).absolute() == script.absolute():
            return f"lbs {args}"
        return f"{_as_typed(script, here)} {args}"
    return f"{_as_typed(Path(sys.executable), here)} -m backend.apps.lbs {args}"


def _as_typed(path: Path, cwd: Path) -> str:
    """`path` relative to `cwd` when it lies under it (`.venv/bin/lbs`), else whole."""
    path = path.absolute()
    try:
        return path.relative_to(cwd).as_posix()
    except ValueError:
        return str(path)

def moved(old: str, new: str) -> None:
    """One line for a person who typed an old module path (stderr a terminal): the
    `lbs` form to use; the module paths work for this release."""
    if sys.stderr.isatty():
        print(f"note: `{old}` is `{new}` now; the module path goes in the next release",
              file=sys.stderr)
