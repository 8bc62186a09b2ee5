"""Which build runs: the modules compiled by Cython (setup.py), or the .py files.

scripts/test runs the whole suite on the compiled build, then a few files again with
FORKPROXY_PURE_PYTHON=1 (the pure-Python job); these tests check that each job really
ran the build it claims, and that no compiled module is older than its sources (Python
would import it instead of the edited .py file)."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest

import forkproxy

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def _compiled_list() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no COMPILED list")


COMPILED = _compiled_list()
HAVE_CC = shutil.which(sysconfig.get_config_var("CC").split()[0]) is not None


def _files(pure: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FORKPROXY_PURE_PYTHON", None)
    if pure:
        env["FORKPROXY_PURE_PYTHON"] = "1"
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n    print(name, importlib.import_module(name).__file__)")
    out = subprocess.run([sys.executable, "-c", code, *COMPILED], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_this_job_runs_the_build_it_claims():
    files = {name: importlib.import_module(name).__file__ for name in COMPILED}
    if forkproxy.PURE_PYTHON:
        assert all(f.endswith(".py") for f in files.values()), files
        return
    if not HAVE_CC:
        pytest.skip("no C compiler here: the package runs as plain Python")
    assert all(f.endswith(SUFFIX) for f in files.values()), files
    # a compiled module's functions are Cython's C functions, not Python functions
    for name in COMPILED:
        module = importlib.import_module(name)
        functions = [v for v in vars(module).values()
                     if callable(v) and getattr(v, "__module__", None) == name]
        assert functions and not any(isinstance(f, types.FunctionType) for f in functions), name


def test_pure_python_switch_imports_the_py_files_beside_the_compiled_ones():
    assert all(f.endswith(".py") for f in _files(pure=True).values())
    if HAVE_CC:
        assert all(f.endswith(SUFFIX) for f in _files(pure=False).values())


def test_no_compiled_module_is_older_than_its_sources():
    # what scripts/setup runs before the tests (it rebuilds what this lists)
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "build-ext"), "--check"],
                           capture_output=True, text=True, env={
                               k: v for k, v in os.environ.items()
                               if k != "FORKPROXY_PURE_PYTHON"})
    if not HAVE_CC:
        pytest.skip("no C compiler here: nothing is compiled")
    assert check.returncode == 0, f"stale, missing or unlisted: {check.stdout.split()}"
