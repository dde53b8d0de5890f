"""SQLiteStore's record cache and write stamps, on real databases and real processes: a copy is
handed back without a read only while no writer of any process has touched the key since."""
import multiprocessing
import os
import sqlite3

import pytest

from telesession.errors import ConflictError, StoreError
from telesession.locking import key_offset
from telesession.stamps import WriteStamps
from telesession.stores.sqlite import SQLiteStore


def locked_load(store, key):
    token = store.acquire(key, 5)
    try:
        return store.load_locked(key, token)
    finally:
        store.release(key, token)


def locked_save(store, key, record, previous=None):
    token = store.acquire(key, 5)
    try:
        store.save(key, record, previous=previous)
    finally:
        store.release(key, token)


def traced(store):
    """The SQL statements this thread's connection to ``store`` runs from now on."""
    statements = []
    store._conn(None).set_trace_callback(statements.append)
    return statements


def selects(statements):
    return [s for s in statements if s.lstrip().upper().startswith("SELECT")]


def same_slot_keys():
    """Two keys whose stamps share a word of the table."""
    seen = {}
    for i in range(1_000_000):
        key = f"chat:{i}"
        slot = WriteStamps.slot(key_offset(key))
        if slot in seen:
            return seen[slot], key
        seen[slot] = key
    raise AssertionError("no two keys share a slot")  # pragma: no cover


# -- child-process bodies (module level: spawn pickles them by name) ---------------------

def _rewrite_in_child(path, key, record, result):
    """Another process: load the key under its lock, write ``record`` over what it found."""
    store = SQLiteStore(path)
    try:
        found = locked_load(store, key)
        locked_save(store, key, record, previous=found)
        result.put(found)
    finally:
        store.close()


def _rewrite_inherited_in_child(store, key, record, go, result):
    """A forked child, using the store object it inherited: wait, then rewrite ``key``."""
    go.wait(30)
    found = locked_load(store, key)
    locked_save(store, key, record, previous=found)
    result.put(found)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "sessions.sqlite")


@pytest.fixture
def store(path):
    s = SQLiteStore(path)
    yield s
    s.close()


def test_a_key_written_here_is_handed_back_without_a_read(store):
    locked_save(store, "k", b"one")
    statements = traced(store)
    assert locked_load(store, "k") == b"one"
    assert selects(statements) == []
    # A plain load (no key lock: read access, the CLI) always reads.
    assert store.load("k") == b"one"
    assert len(selects(statements)) == 1


def test_a_key_never_written_here_is_read(store, path):
    other = SQLiteStore(path, cache_size=0)
    locked_save(other, "k", b"from elsewhere")
    other.close()
    statements = traced(store)
    assert locked_load(store, "k") == b"from elsewhere"
    assert len(selects(statements)) == 1


def test_a_write_by_another_process_is_read_not_the_copy(store, path):
    locked_save(store, "k", b"parent")
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    child = ctx.Process(target=_rewrite_in_child, args=(path, "k", b"child", result))
    child.start()
    assert result.get(timeout=60) == b"parent"
    child.join(30)
    assert child.exitcode == 0
    statements = traced(store)
    assert locked_load(store, "k") == b"child"
    assert len(selects(statements)) == 1
    locked_save(store, "k", b"parent again", previous=b"child")  # and the write is not a conflict
    assert store.load("k") == b"parent again"


def test_a_forked_child_never_repeats_its_parents_stamps(store):
    # The child is forked before the parent's write: had it gone on counting the parent's stamp
    # series, its write would carry the very stamp the parent cached, and the parent would
    # hand back its own, older copy.
    ctx = multiprocessing.get_context("fork")
    go, result = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_rewrite_inherited_in_child, args=(store, "k", b"child", go, result))
    child.start()
    try:
        locked_save(store, "k", b"parent")
    finally:
        go.set()
    assert result.get(timeout=60) == b"parent"
    child.join(30)
    assert child.exitcode == 0
    assert locked_load(store, "k") == b"child"


def test_a_write_to_a_key_sharing_the_slot_makes_the_copy_read_again(store, path):
    mine, theirs = same_slot_keys()
    locked_save(store, mine, b"mine")
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    child = ctx.Process(target=_rewrite_in_child, args=(path, theirs, b"theirs", result))
    child.start()
    assert result.get(timeout=60) is None
    child.join(30)
    assert child.exitcode == 0
    statements = traced(store)
    assert locked_load(store, mine) == b"mine"  # unchanged, but no longer known to be: read again
    assert len(selects(statements)) == 1
    assert locked_load(store, theirs) == b"theirs"


