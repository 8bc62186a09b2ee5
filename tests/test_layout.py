"""Sizes a reader can hold (docs/ARCHITECTURE.md, "Layout rules"): no function in
forkproxy/ longer than MAX_FUNCTION_LINES, no module in forkproxy/worker/ longer than
MAX_WORKER_MODULE_LINES. Exceptions are listed here, each with the reason; a hot-path
function may stay longer only where a measured A/B shows that splitting it costs CPU
(the comment then gives the figure)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "forkproxy"
MAX_FUNCTION_LINES = 80
MAX_WORKER_MODULE_LINES = 450

#: "path:Qualified.name" -> why it may be longer (a measured A/B figure for a hot path)
LONG_FUNCTIONS: dict[str, str] = {
    "forkproxy/manager/recordpass.py:time_batch": (
        "every record's timings in one walk: split into the duration and phase pass and "
        "the critical-path report's pass it cost 0.5 µs more per record (2.24 against "
        "1.74 µs in batches of 1024, docs/BENCHMARKS.md, \"The manager's record path\")"),
}
#: worker modules that may be longer than MAX_WORKER_MODULE_LINES, and why
LONG_WORKER_MODULES: dict[str, str] = {}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, line count) of every function, nested ones and methods included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = prefix + node.name
            yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def long_functions() -> dict[str, int]:
    out = {}
    for path in _modules():
        for name, lines in _functions(ast.parse(path.read_text(), str(path))):
            if lines > MAX_FUNCTION_LINES:
                out[f"{_rel(path)}:{name}"] = lines
    return out


def long_worker_modules() -> dict[str, int]:
    out = {}
    for path in sorted((PACKAGE / "worker").rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > MAX_WORKER_MODULE_LINES:
            out[_rel(path)] = lines
    return out


def test_no_function_longer_than_the_limit():
    found = long_functions()
    unexpected = {k: v for k, v in found.items() if k not in LONG_FUNCTIONS}
    assert not unexpected, (f"functions longer than {MAX_FUNCTION_LINES} lines (split them, "
                            f"or allow-list a measured hot path): {unexpected}")


def test_no_worker_module_longer_than_the_limit():
    found = long_worker_modules()
    unexpected = {k: v for k, v in found.items() if k not in LONG_WORKER_MODULES}
    assert not unexpected, (f"worker modules longer than {MAX_WORKER_MODULE_LINES} lines: "
                            f"{unexpected}")


def test_allow_lists_name_only_real_offenders():
    """An entry that is no longer needed goes: the lists only shrink."""
    stale = sorted(set(LONG_FUNCTIONS) - set(long_functions()))
    stale += sorted(set(LONG_WORKER_MODULES) - set(long_worker_modules()))
    assert not stale, f"allow-list entries that are within the limits now: {stale}"


def test_the_checker_sees_a_long_function(tmp_path):
    """The walk finds methods and nested functions (so the test above can fail)."""
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"class A:\n    def f(self):\n{body}\n        def g():\n            pass\n")
    sizes = dict(_functions(tree))
    assert sizes["A.f"] > MAX_FUNCTION_LINES
    assert sizes["A.f.g"] == 2
