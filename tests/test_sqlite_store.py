"""SQLiteStore on real database files: records, conditional writes, threads, processes, files."""
import multiprocessing
import os
import re
import sqlite3
import stat
import threading
import time

import pytest

from telesession.errors import ConflictError, CorruptSessionError, LockTimeout, StoreError
from telesession.locking import key_offset, lock_backend
from telesession.stores import from_url
from telesession.stores.sqlite import SQLiteStore

HOSTILE_KEYS = ["../x", "/", "\\", "..", ".", "ключ 🔑", "k" * 300, "lock:x", "x", "a\x00b",
                "*", "%", "_", "' OR 1=1 --", "", " ", "CON", "x.lock"]


#: Tests of the writer byte, which only the POSIX record-lock backend has.
posix_locks_only = pytest.mark.skipif(
    lock_backend() != "posix",
    reason="the writer byte belongs to the POSIX record-lock backend (filelock has none)")


def lock_artifact(path: str) -> str:
    """What the lock backend in use keeps beside the database: one file, or a directory of them."""
    return path + ".lock" if lock_backend() == "posix" else path + ".lock.d"


# -- child-process bodies (module level: spawn pickles them by name) ---------------------

def _hold_in_child(path, key, ready, done):
    store = SQLiteStore(path)
    token = store.acquire(key, 10)
    try:
        ready.set()
        done.wait(30)
    finally:
        store.release(key, token)
        store.close()


def _hold_writer_in_child(path, ready, go, released_at):
    from telesession.locking import RangeLockFile

    lock_file = RangeLockFile(path + ".lock")
    assert lock_file.lock_writer(10)
    ready.set()
    go.wait(30)
    time.sleep(0.2)  # the parent's save is waiting by now (or soon): it must not finish before we unlock
    released_at.value = time.time()
    lock_file.unlock_writer()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "sessions.sqlite")


@pytest.fixture
def store(path):
    s = SQLiteStore(path)
    yield s
    s.close()


def test_round_trip_and_keys(store):
    assert store.load("a") is None
    store.save("a", b"one")
    store.save("b", b"two")
    assert store.load("a") == b"one"
    store.save("a", b"three", previous=b"one")
    assert store.load("a") == b"three"
    assert sorted(store.keys()) == ["a", "b"]
    store.delete("a", previous=b"three")
    assert store.load("a") is None
    store.delete("a")  # absent: no error
    store.delete("b")  # previous=None deletes whatever is there
    assert list(store.keys()) == []


def test_records_survive_reopening(path):
    with SQLiteStore(path) as first:
        first.save("k", b"kept")
    with SQLiteStore(path) as second:
        assert second.load("k") == b"kept"


def test_conditional_save_refuses_a_changed_record(store):
    store.save("k", b"v1")
    with pytest.raises(ConflictError) as info:
        store.save("k", b"mine", previous=b"v0")
    assert info.value.key == "k" and "'k'" in str(info.value) and store.path in str(info.value)
    with pytest.raises(ConflictError):
        store.save("k", b"mine", previous=None)  # it was absent when loaded: someone created it
    with pytest.raises(ConflictError):
        store.delete("k", previous=b"v0")
    assert store.load("k") == b"v1"
    store.delete("gone", previous=b"whatever")  # already absent: the wanted end state
    with pytest.raises(ConflictError):
        store.save("gone", b"x", previous=b"whatever")  # deleted by someone else: no resurrection
    assert store.load("gone") is None
    assert store.conditional is True


def test_save_with_ttl_and_purge(store):
    now = time.time()
    store.save("short", b"s", ttl=5)
    store.save("forever", b"f")
    store.save("held", b"h", ttl=5)
    assert store.purge_expired(now) == 0
    held = threading.Event()
    done = threading.Event()

    def holder():
        token = store.acquire("held", 5)
        held.set()
        done.wait(10)
        store.release("held", token)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        assert store.purge_expired(now + 60) == 1  # "held" is in use: skipped
    finally:
        done.set()
        thread.join(10)
    assert sorted(store.keys()) == ["forever", "held"]
    assert store.purge_expired(now + 60) == 1
    assert list(store.keys()) == ["forever"]


