"""Logging: each line once, in the product's format."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

RETRY = "Retrying in 1s [Retry 1/5]."


def test_hugging_face_warnings_are_logged_once():
    """huggingface_hub gives its logger a handler of its own and lets it propagate, so
    each of its warnings (a download's retries) was written twice: raw, and again by the
    root handler. After setup_logging it is written once, in the product's format,
    whether huggingface_hub was imported before or after."""
    setup, hub = "setup_logging('INFO')\n", "from huggingface_hub import hf_hub_download\n"
    for order in ("setup first", "import first"):
        code = ("import logging\nfrom backend.common.logs import setup_logging\n"
                + (setup + hub if order == "setup first" else hub + setup)
                + f"logging.getLogger('huggingface_hub.utils._http').warning({RETRY!r})\n")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = [line for line in out.stderr.splitlines() if RETRY in line]
        assert len(lines) == 1, (order, out.stderr)
        assert " WARNING " in lines[0], lines  # the product's format (time, level)
