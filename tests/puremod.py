"""A compiled module's twin run as plain Python: its .py file loaded under another name,
for tests that compare the C build of a module with its Python source."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def pure_twin(module: ModuleType) -> ModuleType:
    """``module``'s .py source, imported afresh as Python (``COMPILED`` False in it)."""
    path = module.__file__
    source = path if path.endswith(".py") else path[:path.index(".cpython")] + ".py"
    assert os.path.exists(source), source
    spec = importlib.util.spec_from_file_location(module.__name__ + "_pure", source)
    twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin)
    assert not twin.COMPILED
    return twin