def test_hostile_keys_are_distinct_and_round_trip(store):
    for i, key in enumerate(HOSTILE_KEYS):
        token = store.acquire(key, 5)
        store.save(key, f"record {i}".encode())
        store.release(key, token)
    for i, key in enumerate(HOSTILE_KEYS):
        assert store.load(key) == f"record {i}".encode()
    assert sorted(store.keys()) == sorted(HOSTILE_KEYS)
    # Keys are rows, never file names: nothing but the database's own files exists, the write
    # stamps, and what the lock backend keeps: one lock file (POSIX), or a directory of lock
    # files named by hash.
    directory = os.path.dirname(store.path)
    artifact = os.path.basename(lock_artifact(store.path))
    assert set(os.listdir(directory)) <= {
        "sessions.sqlite", "sessions.sqlite-wal", "sessions.sqlite-shm", "sessions.sqlite.stamps",
        artifact}
    assert artifact in os.listdir(directory)
    if lock_backend() == "filelock":
        names = set(os.listdir(os.path.join(directory, artifact)))
        assert {f"{key_offset(k):016x}.lock" for k in HOSTILE_KEYS} <= names
        assert all(re.fullmatch(r"[0-9a-f]{16}\.lock|store\.lock", name) for name in names), names


def test_lock_of_lock_x_is_not_the_lock_of_x(store):
    taken = []

    def other():
        token = store.acquire("lock:x", 1)  # LockTimeout here would mean the locks collide
        taken.append(True)
        store.release("lock:x", token)

    token = store.acquire("x", 1)
    try:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(10)
    finally:
        store.release("x", token)
    assert taken == [True]


def test_a_process_holding_a_key_excludes_others_but_not_other_keys(path):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_in_child, args=(path, "busy", ready, done))
    child.start()
    try:
        assert ready.wait(60)
        with SQLiteStore(path) as store:
            started = time.monotonic()
            with pytest.raises(LockTimeout) as info:
                store.acquire("busy", 0.3)
            assert 0.25 <= time.monotonic() - started < 10
            assert info.value.key == "busy" and "busy" in str(info.value)
            # Other keys are free, and writing does not wait for the holder.
            token = store.acquire("other", 1)
            store.save("other", b"x")
            store.release("other", token)
            done.set()
            child.join(30)
            assert child.exitcode == 0
            token = store.acquire("busy", 5)
            store.release("busy", token)
    finally:
        done.set()
        child.join(30)


@posix_locks_only
def test_writes_of_processes_queue_on_the_writer_byte(path):
    """Processes take turns for a write on one byte of the lock file, instead of colliding in
    SQLite, whose busy handler sleeps milliseconds between retries."""
    from telesession.locking import WRITER_OFFSET

    assert all(key_offset(k) < WRITER_OFFSET for k in HOSTILE_KEYS)  # no key shares the writer's byte
    ctx = multiprocessing.get_context("spawn")
    ready, go, released_at = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
    with SQLiteStore(path) as store:
        child = ctx.Process(target=_hold_writer_in_child, args=(path, ready, go, released_at))
        child.start()
        try:
            assert ready.wait(60)
            store._process_lock_file("k")._alone_until = 0.0  # (it has company now: look again at once)
            token = store.acquire("k", 5)  # key locks are not the writer's: taking one does not wait
            assert store.load("k") is None  # nor does reading
            go.set()
            store.save("k", b"record")  # waits for the writer byte, then writes
            saved_at = time.time()
            store.release("k", token)
            child.join(30)
            assert child.exitcode == 0
            assert released_at.value and saved_at >= released_at.value
            assert store.load("k") == b"record"
        finally:
            go.set()
            child.join(30)


def _report_writer_byte_in_child(path, ready, go, result):
    import fcntl

    from telesession.locking import WRITER_OFFSET, range_lock_file_for

    lock_file = range_lock_file_for(path + ".lock")  # this process is present from now on
    try:
        fcntl.lockf(lock_file._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, WRITER_OFFSET)
        fcntl.lockf(lock_file._fd, fcntl.LOCK_UN, 1, WRITER_OFFSET)
        result.value = 1  # the writer byte was free
    except OSError:
        result.value = 2  # another process held it
    ready.set()
    go.wait(30)


