"""Shared fixtures: stores of every kind, and a guard that every test leaves no session bound or key locked."""
import os
import uuid

import pytest

from telesession import context, locking

REQUIRE_REDIS = os.environ.get("TELESESSION_REQUIRE_REDIS") == "1"

#: Every store kind; PERSISTENT ones survive the process and are shared between processes.
STORE_KINDS = ["memory", "json", "shelve", "sqlite", "redis", "postgres"]
PERSISTENT_KINDS = ["json", "shelve", "sqlite", "redis", "postgres"]


def _store_url(request: pytest.FixtureRequest, kind: str, tmp_path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "json":
        return f"json:{tmp_path / 'sessions'}"
    if kind == "shelve":
        return f"shelve:{tmp_path / 'shelf' / 'sessions'}"
    if kind == "sqlite":
        return f"sqlite:{tmp_path / 'sessions.sqlite'}"
    if kind == "redis":
        base = request.getfixturevalue("redis_url")
        return f"{base}?prefix=test-{uuid.uuid4().hex[:8]}:"
    if kind == "postgres":  # a fresh table, dropped after the test
        return request.getfixturevalue("postgres_store_url")
    raise ValueError(kind)


@pytest.fixture(params=STORE_KINDS)
def store_url(request, tmp_path) -> str:
    """A fresh, empty store of each kind, as a URL (``from_url`` opens it, in any process)."""
    return _store_url(request, request.param, tmp_path)


@pytest.fixture(params=PERSISTENT_KINDS)
def shared_store_url(request, tmp_path) -> str:
    """A fresh store of each kind that several processes can share."""
    return _store_url(request, request.param, tmp_path)


@pytest.fixture(autouse=True)
def no_leftover_sessions():
    """Fail any test that leaves a session bound in this thread or a key locked in this process."""
    yield
    assert context.active_frames() == (), "a session is still bound after the test"
    assert locking.held_keys() == [], f"keys still locked after the test: {locking.held_keys()}"


# ---- Redis fixtures (owned by tests/redis_server.py) --------------------------------------
# redis_server (session: a real redis-server, .stop()/.start()/.restart()), redis_url (its
# redis://127.0.0.1:PORT/0) and redis_store_url (the same with a fresh ?prefix= per test).
try:
    from .redis_server import (redis_cluster, redis_sentinel, redis_server, redis_store_url,  # noqa: F401
                               redis_url, valkey_server)
except ImportError:  # tests/ is not a package: pytest put this directory on sys.path
    from redis_server import (redis_cluster, redis_sentinel, redis_server, redis_store_url,  # noqa: F401
                              redis_url, valkey_server)
# ---- end of Redis fixtures ------------------------------------------------------------------

# ---- PostgreSQL fixtures (owned by tests/postgres_server.py) -------------------------------
# postgres_server (session: a real PostgreSQL started by PID, .stop()/.start()/.restart()),
# postgres_url (postgresql://telesession@127.0.0.1:PORT/telesession) and postgres_store_url
# (the same with a fresh ?table= per test, dropped afterwards).
try:
    from .postgres_server import postgres_server, postgres_store_url, postgres_url  # noqa: F401
except ImportError:  # tests/ is not a package: pytest put this directory on sys.path
    from postgres_server import postgres_server, postgres_store_url, postgres_url  # noqa: F401
# ---- end of PostgreSQL fixtures -------------------------------------------------------------
