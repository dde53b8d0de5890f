"""Injected faults: each gives a specific telesession error naming the key, the stored session
stays intact, and the other keys keep working.

Real faults only: an immutable or read-only directory, a directory where a record file
should be, a file-size limit (EFBIG), a full tmpfs (ENOSPC), garbage database files, and a
lock held by another process.  Redis faults live in test_redis_store.py.
"""
import contextlib
import gc
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from support import hold_key

from telesession import Sessions
from telesession.errors import CorruptSessionError, LockTimeout, SerializationError, StoreError
from telesession.records import build_record
from telesession.stores import ShelveStore, SQLiteStore, from_url

fork = multiprocessing.get_context("fork")
ROOT = os.geteuid() == 0


def _url(kind: str, base) -> str:
    return {"json": f"json:{base / 'sessions'}", "shelve": f"shelve:{base / 'shelf' / 'sessions'}",
            "sqlite": f"sqlite:{base / 'sessions.sqlite'}", "memory": "memory://"}[kind]


def _seed(url_or_store, **values) -> Sessions:
    sessions = Sessions(url_or_store, initial=lambda: {"count": 0})
    for key, count in values.items():
        with sessions.open(key) as s:
            s["count"] = count
    return sessions


def _count(url: str, key: str) -> int:
    with Sessions(from_url(url), initial=lambda: {"count": 0}, lock_timeout=5).open(key) as s:
        return s["count"]


def _temp_files(directory) -> list:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def _snapshot(directory) -> dict:
    """Every file under ``directory`` (but lock files) and its bytes."""
    out = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            if not name.endswith(".lock"):
                with open(os.path.join(parent, name), "rb") as f:
                    out[os.path.relpath(os.path.join(parent, name), directory)] = f.read()
    return out


# ---- a directory nobody may write --------------------------------------------------------------

@contextlib.contextmanager
def _read_only(directory: str):
    """Make ``directory`` unwritable for this process, root included; skip if impossible here."""
    if not ROOT:
        os.chmod(directory, 0o500)
        undo = ["chmod", "700", directory]
        how = "chmod 0500"
    else:  # root ignores permission bits; the immutable flag stops even root
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a directory read-only for root "
                        "(the EFBIG and ENOSPC tests cover failing writes)")
        done = subprocess.run(["chattr", "+i", directory], capture_output=True)
        if done.returncode:
            pytest.skip(f"chattr +i is not supported here ({done.stderr.decode().strip()}); "
                        "the EFBIG and ENOSPC tests cover failing writes")
        undo = ["chattr", "-i", directory]
        how = "chattr +i"
    try:
        probe = os.path.join(directory, "probe")
        try:
            open(probe, "w").close()
        except OSError:
            pass
        else:
            os.unlink(probe)
            pytest.skip(f"{how} did not make {directory} read-only on this filesystem")
        yield
    finally:
        subprocess.run(undo, check=True)


def test_read_only_store_directory(tmp_path):
    url = _url("json", tmp_path)
    sessions = _seed(url, k=1, other=2)
    directory = str(tmp_path / "sessions")
    before = _snapshot(directory)
    with _read_only(directory):
        with pytest.raises(StoreError) as caught:
            with sessions.open("k") as s:
                s["count"] = 10
        err = caught.value
        assert type(err) is StoreError and err.key == "session:k"
        assert "'session:k'" in str(err) and os.path.join(directory, "session%3Ak.json") in str(err)
        # a new key fails the same way and clearly
        with pytest.raises(StoreError, match="'session:brand-new'"):
            with sessions.open("brand-new") as s:
                s["count"] = 1
        # reading keeps working, for the key that failed and for the others
        assert _count(url, "k") == 1 and _count(url, "other") == 2
        assert _snapshot(directory) == before and _temp_files(directory) == []
    # once writable again, every key works and nothing was lost
    with sessions.open("k") as s:
        assert s["count"] == 1
        s["count"] += 1
    assert _count(url, "k") == 2 and _count(url, "other") == 2 and _count(url, "brand-new") == 0


