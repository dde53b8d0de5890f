"""ShelveStore over dbm.dumb: an append-only index cached per process, on real files.

What the contract suite cannot see from outside: the files stay readable by the
standard library, a save appends one index line instead of rewriting the index,
a line torn by a crash is ignored (or completed) and cut off by the next save,
another process's saves, deletes and compactions are seen, and compaction keeps
every session.
"""
import dbm
import dbm.dumb
import multiprocessing
import os
import pickle
import shelve
import subprocess
import sys
import threading

import pytest

from telesession import Sessions
from telesession.errors import CorruptSessionError
from telesession.stores import ShelveStore
from telesession.stores import shelf as shelf_module

from support import KILL_BEFORE_FILE_OPERATION  # noqa: E402  (tests/ is on sys.path)

fork = multiprocessing.get_context("fork")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))

pytestmark = pytest.mark.skipif(not shelf_module._default_is_dumb(),
                                reason="this Python has gdbm/ndbm: new shelve databases do not use dbm.dumb")


@pytest.fixture
def base(tmp_path) -> str:
    return str(tmp_path / "shelf" / "sessions")


def _dir_lines(base: str) -> list:
    with open(base + ".dir", "rb") as f:
        return f.read().split(b"\n")


def _stdlib_view(base: str) -> dict:
    """Every session as the standard library reads it, through ``shelve`` and ``dbm.dumb``."""
    assert dbm.whichdb(base) == "dbm.dumb"
    with shelve.open(base, "r") as sh:
        via_shelve = {key: sh[key] for key in sh.keys()}
    db = dbm.dumb.open(base, "r")
    try:
        via_dumb = {key.decode("utf-8"): pickle.loads(db[key]) for key in db.keys()}
    finally:
        db.close()
    assert via_shelve == via_dumb
    return via_shelve


def _append_value(base: str, record: bytes) -> tuple:
    """Append ``record`` to PATH.dat as a save does (pickled, at a 512-byte boundary)."""
    raw = pickle.dumps(record, protocol=4)
    with open(base + ".dat", "r+b") as f:
        end = f.seek(0, 2)
        pos = -(-end // 512) * 512
        f.write(b"\0" * (pos - end) + raw)
    return pos, len(raw)


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], env=ENV, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode()


# ---- the files stay dbm.dumb + shelve ------------------------------------------------------------

def test_the_standard_library_reads_what_the_store_writes(base):
    store = ShelveStore(base)
    records = {"1": b"one", "-1001234567890": b"group", "ключ/../x": b"\xff\x00binary",
               "it's \"quoted\"\n\\": b"odd key", "big": b"x" * 5000}
    for key, record in records.items():
        store.save(key, b"old " + record)
        store.save(key, record)
    store.save("gone", b"soon")
    store.delete("gone")
    assert _stdlib_view(base) == records
    assert {key: store.load(key) for key in store.keys()} == records
    # and a process that never saw this store reads the same
    out = _run("import sys; from telesession.stores import ShelveStore\n"
               "s = ShelveStore(sys.argv[1]); print(sorted((k, s.load(k)) for k in s.keys()))", base)
    assert out.strip() == repr(sorted(records.items()))


def test_a_database_written_by_shelve_itself_keeps_working(base):
    os.makedirs(os.path.dirname(base))
    with shelve.Shelf(dbm.dumb.open(base, "c", 0o600), protocol=4) as sh:  # as older versions wrote it
        for n in range(300):
            sh[str(n)] = b"record %d" % n
    store = ShelveStore(base)
    assert store.load("7") == b"record 7" and len(list(store.keys())) == 300
    store.save("7", b"new")
    store.save("new key", b"fresh")
    expected = {str(n): b"record %d" % n for n in range(300)}
    expected.update({"7": b"new", "new key": b"fresh"})
    assert _stdlib_view(base) == expected
    with shelve.Shelf(dbm.dumb.open(base, "c", 0o600), protocol=4) as sh:  # shelve writes again (rewrites the index)
        sh["8"] = b"from shelve"
    assert store.load("8") == b"from shelve" and store.load("7") == b"new"


