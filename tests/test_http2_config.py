"""Issue 14: the listener `protocols` key and the [http2] table (forkproxy/config.py)."""

from __future__ import annotations

import pytest

from forkproxy import config

UPSTREAM = '[upstream.a]\nservers = [{ address = "127.0.0.1:9" }]\n'


def _load(listener: str, extra: str = "", tls: str = "") -> config.Config:
    text = f'[[listener]]\nlisten = "127.0.0.1:1"\nupstream = "a"\n{listener}\n{tls}\n{extra}\n'
    return config.loads(text + UPSTREAM, check_files=False)


TLS = '[listener.tls]\ncertificates = [{ cert = "c.pem", key = "k.pem" }]'


def test_defaults_per_listener_kind():
    assert config.listener_protocols(_load("").listener[0]) == ("http/1.1",)
    assert config.listener_protocols(_load("", tls=TLS).listener[0]) == ("h2", "http/1.1")
    cfg = _load('protocols = ["http/1.1", "h2c"]')
    assert config.listener_protocols(cfg.listener[0]) == ("http/1.1", "h2c")
    h2 = _load("").http2
    assert (h2.max_concurrent_streams, h2.max_header_list_size, h2.reset_burst) == (128, 32768, 200)


def test_former_alpn_key_still_works():
    cfg = _load("", tls=TLS + '\nalpn = ["http/1.1"]')
    assert config.listener_protocols(cfg.listener[0]) == ("http/1.1",)


@pytest.mark.parametrize("listener,tls,extra,message", [
    ('protocols = ["h2"]', "", "", "listener[0].protocols: 'h2' needs [listener.tls]"),
    ('protocols = ["h2c"]', TLS, "", "listener[0].protocols: 'h2c' is HTTP/2 without TLS"),
    ("protocols = []", "", "", "listener[0].protocols: at least one protocol is required"),
    ('protocols = ["http/1.1", "http/1.1"]', "", "", "a protocol is listed twice"),
    ('protocols = ["spdy/3"]', "", "", "listener[0].protocols[0]: Invalid enum value"),
    ('protocols = ["h2"]', TLS + '\nalpn = ["h2"]', "", "former name of listener[0].protocols"),
    ("", "", '[http2]\nmax_frame_size = "1k"', "http2.max_frame_size: must be 16k"),
    ("", "", "[http2]\nmax_concurrent_streams = 0", "http2.max_concurrent_streams"),
    ("", "", "[http2]\nflood = 1", "http2.flood: unknown key"),
])
def test_bad_values_name_the_key(listener, tls, extra, message):
    with pytest.raises(config.ConfigError) as info:
        _load(listener, extra, tls)
    assert message in str(info.value), str(info.value)
