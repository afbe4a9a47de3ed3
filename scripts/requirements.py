"""Write requirements.txt and requirements-dev.txt from pyproject.toml, the one list of
dependencies: requirements.txt is the package with every extra a full install has
(server, worker, lm-eval, LongBench metrics, PostgreSQL, MCP); requirements-dev.txt adds
the test tools. For pip users who want a requirements file; scripts/setup.sh installs the
package itself. `--check` exits 1 when the files differ from pyproject.toml.

Usage: python scripts/requirements.py [--check]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
HEADER = ("# Generated from pyproject.toml by `python scripts/requirements.py`; edit "
          "pyproject.toml, not this file.\n")


def _expand(project: dict, extras: list[str], seen: set[str]) -> list[str]:
    """The requirements of these extras, the package's own extras expanded in place."""
    name = project["name"]
    out: list[str] = []
    for extra in extras:
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[(.+)\]", req)
            if own:
                out += _expand(project, [e.strip() for e in own.group(1).split(",")], seen)
            else:
                out.append(req)
    return out


def render() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    full = list(dict.fromkeys(project["dependencies"] + _expand(project, ["all"], set())))
    dev = [r for r in _expand(project, ["dev"], {"all"}) if r not in full]
    return {"requirements.txt": HEADER + "\n".join(full) + "\n",
            "requirements-dev.txt": HEADER + "-r requirements.txt\n" + "\n".join(dev) + "\n"}


def main() -> int:
    from generated import write_or_check

    return write_or_check(ROOT, render(), "--check" in sys.argv[1:], "pyproject.toml",
                          "python scripts/requirements.py")


if __name__ == "__main__":
    sys.exit(main())
