"""``from_url``: a store from one string, for configuration files and the CLI."""
from typing import Any
from urllib.parse import unquote

from .base import Store
from .redact import scrub

__all__ = ["from_url", "scrub", "SCHEMES"]

SCHEMES = ("memory://, json:PATH, shelve:PATH, sqlite:PATH, redis://HOST:PORT/DB?prefix=P&lease=S, rediss://..., "
           "redis+cluster://HOST:PORT[,HOST:PORT...], redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB], "
           "valkey://..., valkeys://..., "
           "postgresql://USER@HOST:PORT/DB?table=T")


def from_url(url: str, **options: Any) -> Store:
    """Open the store that ``url`` names; ``options`` go to the store's constructor.

    ``memory://``, ``json:PATH``, ``shelve:PATH``, ``sqlite:PATH`` (``sqlite:///abs/path``
    works too), ``redis://[:password@]host:port/db?prefix=...&lease=SECONDS``, ``rediss://``
    for TLS, ``redis+cluster://HOST:PORT[,HOST:PORT...]``,
    ``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`` and the same with
    ``valkey``/``valkeys`` (see ``RedisStore``), and
    ``postgresql://user:password@host:port/db?table=T&max_size=N`` (``postgres://`` too).
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"not a store URL: {scrub(url)!r}; use one of {SCHEMES}")
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(**options)
    if scheme in ("json", "shelve", "sqlite"):
        path = unquote(rest[2:] if rest.startswith("//") else rest)
        if not path:
            raise ValueError(f"store URL {scrub(url)!r} names no path; use e.g. {scheme}:data/sessions")
        if scheme == "json":
            from .jsonfile import JSONFileStore

            return JSONFileStore(path, **options)
        if scheme == "shelve":
            from .shelf import ShelveStore

            return ShelveStore(path, **options)
        from .sqlite import SQLiteStore

        return SQLiteStore(path, **options)
    if scheme.split("+", 1)[0] in ("redis", "rediss", "unix", "valkey", "valkeys"):
        from .redis import RedisStore

        return RedisStore(url, **options)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(url, **options)
    raise ValueError(f"unknown store URL scheme {scheme!r} in {scrub(url)!r}; use one of {SCHEMES}")
