"""One contract, every store: exact totals under threads and processes, hostile keys, bad data, permissions."""
import json
import multiprocessing
import os
import signal
import stat
import threading
import time

import pytest
from conftest import PERSISTENT_KINDS, STORE_KINDS, _store_url
from support import count_of, hold_key, increment, increment_in_process, increments_in_child

from telesession import Sessions, locking, session
from telesession.locking_portable import PortableLockFile
from telesession.errors import CorruptSessionError, LockTimeout, SerializationError
from telesession.records import build_record
from telesession.stores import from_url

HOSTILE_KEYS = ["../x", "/", "\\", ".", "..", "", "a/../../b", "C:\\evil", "ключ-🔑", "Ab", "ab", "a" * 300,
                "é" * 300, "lock:x", "x", "%2F", "s:x", "~", " ", "\t\n", "-1001234567890:42"]

fork = multiprocessing.get_context("fork")

#: The file stores again, with the portable ``filelock`` backend forced (as on Windows).
PORTABLE_KINDS = ["json+filelock", "shelve+filelock", "sqlite+filelock"]


def _url_with_locks(request, kind: str, tmp_path, monkeypatch) -> str:
    base, _, locks = kind.partition("+")
    if locks:  # children inherit the environment, forked or spawned
        monkeypatch.setenv(locking.LOCKS_ENV, locks)
    return _store_url(request, base, tmp_path)


@pytest.fixture(params=STORE_KINDS + PORTABLE_KINDS)
def store_url(request, tmp_path, monkeypatch) -> str:
    """conftest's stores of every kind, plus the file stores on the portable lock backend."""
    return _url_with_locks(request, request.param, tmp_path, monkeypatch)


@pytest.fixture(params=PERSISTENT_KINDS + PORTABLE_KINDS)
def shared_store_url(request, tmp_path, monkeypatch) -> str:
    """conftest's shared stores, plus the file stores on the portable lock backend."""
    return _url_with_locks(request, request.param, tmp_path, monkeypatch)


def sessions_for(url: str, **options) -> Sessions:
    options.setdefault("initial", lambda: {"count": 0})
    return Sessions(from_url(url), **options)


def test_threads_on_one_key_lose_nothing(store_url):
    sessions = sessions_for(store_url)
    threads_n, per_thread = 16, 40

    def work():
        for _ in range(per_thread):
            with sessions.open("hot"):
                session["count"] += 1

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sessions.open("hot") as s:
        assert s["count"] == threads_n * per_thread


def test_processes_on_one_key_lose_nothing(shared_store_url):
    procs, per_proc = 4, 60
    with fork.Pool(procs) as pool:
        done = pool.starmap(increment_in_process, [(shared_store_url, "hot", per_proc)] * procs)
    assert done == [per_proc] * procs
    with sessions_for(shared_store_url).open("hot") as s:
        assert s["count"] == procs * per_proc


def test_store_level_threads_lose_nothing(store_url):
    """Below the manager: acquire, load, conditional save, release, by hand."""
    store = from_url(store_url)
    threads_n, per_thread = 16, 25
    barrier = threading.Barrier(threads_n)
    errors = []

    def work():
        try:
            barrier.wait(10)
            for _ in range(per_thread):
                increment(store, "counter")
        except Exception as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert errors == []
    assert count_of(store, "counter") == threads_n * per_thread
    store.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_store_level_processes_lose_nothing(shared_store_url, method):
    """4 processes; forked ones reuse the parent's store object (its connections must not be shared)."""
    ctx = multiprocessing.get_context(method)
    processes, per_process = 4, 25
    barrier = ctx.Barrier(processes)
    expected, parent, target = processes * per_process, None, shared_store_url
    if method == "fork":
        parent = target = from_url(shared_store_url)
        increment(parent, "counter")
        expected += 1
    children = [ctx.Process(target=increments_in_child, args=(target, "counter", per_process, barrier))
                for _ in range(processes)]
    for c in children:
        c.start()
    for c in children:
        c.join(120)
    assert [c.exitcode for c in children] == [0] * processes
    check = from_url(shared_store_url)
    assert count_of(check, "counter") == expected
    assert sum(count_of(check, f"spread-{i}") for i in range(8)) == processes * per_process
    check.close()
    if parent is not None:
        assert count_of(parent, "counter") == expected  # the parent's own connections still work
        parent.close()


def test_processes_and_threads_together(shared_store_url):
    sessions = sessions_for(shared_store_url)
    with fork.Pool(2) as pool:
        result = pool.starmap_async(increment_in_process, [(shared_store_url, "k", 50)] * 2)

        def work():
            for _ in range(25):
                with sessions.open("k"):
                    session["count"] += 1

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert result.get(120) == [50, 50]
    with sessions.open("k") as s:
        assert s["count"] == 200


def test_hostile_keys_stay_distinct_and_inside(store_url, tmp_path):
    sessions = sessions_for(store_url)
    for i, key in enumerate(HOSTILE_KEYS):
        with sessions.open(key) as s:
            s["count"] = i + 1
    for i, key in enumerate(HOSTILE_KEYS):
        with sessions.open(key) as s:
            assert s["count"] == i + 1, key
    assert sorted(sessions.store.keys()) == sorted("session:" + k for k in HOSTILE_KEYS)
    assert sorted(sessions.keys()) == sorted(HOSTILE_KEYS)
    directory = getattr(sessions.store, "directory", None)
    if directory is not None:  # a file per key: all of them directly inside the store's directory
        created = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files]
        records = [p for p in created if p.endswith(".json")]
        assert len(records) == len(HOSTILE_KEYS)
        lock_files = sessions.store.lock_path + ".d"  # the portable backend's, named by a hash of the key
        assert all(os.path.dirname(p) in (directory, lock_files) for p in created), created


