"""Build the modules listed in COMPILED as C extensions with Cython, from their own .py sources.

Each module is compiled in Cython's pure-Python mode, as gevent compiles its hub and
queue: the .py file is the source, and a .pxd file beside it (when there is one) adds C
types. The extension has the module's own name, so once built it is imported instead of
the .py file.

Without a compiler, without Cython, or with FORKPROXY_PURE_PYTHON=1 set, nothing is
compiled and the package is plain Python (the extensions are ``optional``: a failed
compile is a warning, not a failed install).
"""

import os
import re

from setuptools import Extension, setup

#: the modules compiled (each one's measured gain is in docs/BENCHMARKS.md)
COMPILED = [
    "forkproxy.manager.sampling",
    "forkproxy.manager.spanfill",
    "forkproxy.manager.histogram",
    "forkproxy.manager.recordpass",
    "forkproxy.manager.jsonline",
    "forkproxy.shm.ringwalk",
    "forkproxy.shm.ringpush",
    "forkproxy.http.ids",
    "forkproxy.http.headbuild",
    "forkproxy.http.headscan",
    "forkproxy.http2.fieldsink",
    "forkproxy.http2.sendpath",
    "forkproxy.manager.rawspans",
    "forkproxy.manager.rawbatch",
    "forkproxy.libcalls",
]

#: Cython's shared utility module: one copy of the code Cython adds to every module (the
#: memoryview types above all, which histogram, recordpass and spanfill each carried),
#: which they import; scripts/build-ext builds it with them
SHARED_UTILITY = "forkproxy._cyutility"


def extensions():
    if os.environ.get("FORKPROXY_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    exts = []
    for name in COMPILED:
        base = name.replace(".", "/")
        pxd = [base + ".pxd"] if os.path.exists(base + ".pxd") else []
        # the .pxd files it cimports from (recordpass.pxd: histogram.pxd)
        for p in pxd[:]:
            with open(p) as f:
                pxd += [m.replace(".", "/") + ".pxd"
                        for m in re.findall(r"^from (forkproxy[\w.]*) cimport", f.read(), re.M)]
        exts.append(Extension(name, [base + ".py"], depends=pxd, optional=True))
    exts.append(Extension(SHARED_UTILITY, sources=[], optional=True))
    return cythonize(exts, build_dir="build/cython", quiet=True,
                     shared_utility_qualified_name=SHARED_UTILITY, compiler_directives={
        "language_level": 3,
        # annotations are documentation here: C types come only from the .pxd files
        "annotation_typing": False,
    })


setup(ext_modules=extensions())
