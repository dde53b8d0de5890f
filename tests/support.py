"""Helpers shared by the tests: waiting for telebot's worker pool, child processes on a store."""
import contextlib
import json
import threading
import time
from typing import Any, Iterator, Optional

from telesession import Sessions, session
from telesession.stores import from_url
from telesession.testing import drain  # noqa: F401  (the tests import it from here)


@contextlib.contextmanager
def held_in_another_thread(sessions: Sessions, key: str) -> Iterator[None]:
    """While the block runs, another thread of this process holds ``key``'s session."""
    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with sessions.open(key):
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(10), f"the holder thread never got {key!r}"
        yield
    finally:
        leave.set()
        thread.join()


def increment_in_process(url: str, key: str, times: int, lock_timeout: float = 60.0) -> int:
    """Child-process body: add 1 to ``session["count"]`` of ``key`` ``times`` times."""
    sessions = Sessions(from_url(url), initial=lambda: {"count": 0}, lock_timeout=lock_timeout)
    for _ in range(times):
        with sessions.open(key):
            session["count"] += 1
    return times


def hold_key(url: str, key: str, ready: Any, seconds: float, bot: Any = None, **store_options: Any) -> None:
    """Child-process body: hold ``key`` for ``seconds`` (or until killed) after setting ``ready``
    (``bot``: the manager is bound to that bot, as ``setup(bot)`` would)."""
    import time

    sessions = Sessions(from_url(url, **store_options))
    if bot is not None:
        sessions.bind(bot)
    with sessions.open(key):
        ready.set()
        time.sleep(seconds)


# -- store-level helpers: what the manager does, by hand, below it -----------------------

def record(key: str, count: int) -> bytes:
    """A record whose session is ``{"count": count}``."""
    return json.dumps({"version": 0, "written": time.time(), "key": key,
                       "data": {"count": count}}).encode()


def increment(store: Any, key: str, timeout: float = 30.0) -> None:
    """One update the way the manager does it: lock, load, change, conditional save, unlock."""
    token = store.acquire(key, timeout)
    try:
        raw = store.load(key)
        count = 0 if raw is None else json.loads(raw)["data"]["count"]
        store.save(key, record(key, count + 1), previous=raw)
    finally:
        store.release(key, token)


def count_of(store: Any, key: str) -> Optional[int]:
    raw = store.load(key)
    return None if raw is None else json.loads(raw)["data"]["count"]


def increments_in_child(url_or_store: Any, key: str, times: int, barrier: Any) -> None:
    """Child-process body: ``times`` increments of ``key`` and of 8 spread keys, after ``barrier``."""
    store = from_url(url_or_store) if isinstance(url_or_store, str) else url_or_store
    barrier.wait(60)
    for i in range(times):
        increment(store, key)
        increment(store, f"spread-{i % 8}")  # writers of different keys run in parallel
    store.close()


#: The start of a ``python -c`` script (argv[2]: n) that SIGKILLs itself just before the n-th
#: file operation made while ``armed`` is true, counting them in ``seen`` (audit hooks: this
#: does not depend on how a store or the dbm module under it is written).
KILL_BEFORE_FILE_OPERATION = r"""
import os, signal, sys

kill_at = int(sys.argv[2])
EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.truncate", "os.mkdir",
          "os.link", "os.symlink", "os.utime", "shutil.move"}
seen = []
armed = False

def hook(event, args):
    if armed and event in EVENTS:
        seen.append(event)
        if len(seen) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
"""
