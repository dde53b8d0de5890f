"""Resources stay flat however many chats pass through: lock entries, memory, descriptors, threads."""
import gc
import json
import os
import shutil
import tempfile
import threading
import tracemalloc
from collections import Counter

import pytest

from telesession import Sessions, context
from telesession.locking import ACQUIRED, KeyLocks, key_locks_for
from telesession.stores import JSONFileStore, MemoryStore, SQLiteStore
from telesession.stores.jsonfile import key_to_filename


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_million_keys_through_the_lock_registry_leave_nothing_behind():
    locks = KeyLocks()
    gc.collect()
    rss_before = _rss()
    per_thread = 250_000

    def churn(offset: int) -> None:
        for i in range(offset, offset + per_thread):
            key = f"chat-{i}"
            assert locks.acquire(key, 5.0) == ACQUIRED
            locks.release(key)

    threads = [threading.Thread(target=churn, args=(n * per_thread,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(locks) == 0 and locks.held() == []
    gc.collect()
    # a leak of one small entry per key would be 100+ MB here
    assert _rss() - rss_before < 16 * 1024 * 1024, (rss_before, _rss())


def test_lock_registry_memory_peak_stays_flat():
    locks = KeyLocks()
    for i in range(1000):  # warm up the dict and the allocator
        locks.acquire(f"warm-{i}", 1.0)
        locks.release(f"warm-{i}")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for i in range(200_000):
            key = f"chat-{i}"
            locks.acquire(key, 1.0)
            locks.release(key)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(locks) == 0
    assert current - base < 16 * 1024, current - base
    assert peak - base < 64 * 1024, peak - base


def test_contended_keys_leave_no_entries():
    locks = KeyLocks()
    errors = []

    def work(n: int) -> None:
        try:
            for i in range(20_000):
                key = f"hot-{(i * 7 + n) % 50}"
                assert locks.acquire(key, 10.0) == ACQUIRED
                locks.release(key)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(locks) == 0


def test_a_hundred_thousand_read_only_sessions_leave_nothing_behind():
    store = MemoryStore()
    sessions = Sessions(store, initial=lambda: {"count": 0})
    for i in range(1000):
        with sessions.open(f"warm-{i}") as s:
            assert s["count"] == 0
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for i in range(100_000):
            with sessions.open(f"chat-{i}") as s:
                assert s["count"] == 0
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(store.keys()) == [], "an untouched session must not be written"
    assert len(key_locks_for(store.location)) == 0
    assert context.active_frames() == ()
    assert current - base < 32 * 1024, current - base
    assert peak - base < 256 * 1024, peak - base


@pytest.fixture
def fast_dir(tmp_path):
    """A directory on tmpfs when there is one (10x faster renames; leaks are the point, not disks)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        directory = tempfile.mkdtemp(prefix="telesession-resources-", dir="/dev/shm")
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    else:
        yield str(tmp_path)


@pytest.mark.parametrize("kind", ["json", "sqlite"])
def test_twenty_thousand_updates_leak_no_descriptors_or_threads(kind, fast_dir):
    if kind == "json":  # fsync only costs time here; descriptors and threads are the point
        store = JSONFileStore(os.path.join(fast_dir, "sessions"), fsync=False)
    else:
        store = SQLiteStore(os.path.join(fast_dir, "sessions.sqlite"))
    sessions = Sessions(store, initial=lambda: {"count": 0})
    keys = [f"chat-{i}" for i in range(500)]
    updates = 0

    def update(n: int) -> None:
        with sessions.open(keys[n % len(keys)]) as s:
            s["count"] += 1

    def short_lived(first: int, count: int) -> None:
        for n in range(first, first + count):
            update(n)

    def threads_in_batches(batches: int, per_thread: int) -> int:
        for batch in range(batches):  # threads that come and go (jobs, a resized pool), 4 at a time
            group = [threading.Thread(target=short_lived, args=((batch * 4 + j) * per_thread, per_thread))
                     for j in range(4)]
            for t in group:
                t.start()
            for t in group:
                t.join()
        return batches * 4 * per_thread

    # warm up: the lock file, this thread's connection, short-lived threads' connections
    for n in range(100):
        update(n)
    updates = 100 + threads_in_batches(2, 10)
    gc.collect()
    fds, threads = _fds(), set(threading.enumerate())  # (threads of earlier tests may still be ending)

    for n in range(10_000):  # one long-lived thread, like a bot's worker
        update(n)
    updates += 10_000 + threads_in_batches(25, 100)  # 100 short-lived threads
    gc.collect()

    assert [t for t in threading.enumerate() if t not in threads] == []  # no thread of ours is left
    if kind == "json":
        assert _fds() == fds, sorted(os.listdir("/proc/self/fd"))
    else:
        # A thread's connection is closed when the thread ends, but SQLite's unix VFS defers
        # close() of a database descriptor while another connection of the process holds POSIX
        # locks on the file, and reuses such descriptors for the next connection: at most one
        # per thread that ran at the same time (4), never one per thread (100 x 3 if leaked).
        assert _fds() - fds <= 4, (fds, sorted(os.listdir("/proc/self/fd")))
    total = 0
    for key in keys:
        with sessions.open(key) as s:
            total += s["count"]
    assert total == updates == 20_180
    if kind == "sqlite":
        store.close()
        gc.collect()
        assert _fds() < fds, "closing the store must release its descriptors"


def test_temp_files_of_several_store_objects_on_one_directory_never_collide(fast_dir):
    managers = [Sessions(JSONFileStore(os.path.join(fast_dir, "sessions"), fsync=False),
                         initial=lambda: {"count": 0}) for _ in range(4)]
    errors, done = [], Counter()

    def work(n: int) -> None:
        sessions = managers[n % len(managers)]
        for i in range(1500):
            key = f"chat-{n}-{i % 3}"
            try:
                with sessions.open(key) as s:
                    s["count"] += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                done[key] += 1

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    directory = os.path.join(fast_dir, "sessions")
    assert [n for n in os.listdir(directory) if n.endswith(".tmp")] == []
    for key, count in done.items():  # every file holds its own key's record, with every increment
        with open(os.path.join(directory, key_to_filename("session:" + key)), "rb") as f:
            record = json.loads(f.read())
        assert (record["key"], record["data"]["count"]) == ("session:" + key, count)
    assert errors == [], f"{len(errors)} of {8 * 1500} saves failed, e.g. {sorted(set(errors))[:3]}"
