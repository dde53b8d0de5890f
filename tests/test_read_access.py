"""Read access for broadcasts and admin code: Sessions.keys/get/items and Store.keys/records(prefix)."""
import dataclasses
import json
import threading
import time

import pytest
from support import held_in_another_thread

from telesession import Sessions
from telesession.errors import CorruptSessionError
from telesession.records import build_record
from telesession.stores import SQLiteStore, from_url


@dataclasses.dataclass
class Prefs:
    lang: str = "en"
    tags: list = dataclasses.field(default_factory=list)


def fill(sessions: Sessions, values: dict) -> None:
    for key, value in values.items():
        with sessions.open(key) as s:
            s.update(value)


def test_keys_get_items_see_what_handlers_see(store_url):
    store = from_url(store_url)
    sessions = Sessions(store, initial=lambda: {"lang": "en"})
    fill(sessions, {"1": {"lang": "de"}, "2": {"lang": "fr"}, "-100": {"lang": "de"}})
    other = Sessions(store, name="other")  # another manager's sessions are not ours
    fill(other, {"1": {"x": 1}, "9": {"x": 2}})
    store.save("foreign", b"not ours, not even a record")
    assert sorted(sessions.keys()) == ["-100", "1", "2"]
    assert sessions.get("1") == {"lang": "de"} and sessions.get("missing") is None
    assert sessions.get("missing", {"lang": "?"}) == {"lang": "?"}
    assert dict(sessions.items()) == {"1": {"lang": "de"}, "2": {"lang": "fr"}, "-100": {"lang": "de"}}
    assert sorted(k for k, s in sessions.items() if s["lang"] == "de") == ["-100", "1"]
    assert sorted(other.keys()) == ["1", "9"] and other.get("1") == {"x": 1}


def test_snapshots_are_copies_and_never_written(store_url):
    store = from_url(store_url)
    sessions = Sessions(store, initial=Prefs)
    with sessions.open("1") as s:
        s.tags.append("a")
    before = store.load("session:1")
    snapshot = sessions.get("1")
    snapshot.tags.append("changed")
    snapshot.lang = "xx"
    for _, s in sessions.items():
        s.tags.clear()
    assert sessions.get("1") == Prefs("en", ["a"]) and store.load("session:1") == before
    with sessions.open("1") as s:
        assert s == Prefs("en", ["a"])


def test_expired_sessions_are_left_out(store_url):
    store = from_url(store_url)
    sessions = Sessions(store, ttl=60)
    fill(sessions, {"fresh": {"n": 1}})
    store.save("session:stale", build_record("session:stale", '{"n":2}', 0, time.time() - 3600))
    assert list(sessions.keys()) == ["fresh"]
    assert dict(sessions.items()) == {"fresh": {"n": 1}}
    assert sessions.get("stale") is None and sessions.get("stale", "gone") == "gone"
    assert store.load("session:stale") is not None  # reading deletes nothing
    assert sorted(Sessions(store).keys()) == ["fresh", "stale"]  # without ttl: every stored key


def test_reading_a_key_another_thread_holds_does_not_wait(store_url):
    store = from_url(store_url)
    sessions = Sessions(store, lock_timeout=30)
    fill(sessions, {"busy": {"n": 1}, "idle": {"n": 2}})
    done = threading.Event()
    with held_in_another_thread(sessions, "busy"):
        reader = threading.Thread(target=lambda: (sessions.get("busy"), list(sessions.items()), done.set()))
        reader.start()
        # The holder keeps the key until this block ends: a reader that waited for the lock
        # would still be waiting (for up to lock_timeout=30 s) when this wait gives up.
        assert done.wait(20), "read access waited for the key's lock"
        reader.join()
        assert sessions.get("busy") == {"n": 1}
        assert dict(sessions.items()) == {"busy": {"n": 1}, "idle": {"n": 2}}


def test_migrated_as_a_handler_would_see_it_but_not_written_back(store_url):
    store = from_url(store_url)
    store.save("session:1", build_record("session:1", '{"n":4}', 0, time.time()))
    before = store.load("session:1")
    sessions = Sessions(store, version=1, migrations={1: lambda d: {"count": d["n"]}})
    assert sessions.get("1") == {"count": 4} and dict(sessions.items()) == {"1": {"count": 4}}
    assert store.load("session:1") == before


def test_a_corrupt_record_raises_or_is_skipped(store_url, caplog):
    store = from_url(store_url)
    sessions = Sessions(store)
    fill(sessions, {"good": {"n": 1}})
    store.save("session:bad", b"{broken")
    with pytest.raises(CorruptSessionError, match="'session:bad'"):
        sessions.get("bad")
    with pytest.raises(CorruptSessionError, match="'session:bad'"):
        dict(sessions.items())
    assert dict(sessions.items(skip_corrupt=True)) == {"good": {"n": 1}}
    assert "session:bad" in caplog.text
    assert sorted(sessions.keys()) == ["bad", "good"]  # keys() reads no record without ttl
    assert store.load("session:bad") == b"{broken"


PREFIXES = ["", "session:", "a", "a%", "a_", "a\\", "é", "\U0010ffff", "x\U0010ffff", "zz"]
KEYS = ["session:1", "session:2", "sessio", "a", "a%b", "a_b", "ab", "a\\c", "é1", "éé", "e",
        "\U0010ffff", "\U0010ffffq", "x\U0010ffff", "x\U0010ffffy", "y", ""]


def test_store_keys_and_records_by_prefix(store_url):
    store = from_url(store_url)
    for key in KEYS:
        store.save(key, f"record of {key}".encode())
    for prefix in PREFIXES:
        expected = sorted(k for k in KEYS if k.startswith(prefix))
        assert sorted(store.keys(prefix)) == expected, prefix
        got = sorted(store.records(prefix))
        assert got == [(k, f"record of {k}".encode()) for k in expected], prefix


def test_sqlite_records_stream_in_pages(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    for i in range(2500):
        store.save(f"p:{i:05d}", b"r")
        store.save(f"q:{i:05d}", b"r")
    records = store.records("p:")
    first = next(records)
    assert first == ("p:00000", b"r")
    # Rows come in pages of 1,000, each its own query: a write made while iterating (no read
    # transaction is held open, so it does not wait) shows in a later page.
    store.save("p:01500", b"changed while iterating", previous=b"r")
    rest = list(records)
    assert len(rest) == 2499 and rest[1499] == ("p:01500", b"changed while iterating")
    assert sum(1 for _ in store.keys("q:")) == 2500 and sum(1 for _ in store.keys()) == 5000


def test_typed_items_for_a_broadcast(tmp_path):
    sessions = Sessions(f"sqlite:{tmp_path / 's.db'}", initial=Prefs)
    for chat, lang in ((1, "de"), (2, "en"), (3, "de")):
        with sessions.open(str(chat)) as s:
            s.lang = lang
    german = [int(chat) for chat, prefs in sessions.items() if prefs.lang == "de"]
    assert sorted(german) == [1, 3]
    assert all(isinstance(p, Prefs) for _, p in sessions.items())
    assert json.loads(sessions.store.load("session:1"))["data"] == {"lang": "de", "tags": []}