# ---- a directory where a record file should be -------------------------------------------------

def test_record_file_replaced_by_a_directory(tmp_path):
    url = _url("json", tmp_path)
    sessions = _seed(url, k=1, other=2)
    store = sessions.store
    path = store.path("session:k")
    os.unlink(path)
    os.mkdir(path)
    os.mkdir(os.path.join(path, "inside"))  # a non-empty directory: os.replace cannot remove it

    with pytest.raises(StoreError) as caught:
        with sessions.open("k"):
            pass
    assert type(caught.value) is StoreError and caught.value.key == "session:k"
    assert "'session:k'" in str(caught.value) and path in str(caught.value)
    taken = []  # the failed read gave the key's lock back: another thread takes it at once
    taker = threading.Thread(target=lambda: taken.append(store.release("session:k", store.acquire("session:k", 0))))
    taker.start()
    taker.join()
    assert taken == [None]

    record = build_record("session:k", '{"count":5}', 0, time.time())
    with pytest.raises(StoreError) as caught:
        store.save("session:k", record)  # the write path, which a load failure keeps handlers from reaching
    assert caught.value.key == "session:k" and path in str(caught.value)
    assert os.path.isdir(os.path.join(path, "inside")), "the obstacle must be left as it was"
    assert _temp_files(store.directory) == []

    with sessions.open("other") as s:
        s["count"] += 1
    assert _count(url, "other") == 3
    shutil.rmtree(path)
    assert _count(url, "k") == 0


# ---- a file-size limit: writes fail with EFBIG ---------------------------------------------------

EFBIG_CHILD = r"""
import json, os, resource, signal, sys
from telesession import Sessions
from telesession.errors import SessionError
from telesession.stores import from_url

url, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
sessions = Sessions(from_url(url), initial=lambda: {"count": 0})
report = {}
try:
    with sessions.open("k") as s:
        s["count"] += 1
        s["blob"] = "x" * (4 * limit)
except SessionError as exc:
    report["error"] = [type(exc).__name__, str(exc), exc.key, exc.where]
with sessions.open("k") as s:          # same process, same key: old value, lock released
    report["k"] = dict(s)
with sessions.open("other") as s:      # another key still loads ...
    report["other"] = dict(s)
try:
    with sessions.open("other") as s:  # ... and saves (a small write, if the store has room left)
        s["count"] += 1
    with sessions.open("fresh") as s:  # and so does a new key
        s["count"] = 7
except SessionError as exc:
    report["small-write"] = [type(exc).__name__, str(exc), exc.key]
print(json.dumps(report))
"""


