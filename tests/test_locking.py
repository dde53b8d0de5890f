"""``KeyLocks``: one owner per key among threads, without a registry-wide mutex."""
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from telesession.locking import ACQUIRED, REENTERED, KeyLocks


def test_one_owner_per_key_under_heavy_contention():
    locks = KeyLocks()
    inside: Counter = Counter()
    totals: Counter = Counter()
    overlaps = []
    errors = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(3000):
                key = f"k{(i + n) % 3}"  # 8 threads on 3 keys: almost every acquire contends
                assert locks.acquire(key, 30.0) == ACQUIRED
                try:
                    inside[key] += 1
                    if inside[key] != 1:
                        overlaps.append(key)
                    value = totals[key]
                    time.sleep(0) if i % 7 == 0 else None  # hand the GIL over inside the section
                    totals[key] = value + 1
                    inside[key] -= 1
                finally:
                    locks.release(key)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and overlaps == []
    assert sum(totals.values()) == 8 * 3000  # no lost update: the sections never overlapped
    assert len(locks) == 0 and locks.held() == []


def test_no_wake_up_is_lost_when_threads_switch_at_every_step():
    """A waiter appends its lock and re-checks the entry; the holder unregisters, then wakes.

    With the interpreter switching threads every microsecond, every interleaving of those
    steps happens thousands of times; a lost wake-up would leave a waiter asleep until its
    timeout (acquire returns 0), so every acquire must succeed.
    """
    locks = KeyLocks()
    failed = []
    count = [0]
    start = threading.Barrier(6)

    def work() -> None:
        start.wait()
        for _ in range(4000):
            if locks.acquire("one", 20.0) != ACQUIRED:
                failed.append("timed out")
                return
            count[0] += 1
            locks.release("one")

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(previous)
    assert failed == [] and count[0] == 6 * 4000 and len(locks) == 0


def test_timeout_reentry_and_release_by_owner_only():
    locks = KeyLocks()
    assert locks.acquire("a", 1.0) == ACQUIRED
    assert locks.acquire("a", 1.0) == REENTERED
    assert locks.holds("a")
    results = []

    def other() -> None:
        results.append(locks.holds("a"))
        t0 = time.monotonic()
        results.append(locks.acquire("a", 0.2))
        results.append(time.monotonic() - t0)
        try:
            locks.release("a")
        except RuntimeError as exc:
            results.append(str(exc))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    held, got, waited, refused = results
    assert held is False and got == 0 and waited >= 0.19
    assert "not held by this thread" in refused
    assert locks.held() == ["a"]  # a waiter that timed out leaves nothing behind ...
    assert len(locks._entries["a"]) == 2  # ... not even its lock in the holder's entry
    other = threading.Thread(target=lambda: results.append(locks.acquire("a", 0)))
    other.start()
    other.join()
    assert results[-1] == 0 and len(locks._entries["a"]) == 2  # a try-lock appends nothing either
    locks.release("a")
    assert locks.held() == ["a"]  # still held once (re-entered twice)
    locks.release("a")
    assert len(locks) == 0


