"""Client protocols beyond HTTP/1.1, registered by the modules that serve them.

forkproxy/worker/h2plugin.py registers HTTP/2 when it is imported, and the master imports
it only for configs that use HTTP/2 (forkproxy/master/features.py). A worker of any
other config carries neither the HTTP/2 modules nor libnghttp2 and its cffi binding.
"""

from __future__ import annotations

#: protocol -> the connection class that adopts an accepted client connection
#: (``"h2"``: ``Http2Connection``); empty without HTTP/2 (or without libnghttp2)
CONNECTIONS: dict[str, type] = {}
#: protocol -> the bytes a client opens a cleartext connection with (``"h2c"``)
PREFACES: dict[str, bytes] = {}


def http2_available() -> bool:
    """True when this process can serve HTTP/2 to clients."""
    return "h2" in CONNECTIONS
