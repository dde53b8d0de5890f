"""Where sessions live.  Each backend is one module; optional dependencies load on first use.

=================  ============================================================
``MemoryStore``    this process only; tests and throwaway bots
``JSONFileStore``  one JSON file per key; threads and processes on one host
``ShelveStore``    one ``shelve`` database; small bots on one host
``SQLiteStore``    one SQLite database (WAL); production on one host
``RedisStore``     Redis or Valkey (one server, Sentinel, Cluster); many machines
``PostgresStore``  a PostgreSQL table; many processes on many machines
=================  ============================================================
"""
from typing import TYPE_CHECKING, Any

from .base import Store
from .memory import MemoryStore
from .url import from_url

if TYPE_CHECKING:  # pragma: no cover
    from .jsonfile import JSONFileStore
    from .postgres import PostgresStore
    from .redis import RedisStore
    from .shelf import ShelveStore
    from .sqlite import SQLiteStore

__all__ = ["Store", "MemoryStore", "JSONFileStore", "ShelveStore", "SQLiteStore", "RedisStore", "PostgresStore",
           "from_url"]

_LAZY = {
    "JSONFileStore": ".jsonfile",
    "ShelveStore": ".shelf",
    "SQLiteStore": ".sqlite",
    "RedisStore": ".redis",
    "PostgresStore": ".postgres",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> "list[str]":
    return sorted(__all__)