@posix_locks_only
def test_a_process_alone_skips_the_writer_byte_until_another_opens_the_store(path):
    """The writer byte orders the writes of several processes. A process that has the lock
    file to itself skips it (two system calls a write); once another process opens the
    file, it takes the byte again, and when that one is gone it skips it again."""
    ctx = multiprocessing.get_context("spawn")

    def child_sees_writer_byte() -> tuple:
        ready, go, result = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
        child = ctx.Process(target=_report_writer_byte_in_child, args=(path, ready, go, result))
        child.start()
        assert ready.wait(60)
        return {1: "free", 2: "held"}[result.value], go, child

    with SQLiteStore(path) as store:
        lock_file = store._process_lock_file(None)
        lock_file._alone_until = 0.0  # look again now (normally every ALONE_SECONDS)
        assert lock_file.lock_writer(5)  # alone: the mutex only
        try:
            seen, go, first = child_sees_writer_byte()
        finally:
            lock_file.unlock_writer()
        try:
            assert seen == "free"
            lock_file._alone_until = 0.0
            assert lock_file.alone() is False  # the first child is alive and present
            assert lock_file.lock_writer(5)
            seen, go2, second = child_sees_writer_byte()
            lock_file.unlock_writer()
            go2.set()
            second.join(30)
            assert seen == "held"
            store.save("k", b"record")  # a write among processes works as before
        finally:
            go.set()
            first.join(30)
        assert first.exitcode == 0 and second.exitcode == 0
        lock_file._alone_until = 0.0
        assert lock_file.alone() is True  # both children are gone: alone again
        assert store.load("k") == b"record"


@posix_locks_only
def test_a_writer_lock_held_too_long_fails_the_write_naming_key_and_lock_file(path):
    """A process that stops while holding the writer byte (SIGSTOP, a debugger) makes writes of
    other processes fail after the store's timeout, naming the key and the lock file, instead
    of hanging them forever; nothing is written, and writes go on once it is released."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, released_at = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
    with SQLiteStore(path, timeout=0.3) as store:
        store.save("k", b"old")
        child = ctx.Process(target=_hold_writer_in_child, args=(path, ready, go, released_at))
        child.start()
        try:
            assert ready.wait(60)
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                store.save("k", b"new", previous=b"old")
            assert time.monotonic() - started >= 0.3
            assert info.value.key == "k"
            assert path + ".lock" in str(info.value) and "'k'" in str(info.value)
            assert not isinstance(info.value, ConflictError)
            assert store.load("k") == b"old"
        finally:
            go.set()
            child.join(30)
        assert child.exitcode == 0
        store.save("k", b"new", previous=b"old")
        assert store.load("k") == b"new"


def _hold_write_transaction_in_child(path, ready, go):
    conn = sqlite3.connect(path, isolation_level=None)  # another program: the sqlite3 shell, a backup
    conn.execute("BEGIN IMMEDIATE")
    ready.set()
    go.wait(30)
    conn.execute("ROLLBACK")
    conn.close()


def test_a_foreign_write_transaction_held_too_long_fails_the_write_naming_the_key(path):
    """Another program that keeps a write transaction open makes a save wait in SQLite's busy
    handler for the store's ``timeout``, then fail with a ``StoreError`` that names the key and
    the database, with nothing written (either lock backend: no lock of ours is involved)."""
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    with SQLiteStore(path, timeout=0.3) as store:
        store.save("k", b"old")
        child = ctx.Process(target=_hold_write_transaction_in_child, args=(path, ready, go))
        child.start()
        try:
            assert ready.wait(60)
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                store.save("k", b"new", previous=b"old")
            waited = time.monotonic() - started
            assert 0.25 <= waited < 3.0, waited  # the store's timeout, not sqlite3's 5 s or ours of 10
            assert info.value.key == "k" and "'k'" in str(info.value) and path in str(info.value)
            assert "timeout" in str(info.value) and not isinstance(info.value, ConflictError)
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)  # SQLite's lock, not ours
            assert store.load("k") == b"old"
        finally:
            go.set()
            child.join(30)
        assert child.exitcode == 0
        store.save("k", b"new", previous=b"old")  # the transaction is gone: writes go on
        assert store.load("k") == b"new"


@posix_locks_only
def test_threads_waiting_for_a_held_writer_lock_each_give_up_after_the_timeout(path):
    """Threads of one process queue for the writer lock behind each other: each must still
    give up after about ``timeout`` of its own wait, not after the waits of those before it."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, released_at = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
    timeout = 1.0
    with SQLiteStore(path, timeout=timeout) as store:
        child = ctx.Process(target=_hold_writer_in_child, args=(path, ready, go, released_at))
        child.start()
        try:
            assert ready.wait(60)
            waited, failures = [], []

            def write(i):
                started = time.monotonic()
                try:
                    store.save(f"k{i}", b"record")
                except StoreError as exc:
                    failures.append(exc)
                waited.append(time.monotonic() - started)

            threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert len(failures) == 4 and all(f.key.startswith("k") for f in failures)
            # one after another they would wait 1, 2, 3 and 4 s
            assert max(waited) < 2 * timeout, waited
            assert list(store.keys()) == []
        finally:
            go.set()
            child.join(30)


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf")])
def test_a_timeout_that_is_not_a_number_of_seconds_is_refused(path, timeout):
    with pytest.raises(ValueError, match="timeout"):
        SQLiteStore(path, timeout=timeout)