def test_a_save_appends_one_index_line_and_rewrites_nothing(base):
    store = ShelveStore(base, fsync=False)
    for n in range(2000):
        store.save(str(n), b"r")
    inode, lines = os.stat(base + ".dir").st_ino, len(_dir_lines(base))
    store.save("5", b"changed")
    assert os.stat(base + ".dir").st_ino == inode, "the index was replaced, not appended to"
    assert _dir_lines(base)[-2:] == [b"'5', (%d, %d)" % store._index.get(b"5"), b""]
    assert len(_dir_lines(base)) == lines + 1


# ---- a line torn by a crash ----------------------------------------------------------------------

def _seed(base: str) -> ShelveStore:
    store = ShelveStore(base)
    store.save("k", b"k1")
    store.save("other", b"o1")
    store.save("k", b"k2")
    return store


@pytest.mark.parametrize("torn", ["mid-key", "mid-position", "value-missing"])
def test_a_torn_last_index_line_is_ignored_and_cut_off(base, torn):
    _seed(base).close()
    if torn == "value-missing":  # killed before the value was complete: the line cannot be trusted
        pos, size = _append_value(base, b"k3")
        with open(base + ".dat", "r+b") as f:
            f.truncate(pos + size - 2)
        line = b"'k', (%d, " % pos
    else:
        line = {"mid-key": b"'k", "mid-position": b"'k', (10"}[torn]
    with open(base + ".dir", "ab") as f:
        f.write(line)

    store = ShelveStore(base)  # a fresh process would see the same: nothing is cached yet
    assert store.load("k") == b"k2" and store.load("other") == b"o1"
    assert sorted(store.keys()) == ["k", "other"]
    store.save("other", b"o2")  # cuts the torn line off, appends its own
    assert _dir_lines(base)[-3:] == [b"'k', (1024, 17)", b"'other', (%d, 17)" % store._index.get(b"other")[0], b""]
    assert _stdlib_view(base) == {"k": b"k2", "other": b"o2"}
    assert store.load("k") == b"k2"
    store.save("k", b"k4")
    assert _stdlib_view(base) == {"k": b"k4", "other": b"o2"}


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 6])
def test_a_torn_line_whose_value_is_whole_is_completed(base, cut):
    """Cut after the position's comma, the line is completed from the value; cut earlier
    (``cut=6``: the position may be the start of a longer number), it is ignored."""
    store = _seed(base)  # this store object caches the index before the damage
    pos, size = _append_value(base, b"k3")
    line = b"'k', (%d, %d)\n" % (pos, size)
    with open(base + ".dir", "ab") as f:
        f.write(line[:-cut])  # the value was written, the line only in part
    k = b"k2" if cut == 6 else b"k3"
    assert store.load("k") == k
    assert ShelveStore(base).load("k") == k
    store.save("other", b"o2")  # a completed line is written whole before the new one
    other = b"'other', (%d, %d)" % store._index.get(b"other")
    assert _dir_lines(base)[-3:] == ([b"'k', (1024, 17)", other, b""] if cut == 6 else [line[:-1], other, b""])
    assert _stdlib_view(base) == {"k": k, "other": b"o2"}


