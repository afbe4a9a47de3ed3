"""The settings as people read them: the table of docs/settings.md (`markdown_table`,
`lbs config --markdown`; scripts/docs.py writes it, tests/test_config.py compares)
and each value on this machine (`main`, `lbs config`)."""

from __future__ import annotations

import sys
from dataclasses import fields

from backend.common.config import SETTINGS, Settings, load_settings_or_report


def markdown_table() -> str:
    """The settings table of docs/settings.md, made from SETTINGS (`lbs config
    --markdown`); tests/test_config.py fails when that copy differs."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for spec in SETTINGS:
        if spec.default:
            default = f"`{spec.default}`" + (f" (= {spec.default_means})"
                                             if spec.default_means else "")
        else:
            default = f"(empty = {spec.default_means})" if spec.default_means else "(empty)"
        meaning = spec.help
        if spec.seed_name:
            meaning += " *The product brief's name, hence no `LBS_` prefix.*"
        rows.append(f"| `{spec.name}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None,
         prog: str = "python -m backend.common.settings_table") -> int:
    """Print every setting with its value here (secrets as set/empty), or the table of
    docs/settings.md with --markdown."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description="Show every setting (environment variable) and its value "
                               "on this machine, from the environment and the .env file.",
        epilog=f"example: {prog} --markdown")
    parser.add_argument("--markdown", action="store_true",
                        help="print the settings table of the documentation instead")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    settings = load_settings_or_report()
    if settings is None:
        return 2
    for f in fields(Settings):
        spec = f.metadata.get("setting")
        if spec is None:
            continue
        value = getattr(settings, f.name)
        if not f.repr:  # a secret: say whether it is set, never what it is
            shown = "(set)" if value else "(empty)"
        elif isinstance(value, tuple):
            shown = ",".join(str(v) for v in value)
        else:
            shown = "" if value is None else str(value)
        print(f"{spec.name}={shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