def test_waiters_all_get_the_key_in_turn_after_the_holder_lets_go():
    locks = KeyLocks()
    assert locks.acquire("hot", 1.0) == ACQUIRED
    got = []
    ready = threading.Barrier(6)

    def waiter(n: int) -> None:
        ready.wait()
        assert locks.acquire("hot", 10.0) == ACQUIRED
        got.append(n)
        time.sleep(0.005)
        locks.release("hot")

    threads = [threading.Thread(target=waiter, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.05)  # every waiter is blocked on the holder's entry now
    assert got == []
    locks.release("hot")
    for t in threads:
        t.join(10)
    assert sorted(got) == list(range(5)) and len(locks) == 0


_FORK_PROBE = r'''
import gc, os, sys
from telesession import Sessions
from telesession.errors import LockTimeout
from telesession.stores import SQLiteStore

path = sys.argv[1]
sessions = Sessions(SQLiteStore(path), lock_timeout=0.5)

def probe():
    pid = os.fork()
    if pid == 0:
        try:
            with Sessions(SQLiteStore(path), lock_timeout=0.5).open("K"):
                print("GOT", flush=True)
        except LockTimeout:
            print("LOCKED", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)

with sessions.open("K") as s:  # a handler holds K and forks a worker process
    s["n"] = 1
    child = os.fork()
    if child == 0:  # the child drops the parent's scope, uses the store, collects garbage
        gc.collect()
        with sessions.open("other"):
            pass
        gc.collect()
        os._exit(0)
    os.waitpid(child, 0)
    probe()  # the handler still holds K: a third process must not get it
'''


@pytest.mark.parametrize("backend", ["posix", "filelock"])
def test_a_forked_child_never_frees_its_parents_key(tmp_path, backend):
    """A child that inherited a held key (and drops it) leaves it locked for the parent."""
    env = dict(os.environ, TELESESSION_LOCKS=backend)
    result = subprocess.run([sys.executable, "-c", _FORK_PROBE, str(tmp_path / "s.db")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LOCKED"], result.stdout + result.stderr


def _ask_whether_alone_in_child(path, asking, opened, result):
    import fcntl

    from telesession.locking import PRESENCE_OFFSET, RangeLockFile

    lock_file = RangeLockFile(path)
    fcntl.lockf(lock_file._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, PRESENCE_OFFSET)  # mid-question
    asking.set()
    time.sleep(0.2)  # the parent opens the file now, and must wait for the answer
    fcntl.lockf(lock_file._fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, PRESENCE_OFFSET)  # answered: shared again
    opened.wait(30)
    result.value = 1 if lock_file._check_alone() else 2


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX record locks")
def test_a_process_that_opens_the_lock_file_while_another_asks_is_still_seen(tmp_path):
    """Opening the lock file marks the process present even while another process holds the
    presence byte for a moment to ask whether it is alone; otherwise the other would go on
    taking itself to be alone, and skipping the writer byte, until this one next wrote."""
    import multiprocessing

    from telesession.locking import RangeLockFile

    path = str(tmp_path / "store.lock")
    ctx = multiprocessing.get_context("spawn")
    asking, opened, result = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    child = ctx.Process(target=_ask_whether_alone_in_child, args=(path, asking, opened, result))
    child.start()
    try:
        assert asking.wait(60)
        lock_file = RangeLockFile(path)  # waits out the child's question, then holds its shared byte
        try:
            assert lock_file._alone is False  # the child is there
            opened.set()
            child.join(30)
            assert child.exitcode == 0 and result.value == 2  # and the child sees us
        finally:
            os.close(lock_file._fd)
    finally:
        opened.set()
        child.join(30)



def _try_store_lock_in_child(path, result):
    from telesession.locking import range_lock_file_for

    lock_file = range_lock_file_for(path)
    got = lock_file.acquire(None, 0)
    result.value = 1 if got else 2
    if got:
        lock_file.release(None)


@pytest.mark.parametrize("backend", ["posix", "filelock"])
def test_the_whole_store_lock_excludes_the_other_threads_of_the_process(tmp_path, monkeypatch, backend):
    """A POSIX record lock belongs to the process: without a mutex in front of it a second
    thread would "take" the store-wide lock its neighbour holds, and its release would drop
    it for both, letting another process in (two SQLite stores' stamp series then collide)."""
    import multiprocessing

    from telesession import locking

    monkeypatch.setenv(locking.LOCKS_ENV, backend)
    path = str(tmp_path / "store.lock")
    lock_file = locking.range_lock_file_for(path)
    assert lock_file.acquire(None, 1)
    try:
        other = []
        thread = threading.Thread(target=lambda: other.append(lock_file.acquire(None, 0.2)))
        thread.start()
        thread.join(10)
        assert other == [False]
        ctx = multiprocessing.get_context("spawn")
        result = ctx.Value("i", 0)
        child = ctx.Process(target=_try_store_lock_in_child, args=(path, result))
        child.start()
        child.join(60)
        assert child.exitcode == 0 and result.value == 2  # still ours
    finally:
        lock_file.release(None)
    assert lock_file.acquire(None, 1)  # and free again
    lock_file.release(None)