def test_unserializable_value_leaves_store_unchanged(store_url):
    sessions = sessions_for(store_url)
    with sessions.open("1"):
        session["count"] = 1
    before = sessions.store.load("session:1")
    assert before is not None
    with pytest.raises(SerializationError, match=r'session\["cart"\]\[2\]'):
        with sessions.open("1"):
            session["count"] = 2
            session["cart"] = [1, 2, {3}]
    assert sessions.store.load("session:1") == before


def test_corrupt_record_raises_and_is_not_overwritten(store_url):
    sessions = sessions_for(store_url)
    sessions.store.save("session:bad", b"\x80not json{")
    with pytest.raises(CorruptSessionError) as info:
        with sessions.open("bad"):
            session["count"] = 1
    assert "'session:bad'" in str(info.value) and sessions.store.describe("session:bad") in str(info.value)
    assert sessions.store.load("session:bad") == b"\x80not json{"


def test_delete_and_keys(store_url):
    sessions = sessions_for(store_url)
    for key in ("a", "b", "c"):
        with sessions.open(key) as s:
            s["count"] = 1
    with sessions.open("b") as s:
        s.delete()
    assert sorted(sessions.store.keys()) == ["session:a", "session:c"]
    assert sorted(sessions.keys()) == ["a", "c"]
    assert sessions.store.load("session:b") is None
    sessions.store.delete("missing")  # no error


def test_expiry_and_migration_work_on_every_store(store_url):
    store = from_url(store_url)
    store.save("session:old", build_record("session:old", '{"n":4}', 0, time.time()))
    store.save("session:stale", build_record("session:stale", '{"count":9,"lang":"x"}', 1, time.time() - 3600))
    sessions = Sessions(store, initial=lambda: {"count": 0, "lang": "en"}, ttl=60, version=1,
                        migrations={1: lambda d: {"count": d["n"], "lang": "en"}})
    with sessions.open("old") as s:
        assert s == {"count": 4, "lang": "en"}
    with sessions.open("stale") as s:
        assert s == {"count": 0, "lang": "en"}
    assert json.loads(store.load("session:old"))["version"] == 1


@pytest.mark.parametrize("kind", ["json", "shelve"])
def test_files_are_owner_only(kind, tmp_path):
    url = {"json": f"json:{tmp_path / 'j'}", "shelve": f"shelve:{tmp_path / 's' / 'db'}"}[kind]
    old = os.umask(0)
    try:
        sessions = sessions_for(url)
        with sessions.open("1") as s:
            s["count"] = 1
    finally:
        os.umask(old)
    created = [os.path.join(root, f) for root, _, files in os.walk(tmp_path) for f in files]
    assert created
    for path in created:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path


def test_other_process_holding_a_key_times_out_then_a_killed_holder_frees_it(shared_store_url):
    ready = fork.Event()
    # A Redis lock outlives its dead holder until its lease runs out: make that short here.
    options = {"lease": 1.0} if shared_store_url.startswith("redis") else {}
    holder = fork.Process(target=hold_key, args=(shared_store_url, "k", ready, 60), kwargs=options)
    holder.start()
    try:
        assert ready.wait(30)
        sessions = sessions_for(shared_store_url, lock_timeout=0.3)
        with pytest.raises(LockTimeout, match="'session:k'"):
            with sessions.open("k"):
                pass
        with sessions.open("other"):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        started = time.monotonic()
        sessions = sessions_for(shared_store_url, lock_timeout=10)
        with sessions.open("k") as s:
            s["count"] += 1
        assert time.monotonic() - started < 5  # the dead holder's lock did not linger
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()


@pytest.mark.parametrize("kind", PORTABLE_KINDS)
def test_forced_portable_backend_is_the_one_used(kind, tmp_path, monkeypatch):
    url = _url_with_locks(None, kind, tmp_path, monkeypatch)
    sessions = sessions_for(url)
    with sessions.open("k") as s:
        s["count"] += 1
        lock_file = sessions.store._process_lock_file("k")
        assert isinstance(lock_file, PortableLockFile)
        held = lock_file.file_of(locking.key_offset(sessions._stored_key("k")))
        assert os.path.exists(held)  # the key's own lock file, beside the store's lock path
        assert lock_file.directory == sessions.store.lock_path + ".d"


def test_without_fcntl_the_portable_backend_is_chosen_never_none(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "fcntl", None)
    monkeypatch.delenv(locking.LOCKS_ENV, raising=False)
    assert locking.lock_backend() == "filelock"
    assert isinstance(locking.range_lock_file_for(str(tmp_path / "x.lock")), PortableLockFile)
    with pytest.raises(RuntimeError, match="record locks"):
        locking.RangeLockFile(str(tmp_path / "y.lock"))
    monkeypatch.setenv(locking.LOCKS_ENV, "posix")
    with pytest.raises(RuntimeError, match="no POSIX record locks"):
        locking.lock_backend()


def test_unknown_lock_backend_is_refused(monkeypatch):
    monkeypatch.setenv(locking.LOCKS_ENV, "flock")
    with pytest.raises(ValueError, match="'flock' is not a lock backend"):
        locking.lock_backend()
