"""What `forkproxy check` reports besides config errors: the platform (the shared-memory
rings run on x86-64 only) and warnings about things that will not work as configured
although the config is valid (OCSP stapling with no issuer certificate to be found).

Lines are "error: ...", "warning: ..." or "info: ..."; only errors fail the check."""

from __future__ import annotations

from forkproxy.shm.ring import platform_support
from forkproxy.tls.stapling import stapling_warnings


def report(cfg, machine: str | None = None) -> list[str]:
    """The check's lines for a config that loaded without errors."""
    supported, text = platform_support(machine)
    lines = [("info: " if supported else "error: ") + text]
    lines += ["warning: " + w for w in stapling_warnings(cfg)]
    return lines


def failed(lines: list[str]) -> bool:
    return any(line.startswith("error: ") for line in lines)
