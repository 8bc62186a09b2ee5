"""forkproxy: a prefork gevent HTTP/HTTPS reverse proxy."""

__version__ = "0.1.0"
