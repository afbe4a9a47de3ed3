"""What the engine needs of a dataset or a runner is declared on their base classes
(datasets.base.Dataset, runners.base.Runner, memory.held.HeldModel), never found by
probing with hasattr/getattr: a plugin then learns from the base class alone what it
may provide, and a misspelt hook fails loudly instead of being skipped."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

# Names under which backend/ holds our datasets, runners and their parameters.
OURS = {"dataset", "ds", "runner", "view", "params", "parsed", "job", "prepared", "spec"}


def _probes(tree: ast.AST) -> list[tuple[int, str]]:
    """hasattr/getattr calls whose object is (an attribute of) one of OURS, with a
    constant attribute name: `hasattr(runner, "x")`, `getattr(job.params, "x", d)`,
    `getattr(e.runner, "x")`."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)):
            continue
        names = {n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)} | \
            {n.attr for n in ast.walk(node.args[0]) if isinstance(n, ast.Attribute)}
        if names & OURS:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_capability_probing_of_datasets_or_runners():
    offenders = []
    for path in sorted((ROOT / "backend").rglob("*.py")):
        for line, call in _probes(ast.parse(path.read_text(encoding="utf-8"))):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {call}")
    assert not offenders, ("declare the capability on the base class instead of probing:\n"
                           + "\n".join(offenders))


def test_the_check_finds_the_probes_it_forbids():
    """The scan sees each form the engine used before the hooks were declared."""
    code = '''
follow = getattr(dataset, "second_turn", None)
if hasattr(params, "lengths") and hasattr(params, "depths"): pass
if hasattr(runner, "should_stop"): pass
flag = getattr(job.params, "use_chat_template", True)
pinned = getattr(e.runner, "host_pinned", False)
ok = hasattr(ds, "data_parts")
fine = getattr(torch._C, "_host_emptyCache", None)
'''
    got = [call for _, call in _probes(ast.parse(code))]
    assert len(got) == 7 and not any("torch" in c for c in got), got


def test_every_use_chat_template_parameter_reaches_the_prompts():
    """A dataset whose parameters offer `use_chat_template` returns the job's choice
    from its declared `chat_template` hook (the loop no longer reads the field itself)."""
    from backend.datasets.registry import BUILTIN, get_dataset

    offering = []
    for name in BUILTIN:
        ds = get_dataset(name)
        if "use_chat_template" not in ds.Params.model_fields:
            continue
        offering.append(name)
        for choice in (True, False):
            params = ds.Params.model_construct(use_chat_template=choice)
            assert ds.chat_template(params) is choice, name
    assert "needle_in_haystack" in offering and "ceval" in offering
