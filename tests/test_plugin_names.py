"""The queue and the page decide nothing by a plugin's name: what they need to know of a
dataset or a runner, the plugin declares (its length axis, its views, its tasks, how its
model references are identified). A plugin added or renamed then needs no edit there.

Looked for: every registered dataset and runner name and the `builtin` prefix of the
built-in models, as a word in code (Python string constants and names; JavaScript with
its comments stripped). Docstrings and comments may still speak of them; the i18n table
may translate them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from backend.datasets.registry import dataset_names
from backend.runners.registry import runner_names

ROOT = Path(__file__).resolve().parent.parent
QUEUE = sorted((ROOT / "backend" / "queue").glob("*.py"))
PAGE = sorted(p for p in (ROOT / "frontend").glob("*.js") if p.name != "i18n.js")


def plugin_names() -> list[str]:
    return sorted({*dataset_names(), *runner_names(), "builtin"})


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (a module's, class's, function's,
    or an attribute's: a bare string statement)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def python_code_words(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant that is not a docstring, and every name."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
    return out


_JS_COMMENT = re.compile(r"""("(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`(?:\\.|[^`\\])*`)"""
                         r"""|//[^\n]*|/\*.*?\*/""", re.S)


def js_code_lines(source: str) -> list[tuple[int, str]]:
    """(line, text) of a script with its comments blanked (strings kept, line numbers too)."""
    def blank(match: re.Match) -> str:
        text = match.group(0)
        return text if match.group(1) else re.sub(r"[^\n]", " ", text)
    return list(enumerate(_JS_COMMENT.sub(blank, source).splitlines(), start=1))


def named_plugins(pieces: list[tuple[int, str]], names: list[str]) -> list[str]:
    found = []
    for line, text in pieces:
        for name in names:
            if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
                found.append(f"line {line}: {name!r} in {text.strip()[:80]!r}")
    return found


@pytest.mark.parametrize("path", QUEUE, ids=lambda p: p.name)
def test_the_queue_names_no_plugin(path):
    found = named_plugins(python_code_words(path.read_text(encoding="utf-8")), plugin_names())
    assert not found, f"backend/queue/{path.name} decides by a plugin's name: {found}"


@pytest.mark.parametrize("path", PAGE, ids=lambda p: p.name)
def test_the_page_names_no_plugin(path):
    found = named_plugins(js_code_lines(path.read_text(encoding="utf-8")), plugin_names())
    assert not found, f"frontend/{path.name} decides by a plugin's name: {found}"


def test_the_check_sees_a_planted_name():
    """A name planted in code is found; the same name in a docstring or comment is not."""
    python = ('"""About needle_in_haystack."""\n'
              'def f(job):\n'
              '    """Only for lm_eval."""\n'
              '    return job.dataset == "needle_in_haystack"  # not lm_eval\n')
    assert named_plugins(python_code_words(python), plugin_names()) == [
        "line 4: 'needle_in_haystack' in 'needle_in_haystack'"]
    script = ('// a NIAH grid: needle_in_haystack\n'
              'const url = "http://x/"; /* lm_eval */\n'
              'const lines = dataset === "needle_in_haystack";\n'
              'const note = /^builtin:/.test(model);\n')
    found = named_plugins(js_code_lines(script), plugin_names())
    assert [f.split(":")[0] for f in found] == ["line 3", "line 4"]
    assert "builtin" in found[1]
