"""Process names (/proc/PID/comm, shown by ps and top) so operators and tests can tell
the master's children apart: fp-worker-N, fp-manager."""

from __future__ import annotations

import ctypes

_PR_SET_NAME = 15


def set_name(name: str) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