def test_every_connection_checkpoints_the_wal_at_the_configured_size(path):
    """``wal_autocheckpoint`` is a per-connection setting: every thread's connection gets it."""
    with SQLiteStore(path, wal_autocheckpoint=1234) as store:
        seen = [store._conn(None).execute("PRAGMA wal_autocheckpoint").fetchone()[0]]

        def other():
            seen.append(store._conn(None).execute("PRAGMA wal_autocheckpoint").fetchone()[0])

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(10)
        assert seen == [1234, 1234]
    with SQLiteStore(path) as store:
        assert store._conn(None).execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 4000


@pytest.mark.parametrize("pages", [0, -1, 1.5, "1000", True])
def test_a_wal_autocheckpoint_that_is_not_a_page_count_is_refused(path, pages):
    with pytest.raises(ValueError, match="wal_autocheckpoint"):
        SQLiteStore(path, wal_autocheckpoint=pages)


def _save_in_forked_child(store, result):
    try:
        store.save("child", b"record")  # the parent's store object, inherited through fork()
        result.value = 1
    except BaseException:  # noqa: BLE001 - reported through result
        result.value = 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_child_forked_while_a_thread_holds_the_writer_mutex_can_write(path):
    """The threads' writer mutex lives in the per-process lock file, which a forked child
    opens afresh: a mutex held by a parent thread at fork time must not block the child's
    writes through the store object it inherited."""
    from telesession.locking import range_lock_file_for

    with SQLiteStore(path) as store:
        store.save("parent", b"record")
        writer = range_lock_file_for(store.lock_path)._writer
        assert writer.acquire(timeout=5)  # as a parent thread in the middle of a write
        try:
            ctx = multiprocessing.get_context("fork")
            result = ctx.Value("i", 0)
            child = ctx.Process(target=_save_in_forked_child, args=(store, result))
            child.start()
            child.join(60)
            assert child.exitcode == 0 and result.value == 1
        finally:
            writer.release()
        assert store.load("child") == b"record"
        # the child wrote through a connection of its own: the parent's still works
        store.save("parent", b"again", previous=b"record")
        assert store.load("parent") == b"again"


def test_two_store_objects_on_one_file_share_the_lock(path):
    with SQLiteStore(path) as first, from_url(f"sqlite:{path}") as second:
        assert isinstance(second, SQLiteStore) and first.location == second.location
        token = first.acquire("k", 1)
        try:
            failure = []

            def other():
                try:
                    second.acquire("k", 0.2)
                except LockTimeout as exc:
                    failure.append(exc)

            thread = threading.Thread(target=other)
            thread.start()
            thread.join(10)
            assert len(failure) == 1
        finally:
            first.release("k", token)


def test_every_file_is_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = str(tmp_path / "new" / "dir" / "sessions.sqlite")
        store = SQLiteStore(path)
        token = store.acquire("k", 1)
        store.save("k", b"x")
        store.release("k", token)
        directory = os.path.dirname(path)
        names = sorted(os.listdir(directory))
        assert "sessions.sqlite" in names and os.path.basename(lock_artifact(path)) in names
        if lock_backend() == "filelock":  # the key's own lock file is checked below too
            assert f"{key_offset('k'):016x}.lock" in os.listdir(lock_artifact(path))
        for top, dirs, files in os.walk(directory):
            for name in files:
                mode = stat.S_IMODE(os.stat(os.path.join(top, name)).st_mode)
                assert mode == 0o600, f"{name} has mode {oct(mode)}"
            assert stat.S_IMODE(os.stat(top).st_mode) == 0o700, f"{top} is not owner-only"
        store.close()
    finally:
        os.umask(old)


