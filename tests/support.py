"""Helpers shared by the tests: waiting for telebot's worker pool, child processes on a store."""
import threading
from typing import Any

from telesession import Sessions, session
from telesession.stores import from_url


def drain(bot: Any, timeout: float = 60.0) -> None:
    """Wait until every task queued on ``bot``'s worker pool so far has finished.

    telebot's ``tasks.join()`` never returns (workers never call ``task_done``), so
    queue one barrier task per worker: when all of them are inside the barrier,
    every task queued before them has finished, post_process included.
    """
    workers = len(bot.worker_pool.workers)
    barrier = threading.Barrier(workers + 1, timeout=timeout)
    for _ in range(workers):
        bot.worker_pool.put(barrier.wait)
    barrier.wait()


def increment_in_process(url: str, key: str, times: int, lock_timeout: float = 60.0) -> int:
    """Child-process body: add 1 to ``session["count"]`` of ``key`` ``times`` times."""
    sessions = Sessions(from_url(url), initial=lambda: {"count": 0}, lock_timeout=lock_timeout)
    for _ in range(times):
        with sessions.open(key):
            session["count"] += 1
    return times


def hold_key(url: str, key: str, ready: Any, seconds: float, **store_options: Any) -> None:
    """Child-process body: hold ``key`` for ``seconds`` (or until killed) after setting ``ready``."""
    import time

    sessions = Sessions(from_url(url, **store_options))
    with sessions.open(key):
        ready.set()
        time.sleep(seconds)