@pytest.mark.parametrize("kind", ["json", "sqlite", "shelve"])
def test_write_past_the_file_size_limit(kind, tmp_path):
    url = _url(kind, tmp_path)
    store = from_url(url)
    _seed(store, k=1, other=2)
    directory = tmp_path / {"json": "sessions", "sqlite": "", "shelve": "shelf"}[kind]
    largest = max(os.path.getsize(os.path.join(p, n)) for p, _, ns in os.walk(directory) for n in ns)
    limit = largest + 64 * 1024  # room for small writes, none for the blob
    done = subprocess.run([sys.executable, "-c", EFBIG_CHILD, url, str(limit)],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    name, message, key, where = report["error"]
    assert name == "StoreError" and key == "session:k", report
    assert "'session:k'" in message and where and where in message, message
    if kind == "json":
        assert store.path("session:k") in message and "[errno 27]" in message, message
        assert _temp_files(store.directory) == [], "the failed temp file must be removed"
    assert report["k"] == {"count": 1} and report["other"] == {"count": 2}
    if kind == "shelve":
        # one append-only data file: the failed write filled it up to the limit, so in this
        # process every later write fails too, with the same clear error; nothing is lost
        name, message, key = report["small-write"]
        assert name == "StoreError" and key == "session:other" and "'session:other'" in message, report
        assert _count(url, "k") == 1 and _count(url, "other") == 2
    else:
        assert "small-write" not in report, report
        assert _count(url, "k") == 1 and _count(url, "other") == 3 and _count(url, "fresh") == 7
    if kind == "sqlite":
        store.close()


# ---- a full disk: ENOSPC on a real, tiny tmpfs --------------------------------------------------

@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("needs root to mount a 512 KiB tmpfs for a real ENOSPC")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mount_point)],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:  # lazily: this process keeps the store's lock file open for its lifetime
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _fill(directory) -> str:
    """Fill the filesystem of ``directory`` to the last byte; return the filler's path."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == 28
                break
        while True:  # the last partial block
            try:
                f.write(b"\0")
            except OSError:
                break
    return filler


@pytest.mark.parametrize("kind", ["json", "sqlite", "shelve"])
def test_disk_full(kind, tiny_tmpfs):
    url = _url(kind, tiny_tmpfs)
    store = from_url(url)
    sessions = _seed(store, k=1, other=2)
    filler = _fill(tiny_tmpfs)
    try:
        with pytest.raises(StoreError) as caught:
            with sessions.open("k") as s:
                s["count"] += 1
                s["blob"] = "x" * 100_000
        err = caught.value
        assert type(err) in (StoreError, CorruptSessionError) and err.key == "session:k", repr(err)
        assert "'session:k'" in str(err) and err.where and err.where in str(err), str(err)
        if kind == "json":
            assert isinstance(err, StoreError) and "[errno 28]" in str(err), str(err)
            assert _temp_files(store.directory) == []
        # nothing lost, and reading every key still works on the full disk
        assert _count(url, "k") == 1 and _count(url, "other") == 2
    finally:
        os.unlink(filler)
    # with room again, and while the failed save's exception is still alive, the others write ...
    with sessions.open("k") as s:
        s["count"] += 1
        s["blob"] = "x" * 100_000
    with sessions.open("other") as s:
        s["count"] += 1
    with sessions.open("late") as s:
        s["count"] = 5
    # ... and nothing that the failed save left behind may write anything when it is collected
    del err, caught
    gc.collect()
    assert _count(url, "k") == 2 and _count(url, "other") == 3 and _count(url, "late") == 5
    assert sorted(from_url(url).keys()) == ["session:k", "session:late", "session:other"]
    if kind == "sqlite":
        store.close()


# ---- garbage where a database should be ----------------------------------------------------------

def test_sqlite_garbage_database_file(tmp_path):
    path = tmp_path / "sessions.sqlite"
    garbage = b"this is not a database, it is a text file that someone put here\n" * 100
    path.write_bytes(garbage)
    with pytest.raises(StoreError) as caught:
        SQLiteStore(str(path))
    assert isinstance(caught.value, CorruptSessionError)
    assert str(path) in str(caught.value) and "not a usable SQLite database" in str(caught.value)
    assert path.read_bytes() == garbage, "the file must be left untouched"
    # another store next to it works
    other = _seed(f"sqlite:{tmp_path / 'other.sqlite'}", k=1)
    with other.open("k") as s:
        assert s["count"] == 1
    other.store.close()


def test_sqlite_database_damaged_under_an_open_store(tmp_path):
    url = _url("sqlite", tmp_path)
    sessions = _seed(url, k=1, other=2)
    sessions.store.close()
    path = tmp_path / "sessions.sqlite"
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(path) + suffix):
            os.unlink(str(path) + suffix)
    garbage = os.urandom(4096) * 4
    path.write_bytes(garbage)
    with pytest.raises(StoreError) as caught:
        _count(url, "k")
    assert isinstance(caught.value, CorruptSessionError) and str(path) in str(caught.value)
    assert path.read_bytes() == garbage


@pytest.mark.parametrize("damage", ["binary", "text", "not-a-pair"])
def test_shelve_garbage_index(damage, tmp_path):
    url = _url("shelve", tmp_path)
    sessions = _seed(url, k=1, other=2)
    base = str(tmp_path / "shelf" / "sessions")
    if not os.path.exists(base + ".dir"):
        pytest.skip("this Python's shelve does not use dbm.dumb (no .dir index)")
    garbage = {"binary": b"\x00\xff\x13garbage\x80\n", "text": b"this is { not an index\n",
               "not-a-pair": b"42\n"}[damage]
    for suffix in (".dir", ".bak"):  # no good backup to fall back to either
        with open(base + suffix, "wb") as f:
            f.write(garbage)
    before = _snapshot(tmp_path / "shelf")

    with pytest.raises(StoreError) as caught:
        with sessions.open("k"):
            pass
    err = caught.value
    assert isinstance(err, CorruptSessionError), repr(err)
    assert err.key == "session:k" and "'session:k'" in str(err) and base in str(err), str(err)
    with pytest.raises(CorruptSessionError) as caught:
        ShelveStore(base)  # opening it afresh says the same
    assert base in str(caught.value)
    assert _snapshot(tmp_path / "shelf") == before, "a damaged database must be left untouched"


def test_shelve_index_cut_mid_line(tmp_path):
    url = _url("shelve", tmp_path)
    _seed(url, k=1, other=2)
    base = str(tmp_path / "shelf" / "sessions")
    if not os.path.exists(base + ".dir"):
        pytest.skip("this Python's shelve does not use dbm.dumb (no .dir index)")
    with open(base + ".dir", "r+b") as f:  # damage from outside: the index cut mid-line
        f.truncate(os.fstat(f.fileno()).st_size - 3)
    before = _snapshot(tmp_path / "shelf")
    try:
        counts = _count(url, "k"), _count(url, "other")
    except CorruptSessionError as exc:  # no good backup index: a clear error, files left alone
        assert exc.key in (None, "session:k") and base in str(exc), str(exc)
        assert _snapshot(tmp_path / "shelf") == before
    else:  # restored from dbm.dumb's backup index: then exactly the stored values
        assert counts == (1, 2)


# ---- a lock held too long -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["memory", "json", "shelve", "sqlite"])
def test_lock_held_too_long(kind, tmp_path):
    url = _url(kind, tmp_path)
    store = from_url(url)
    sessions = _seed(store, k=1, other=2)
    ready, stop = threading.Event(), threading.Event()
    proc = None
    if kind == "memory":  # one process: another thread holds it
        def holder():
            with sessions.open("k"):
                ready.set()
                stop.wait(30)
        thread = threading.Thread(target=holder)
        thread.start()
        assert ready.wait(10)
    else:  # another process holds it
        mp_ready = fork.Event()
        proc = fork.Process(target=hold_key, args=(url, "k", mp_ready, 30))
        proc.start()
        assert mp_ready.wait(30)
    try:
        impatient = Sessions(store, initial=lambda: {"count": 0}, lock_timeout=0.3)
        start = time.monotonic()
        with pytest.raises(LockTimeout) as caught:
            with impatient.open("k") as s:
                s["count"] = 99
        waited = time.monotonic() - start
        assert 0.3 <= waited < 3, waited
        err = caught.value
        assert err.key == "session:k" and "'session:k'" in str(err) and "0.3" in str(err), str(err)
        with impatient.open("other") as s:  # other keys keep working meanwhile
            s["count"] += 1
    finally:
        if proc is not None:
            proc.kill()
            proc.join(30)
        else:
            stop.set()
            thread.join(30)
    with impatient.open("k") as s:  # and the key itself once the holder is gone
        assert s["count"] == 1
        s["count"] += 1
    with sessions.open("k") as s, sessions.open("other") as t:
        assert (s["count"], t["count"]) == (2, 3)


def test_unserializable_value_names_key_and_path_and_keeps_the_session(tmp_path):
    url = _url("json", tmp_path)
    sessions = _seed(url, k=1, other=2)
    with pytest.raises(SerializationError) as caught:
        with sessions.open("k") as s:
            s["count"] = 5
            s["cart"] = [1, 2, (3, 4)]
    err = caught.value
    assert err.key == "session:k" and err.path == 'session["cart"][2]' and "'session:k'" in str(err)
    assert _count(url, "k") == 1 and _count(url, "other") == 2