@pytest.mark.parametrize("failing", ["completion", "new line"])
def test_a_failed_save_never_drops_the_entry_a_torn_line_recovered(base, monkeypatch, failing):
    """Fault injection at the index write (a real ENOSPC cannot be aimed at exactly that write)."""
    _seed(base).close()
    pos, size = _append_value(base, b"k3")
    with open(base + ".dir", "ab") as f:
        f.write(b"'k', (%d, %d" % (pos, size))  # the value is whole, its line torn
    store = ShelveStore(base)
    assert store.load("k") == b"k3"
    real = shelf_module._write_all

    def full_disk(fd, data, offset=None):
        aimed = b"'other'" in data if failing == "new line" else data.startswith(b")")
        if offset is None and aimed:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(shelf_module, "_write_all", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.save("other", b"o2")
    monkeypatch.setattr(shelf_module, "_write_all", real)
    assert store.load("k") == b"k3" and store.load("other") == b"o1"  # old or new, never older
    assert ShelveStore(base).load("k") == b"k3"
    store.save("other", b"o3")
    assert _stdlib_view(base) == {"k": b"k3", "other": b"o3"}


def test_a_torn_line_left_by_another_process_is_cut_off_here(base):
    store = _seed(base)
    assert store.load("k") == b"k2"  # cached
    with open(base + ".dir", "ab") as f:
        f.write(b"'k', (999")  # not a multiple of 512: never completed
    assert store.load("k") == b"k2"
    out = _run("import sys; from telesession.stores import ShelveStore\n"
               "s = ShelveStore(sys.argv[1]); print(s.load('k').decode()); s.save('k', b'k5')", base)
    assert out == "k2\n"
    assert store.load("k") == b"k5" and store.load("other") == b"o1"
    assert _stdlib_view(base) == {"k": b"k5", "other": b"o1"}


def test_garbage_appended_to_the_index_is_a_corrupt_database_every_time(base):
    store = _seed(base)
    assert store.load("k") == b"k2"  # cached: the garbage arrives through the incremental read
    with open(base + ".dir", "ab") as f:
        f.write(b"this is { not an index\n")
    before = open(base + ".dir", "rb").read()
    for _ in range(2):
        with pytest.raises(CorruptSessionError) as caught:
            store.load("k")
        assert caught.value.key == "k" and base in str(caught.value) and "line 4" in str(caught.value)
    with pytest.raises(CorruptSessionError):
        store.save("k", b"k9")
    assert open(base + ".dir", "rb").read() == before, "a damaged index must be left untouched"


def test_values_that_are_not_records_are_corrupt_sessions(base):
    store = _seed(base)
    with shelve.Shelf(dbm.dumb.open(base, "c", 0o600), protocol=4) as sh:
        sh["dict"] = {"not": "bytes"}
    pos, _ = _append_value(base, b"whatever")
    with open(base + ".dir", "ab") as f:
        f.write(b"'past-the-end', (%d, 100000)\n" % pos)
    for key, words in (("dict", "holds a dict"), ("past-the-end", "points past the end")):
        with pytest.raises(CorruptSessionError, match=words) as caught:
            store.load(key)
        assert caught.value.key == key and base in str(caught.value)
    assert store.load("k") == b"k2"


# ---- other processes ------------------------------------------------------------------------------

WRITER = r"""
import sys
from telesession.stores import ShelveStore
store = ShelveStore(sys.argv[1], fsync=False)
for command in sys.argv[2:]:
    if command.startswith("-"):
        store.delete(command[1:])
    elif command.startswith("*"):  # *N: N saves of one key, enough to make this process compact
        for n in range(int(command[1:])):
            store.save("churn", b"%d" % n)
    else:
        key, _, value = command.partition("=")
        store.save(key, value.encode())
"""


def test_saves_deletes_and_compactions_of_another_process_are_seen(base):
    store = ShelveStore(base, fsync=False)
    store.save("mine", b"m1")
    store.save("shared", b"s1")
    assert store.load("shared") == b"s1"  # cached now
    inode = os.stat(base + ".dir").st_ino

    _run(WRITER, base, "shared=s2", "theirs=t1")  # appended lines
    assert os.stat(base + ".dir").st_ino == inode
    assert store.load("shared") == b"s2" and store.load("theirs") == b"t1"
    assert sorted(store.keys()) == ["mine", "shared", "theirs"]

    _run(WRITER, base, "-theirs")  # a delete replaces the index
    assert os.stat(base + ".dir").st_ino != inode
    assert store.load("theirs") is None and sorted(store.keys()) == ["mine", "shared"]

    inode = os.stat(base + ".dir").st_ino
    _run(WRITER, base, "*1500", "shared=s3")  # the other process compacts midway, then appends
    assert os.stat(base + ".dir").st_ino != inode
    assert len(_dir_lines(base)) < 1000
    assert store.load("churn") == b"1499" and store.load("shared") == b"s3" and store.load("mine") == b"m1"

    store.save("mine", b"m2")  # and this process's save lands in the compacted file
    out = _run("import sys; from telesession.stores import ShelveStore\n"
               "s = ShelveStore(sys.argv[1]); print(sorted((k, s.load(k)) for k in s.keys()))", base)
    assert out.strip() == repr([("churn", b"1499"), ("mine", b"m2"), ("shared", b"s3")])
    assert _stdlib_view(base) == {"churn": b"1499", "mine": b"m2", "shared": b"s3"}


def _forked_child(base: str, ready, go) -> None:
    store = ShelveStore(base, fsync=False)  # shares the parent's cached index, as forked workers do
    ok = store.load("k") == b"before fork"
    ready.set()
    go.wait(30)
    ok = ok and store.load("k") == b"after fork" and store.load("new") == b"parent"
    store.save("child", b"c")
    os._exit(0 if ok else 1)


def test_a_forked_child_checks_the_inherited_index_before_use(base):
    store = ShelveStore(base, fsync=False)
    store.save("k", b"before fork")
    assert store.load("k") == b"before fork"
    ready, go = fork.Event(), fork.Event()
    child = fork.Process(target=_forked_child, args=(base, ready, go))
    child.start()
    try:
        assert ready.wait(30)
        store.save("k", b"after fork")
        store.save("new", b"parent")
        go.set()
        child.join(30)
        assert child.exitcode == 0, "the child read a stale index"
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert store.load("child") == b"c"


# ---- compaction and delete ------------------------------------------------------------------------

def test_compaction_keeps_every_session(base):
    store = ShelveStore(base, fsync=False)
    expected = {}
    most = 0
    for n in range(4000):
        key = str(n % 25)
        expected[key] = b"%d" % n
        store.save(key, expected[key])
        most = max(most, len(_dir_lines(base)) - 1) if n % 97 == 0 else most
    lines = len(_dir_lines(base)) - 1
    assert lines <= 2 * 25 + 1000 + 1 and most <= 2 * 25 + 1000 + 1, (lines, most)
    assert lines < 4000 - 1000, "never compacted"
    assert {key: store.load(key) for key in store.keys()} == expected
    assert _stdlib_view(base) == expected
    assert {key: ShelveStore(base).load(key) for key in expected} == expected


def test_delete(base):
    store = _seed(base)
    store.save("third", b"t")
    store.delete("k")
    assert store.load("k") is None and sorted(store.keys()) == ["other", "third"]
    assert _stdlib_view(base) == {"other": b"o1", "third": b"t"}
    assert ShelveStore(base).load("k") is None
    inode = os.stat(base + ".dir").st_ino
    store.delete("k")  # absent: nothing to write
    store.delete("never")
    assert os.stat(base + ".dir").st_ino == inode
    store.save("k", b"back")
    assert _stdlib_view(base) == {"k": b"back", "other": b"o1", "third": b"t"}


def test_two_store_objects_on_one_database_in_one_process_exclude_each_other(base):
    stores = [ShelveStore(base, fsync=False), ShelveStore(base, fsync=False)]
    managers = [Sessions(s, initial=lambda: {"count": 0}) for s in stores]
    errors = []

    def work(n: int) -> None:
        try:
            for i in range(150):
                with managers[(n + i) % 2].open(f"k{i % 3}") as s:
                    s["count"] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with managers[0].open("k0") as a, managers[1].open("k1") as b, managers[0].open("k2") as c:
        assert a["count"] + b["count"] + c["count"] == 4 * 150
    stores[0].close()
    assert ShelveStore(base).load("k0") == stores[1].load("k0")


# ---- a crash at every file operation of a save that compacts ---------------------------------------
# As in test_crash.py (the same audit-hook trap from support.py): count the file operations of one
# save, then run the same save once per operation and SIGKILL the process just before the n-th.
# Here the save is the one that compacts the index, so the kills land inside the rewrite too.

COMPACT_TRAP = KILL_BEFORE_FILE_OPERATION + r"""
from telesession.stores import ShelveStore

base = sys.argv[1]
store = ShelveStore(base)
assert store.load("hot") == b"old"
armed = True
store.save("hot", b"new")
armed = False
print(len(seen))
"""


def _seed_full_index(base: str) -> None:
    """``other`` and ``hot``, with as many index lines as one more save may add before compacting."""
    store = ShelveStore(base, fsync=False)
    store.save("other", b"untouched")
    for _ in range(2 * 2 + shelf_module._COMPACT_SLACK - 2):
        store.save("hot", b"older")
    store.save("hot", b"old")
    store.close()


def test_a_crash_at_any_file_operation_of_a_compacting_save_leaves_old_or_new(tmp_path):
    probe = str(tmp_path / "probe" / "db")
    _seed_full_index(probe)
    operations = int(_run(COMPACT_TRAP, probe, "0"))
    assert len(_dir_lines(probe)) == 3, "the probe save did not compact"
    assert operations >= 4, operations

    for n in range(1, operations + 1):
        base = str(tmp_path / f"kill-{n}" / "db")
        _seed_full_index(base)
        done = subprocess.run([sys.executable, "-c", COMPACT_TRAP, base, str(n)], env=ENV,
                              capture_output=True, timeout=60)
        assert done.returncode == -9, (n, done.stderr.decode()[-2000:])
        store = ShelveStore(base)  # removes a temp file the crash left behind
        assert store.load("hot") in (b"old", b"new") and store.load("other") == b"untouched", n
        assert [name for name in os.listdir(os.path.dirname(base)) if name.endswith(".tmp")] == [], n
        assert _stdlib_view(base) == {"hot": store.load("hot"), "other": b"untouched"}
        store.save("hot", b"after")
        assert ShelveStore(base).load("hot") == b"after"


# ---- several processes appending, deleting and compacting at once ----------------------------------

HAMMER = r"""
import sys
from telesession import Sessions
from telesession.stores import ShelveStore

base, me, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
sessions = Sessions(ShelveStore(base, fsync=False), initial=lambda: {"count": 0}, lock_timeout=30)
for n in range(rounds):
    with sessions.open(f"shared-{n % 5}") as s:
        s["count"] += 1
    if n % 100 == 0:  # a delete replaces the index under the others' feet
        with sessions.open(f"scratch-{me}") as s:
            s["n"] = n
        with sessions.open(f"scratch-{me}") as s:
            s.delete()
print("done")
"""


def test_processes_appending_deleting_and_compacting_at_once_lose_nothing(base):
    store = ShelveStore(base, fsync=False)
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, base, str(me), "1500"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for me in range(3)]
    reads = 0
    while any(p.poll() is None for p in procs):  # this process reads along, through its cache
        for k in range(5):
            store.load(f"shared-{k}")
        reads += 1
    assert reads > 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out == b"done\n", err.decode()[-3000:]
    sessions = Sessions(store, initial=lambda: {"count": 0})
    total = 0
    for k in range(5):
        with sessions.open(f"shared-{k}") as s:
            total += s["count"]
    assert total == 3 * 1500
    assert sorted(store.keys()) == [f"session:shared-{k}" for k in range(5)]
    assert len(_dir_lines(base)) - 1 <= 2 * 5 + 1000 + 1, "never compacted"
    view = _stdlib_view(base)
    assert sorted(view) == sorted(store.keys()) and all(view[k] == store.load(k) for k in view)
