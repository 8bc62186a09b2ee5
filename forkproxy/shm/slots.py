"""Keys to slots in a shared table, the one way every table does it.

A writer gives each wanted key a slot, keeping the slots of keys it already has (so
their readers' state survives), taking free slots, and when none is free reclaiming
the slots of keys no longer wanted. The caller says how a slot is cleared and how a
fresh one is filled: the key must be its last store, since readers take a slot as
valid once its key is set."""

from __future__ import annotations

from collections.abc import Callable


def assign_slots(wanted: list[int], have: dict[int, int], free: list[int],
                 clear: Callable[[int], None], install: Callable[[int, int], None],
                 table: str) -> dict[int, int]:
    """{key: slot} after giving each key of ``wanted`` a slot. ``have``: the current
    {key: slot}; ``free``: the free slots, taken from the end. RuntimeError naming
    ``table`` when it is full."""
    keep = set(wanted)
    for key in wanted:
        if key in have:
            continue
        if not free:  # full: reclaim the slots of keys no longer wanted
            free = [i for k, i in have.items() if k not in keep]
            for i in free:
                clear(i)
            have = {k: i for k, i in have.items() if k in keep}
            if not free:
                raise RuntimeError(f"{table} full")
        i = free.pop()
        install(i, key)
        have[key] = i
    return have