def test_a_file_that_is_not_a_database_gets_a_clear_error(tmp_path):
    path = tmp_path / "garbage.sqlite"
    content = b"this is not a database, just some text " * 200
    path.write_bytes(content)
    with pytest.raises(CorruptSessionError) as info:
        SQLiteStore(str(path))
    assert str(path) in str(info.value) and "not" in str(info.value)
    assert path.read_bytes() == content


def test_a_foreign_sessions_table_is_refused(tmp_path):
    path = str(tmp_path / "other.sqlite")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, payload TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not telesession's"):
        SQLiteStore(path)


def test_lookups_use_the_primary_key(store):
    for i in range(50):
        store.save(f"k{i}", b"x")
    conn = sqlite3.connect(store.path)
    try:
        for sql, args in [("SELECT record FROM sessions WHERE key=?", ("k1",)),
                          ("UPDATE sessions SET record=?, written=?, expires=? WHERE key=? AND record=?",
                           (b"y", 0.0, None, "k1", b"x"))]:
            plan = " ".join(str(row) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
            assert "USING INDEX" in plan and "SCAN" not in plan, plan
    finally:
        conn.close()


def test_keys_pages_through_many_rows(store):
    expected = {f"key-{i:05d}" for i in range(1234)}
    conn = store._conn(None)
    conn.executemany("INSERT INTO sessions(key, record) VALUES (?, ?)", [(k, b"x") for k in expected])
    assert set(store.keys()) == expected
    assert len(list(store.keys())) == len(expected)


def test_synchronous_option(path):
    with SQLiteStore(path, synchronous="full") as store:
        assert store._conn(None).execute("PRAGMA synchronous").fetchone()[0] == 2
        assert store._conn(None).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(path, synchronous="sometimes")


def test_each_thread_has_its_own_connection_closed_when_it_ends(store):
    seen = []
    barrier = threading.Barrier(4)

    def use():
        seen.append(store._conn(None))
        barrier.wait(10)  # all four alive at once

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len({id(c) for c in seen} | {id(store._conn(None))}) == 5
    with pytest.raises(sqlite3.ProgrammingError):  # the ended threads' connections were closed
        seen[0].execute("SELECT 1")


def test_closed_store_refuses_work(path):
    store = SQLiteStore(path)
    store.save("k", b"x")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load("k")
    with pytest.raises(StoreError, match="closed"):
        store.save("k", b"y", previous=b"x")
    with SQLiteStore(path) as other:
        assert other.load("k") == b"x"


def test_writes_of_every_thread_go_through_one_connection_of_the_process(path):
    """Rows are written through one connection per process, under the writer lock: a
    connection drops its page cache whenever another one commits, so eight threads with a
    connection each would read the table's pages again for nearly every write."""
    with SQLiteStore(path, synchronous="FULL", wal_autocheckpoint=1234) as store:
        store.save("first", b"0")
        writer = store._writer_conn("first")
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # durability as configured
        assert writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1234
        written = []
        writer.set_trace_callback(lambda sql: written.append((threading.get_ident(), sql)))
        barrier = threading.Barrier(4)
        errors = []

        def work(n):
            try:
                barrier.wait(10)
                for i in range(25):
                    token = store.acquire(f"t{n}-{i}", 5)
                    try:
                        store.save(f"t{n}-{i}", b"1")
                        store.save(f"t{n}-{i}", b"2", previous=b"1")
                    finally:
                        store.release(f"t{n}-{i}", token)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        writer.set_trace_callback(None)
        assert errors == []
        writes = [sql for _, sql in written if sql.lstrip().upper().startswith(("INSERT", "UPDATE"))]
        assert len(writes) == 4 * 25 * 2  # every write of every thread, on this one connection
        assert len({ident for ident, sql in written}) == 4
        assert all(store.load(f"t{n}-{i}") == b"2" for n in range(4) for i in range(25))


def test_errors_name_the_key_and_the_row(store):
    with pytest.raises(StoreError) as info:
        store.save("\udcff", b"x")  # a lone surrogate cannot be SQLite text
    assert info.value.key == "\udcff" and store.path in info.value.where
