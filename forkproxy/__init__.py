"""forkproxy: a prefork gevent HTTP/HTTPS reverse proxy.

Some modules may be installed compiled (Cython, from their own .py sources: see
setup.py). With FORKPROXY_PURE_PYTHON set in the environment, the package imports its .py
files even where a compiled module sits beside them, so both builds run from one install.
"""

import os
import sys
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, SourceFileLoader

__version__ = "0.1.0"

#: FORKPROXY_PURE_PYTHON: import the .py sources of forkproxy even where compiled modules exist
PURE_PYTHON = bool(os.environ.get("FORKPROXY_PURE_PYTHON"))


class _SourceOnlyFinder:
    """A meta path finder for forkproxy's submodules that sees only .py files."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if path is None or not name.startswith("forkproxy."):
            return None
        for entry in path:
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(name)
            if spec is not None:
                return spec
        return None


if PURE_PYTHON and _SourceOnlyFinder not in sys.meta_path:
    sys.meta_path.insert(0, _SourceOnlyFinder)