def test_a_direct_write_by_another_program_is_caught_by_the_next_save(store, path):
    locked_save(store, "k", b"ours")
    with sqlite3.connect(path) as foreign:  # not through telesession: no stamp
        foreign.execute("UPDATE sessions SET record=? WHERE key=?", (b"foreign", "k"))
    foreign.close()
    assert locked_load(store, "k") == b"ours"  # the documented price of the cache
    with pytest.raises(ConflictError, match="'k'"):
        locked_save(store, "k", b"ours, changed", previous=b"ours")
    assert store.load("k") == b"foreign"  # nothing overwritten
    assert locked_load(store, "k") == b"foreign"  # and the copy is gone

    uncached = SQLiteStore(path, cache_size=0)
    try:
        locked_save(uncached, "k", b"theirs", previous=b"foreign")
        with sqlite3.connect(path) as foreign:
            foreign.execute("UPDATE sessions SET record=? WHERE key=?", (b"foreign again", "k"))
        foreign.close()
        assert locked_load(uncached, "k") == b"foreign again"
    finally:
        uncached.close()


def test_deletes_and_purges_are_stamped_too(store, path):
    other = SQLiteStore(path)
    try:
        locked_save(store, "gone", b"x")
        other.delete("gone")
        assert locked_load(store, "gone") is None
        token = store.acquire("old", 5)
        store.save("old", b"y", ttl=0.001)
        store.release("old", token)
        assert other.purge_expired(now=10**10) == 1
        assert locked_load(store, "old") is None
    finally:
        other.close()


def test_a_delete_that_cannot_take_its_second_stamp_deletes_nothing(store):
    """A delete stamps before and after the row goes; both stamps are taken first, so a stamp
    that cannot be had (a series that cannot be renewed: 2**28 series of 2**36 writes, the
    one failure here that cannot be produced for real) fails the delete before it deletes."""
    locked_save(store, "kept", b"x")
    stamps = store._stamps
    real_next_stamp = stamps.next_stamp
    calls = []

    def second_fails(pid):
        calls.append(pid)
        if len(calls) == 2:
            raise StoreError(f"every stamp series of {stamps.path} is used up", None, stamps.path)
        return real_next_stamp(pid)

    stamps.next_stamp = second_fails
    try:
        with pytest.raises(StoreError, match="used up"):
            store.delete("kept")
    finally:
        del stamps.next_stamp
    assert len(calls) == 2
    assert store.load("kept") == b"x"  # nothing deleted
    assert locked_load(store, "kept") == b"x"

def test_the_cache_keeps_the_last_cache_size_records(path):
    store = SQLiteStore(path, cache_size=2)
    try:
        for key in ("a", "b", "c"):
            locked_save(store, key, key.encode())
        statements = traced(store)
        assert [locked_load(store, k) for k in ("b", "c")] == [b"b", b"c"]
        assert selects(statements) == []
        assert locked_load(store, "a") == b"a"
        assert len(selects(statements)) == 1
    finally:
        store.close()


@pytest.mark.parametrize("size", [-1, 1.5, "3", True])
def test_a_cache_size_that_is_not_a_count_is_refused(path, size):
    with pytest.raises(ValueError, match="cache_size"):
        SQLiteStore(path, cache_size=size)


def test_a_stamp_file_of_another_size_is_refused_naming_it(path):
    with open(path + ".stamps", "wb") as f:
        f.write(b"not a stamp table")
    with pytest.raises(StoreError, match=r"sessions\.sqlite\.stamps") as caught:
        SQLiteStore(path)
    assert caught.value.where == path + ".stamps"
    assert os.path.getsize(path + ".stamps") == len(b"not a stamp table")  # left as it was


def test_a_store_nobody_refers_to_goes_at_once_with_its_mapping(path):
    """No reference cycle between the store and its stamp table: dropping the last reference
    closes its connections and unmaps the table without waiting for the cycle collector."""
    import gc
    import weakref

    gc.disable()
    try:
        store = SQLiteStore(path)
        locked_save(store, "k", b"x")
        gone = weakref.ref(store)
        table = weakref.ref(store._stamps)
        del store
        assert gone() is None and table() is None
    finally:
        gc.enable()
