"""The manager's semantics: binding, write policy, errors, re-entrance, expiry, migrations, typed sessions."""
import dataclasses
import json
import os
import pickle
import time

import pytest
from support import held_in_another_thread

import telesession
from telesession import Sessions, errors, session
from telesession.errors import (ConflictError, CorruptSessionError, LockTimeout, NoActiveSession,
                                SerializationError, SessionError, StoreError)
from telesession.stores import JSONFileStore, MemoryStore


def counter() -> dict:
    return {"count": 0}


@pytest.fixture
def json_store(tmp_path):
    return JSONFileStore(str(tmp_path / "sessions"))


def read_record(store: JSONFileStore, key: str) -> dict:
    with open(store.path(key), "rb") as f:
        return json.loads(f.read())


def test_session_outside_a_handler_says_what_to_do():
    with pytest.raises(NoActiveSession) as info:
        session["x"]
    assert "@with_session" in str(info.value) and "setup(bot)" in str(info.value)
    with pytest.raises(NoActiveSession):
        Sessions().current["x"]
    assert isinstance(info.value, LookupError)


def test_initial_is_a_factory_and_never_shared():
    sessions = Sessions(initial=lambda: {"items": []})
    with sessions.open("a"):
        session["items"].append(1)
    with sessions.open("b") as b:
        assert b["items"] == []
    with pytest.raises(TypeError, match="factory"):
        Sessions(initial={"items": []})  # type: ignore[arg-type]


def test_open_binds_session_and_persists(json_store):
    sessions = Sessions(json_store, initial=counter)
    with sessions.open("42") as s:
        assert session["count"] == 0
        s["count"] += 5
        assert session["count"] == 5 and sessions.current["count"] == 5
    assert read_record(json_store, "session:42")["data"] == {"count": 5}
    again = Sessions(JSONFileStore(json_store.directory), initial=counter)
    with again.open("42") as s:
        assert s["count"] == 5


def test_written_only_when_changed(json_store):
    sessions = Sessions(json_store, initial=counter)
    with sessions.open("1"):
        pass
    assert not os.path.exists(json_store.path("session:1")), "an untouched new session must not be written"
    with sessions.open("1"):
        session["count"] = 1
    before = os.stat(json_store.path("session:1"))
    with sessions.open("1"):
        assert session["count"] == 1  # read only
        session["count"] = 1  # same value: nothing changed
    after = os.stat(json_store.path("session:1"))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_not_written_when_the_handler_raises(json_store):
    sessions = Sessions(json_store, initial=counter)
    with sessions.open("1"):
        session["count"] = 1
    with pytest.raises(RuntimeError):
        with sessions.open("1"):
            session["count"] = 99
            raise RuntimeError("boom")
    assert read_record(json_store, "session:1")["data"]["count"] == 1
    with sessions.open("1"):  # the lock was released
        assert session["count"] == 1


def test_save_on_error_writes_anyway(json_store):
    sessions = Sessions(json_store, initial=counter, save_on_error=True)
    with pytest.raises(KeyError):
        with sessions.open("1"):
            session["count"] = 7
            raise KeyError("x")
    assert read_record(json_store, "session:1")["data"]["count"] == 7


def test_delete_removes_the_record_and_starts_again(json_store):
    sessions = Sessions(json_store, initial=counter)
    with sessions.open("1"):
        session["count"] = 3
    with sessions.open("1"):
        session.delete()
        assert session["count"] == 0
    assert not os.path.exists(json_store.path("session:1"))
    with sessions.open("1") as s:
        assert s["count"] == 0
    # delete then change again: the new value is what is stored
    with sessions.open("1"):
        session["count"] = 3
    with sessions.open("1") as s:
        s.delete()
        s["count"] = 10
    assert read_record(json_store, "session:1")["data"]["count"] == 10


def test_same_key_in_the_same_thread_reenters_the_same_object():
    sessions = Sessions(initial=counter, lock_timeout=1)
    with sessions.open("1") as outer:
        outer["count"] += 1
        with sessions.open("1") as inner:
            assert inner.__wrapped__ is outer.__wrapped__
            inner["count"] += 1
        assert session["count"] == 2
    with sessions.open("1") as s:
        assert s["count"] == 2


def test_two_managers_over_one_store_exclude_each_other(json_store):
    first = Sessions(json_store, initial=counter)
    second = Sessions(JSONFileStore(json_store.directory), initial=counter, lock_timeout=0.2)
    with held_in_another_thread(first, "k"):
        with pytest.raises(LockTimeout) as info:
            with second.open("k"):
                pass
        assert "'session:k'" in str(info.value) and json_store.directory in str(info.value)
        assert info.value.key == "session:k" and isinstance(info.value, TimeoutError)
        with second.open("other"):  # other keys are free
            pass
    with second.open("k"):
        pass


def test_several_managers_in_one_handler():
    chats = Sessions(initial=lambda: {"form": "chat"}, name="chat")
    users = Sessions(initial=lambda: {"lang": "en"}, name="user")
    with chats.open("c1"):
        assert session["form"] == "chat"
        with users.open("u1"):
            assert session["lang"] == "en"  # innermost
            assert chats.current["form"] == "chat" and users.current["lang"] == "en"
            users.current["lang"] = "de"
            chats.current["form"] = "done"
        assert session["form"] == "done"
        with pytest.raises(NoActiveSession, match="user"):
            users.current["lang"]
    with users.open("u1") as u, chats.open("c1") as c:
        assert u["lang"] == "de" and c["form"] == "done"


def test_with_session_decorator_uses_the_first_argument():
    sessions = Sessions(initial=counter)

    class Chat:
        def __init__(self, id):
            self.id = id

    class Message:
        def __init__(self, chat_id):
            self.chat = Chat(chat_id)

    @sessions.with_session
    def handler(message, extra=1):
        session["count"] += extra
        return session["count"]

    assert handler(Message(5)) == 1
    assert handler(Message(5), extra=2) == 3
    assert handler(Message(6)) == 1
    assert handler.__name__ == "handler"


def test_update_without_a_key_runs_without_a_session():
    sessions = Sessions(initial=counter)

    @sessions.with_session
    def handler(poll):
        with pytest.raises(NoActiveSession, match="no chat or user"):
            session["count"] += 1
        return "ran"

    class Poll:
        id = "p"

    assert handler(Poll()) == "ran"


def test_key_function_must_return_a_string():
    sessions = Sessions(key=lambda update: 123)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="str"):
        sessions.with_session(lambda update: None)(object())
    with pytest.raises(TypeError):
        sessions.open(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="surrogate"):
        sessions.open("\udcff")


def test_a_handler_key_is_computed_once_and_checked_on_every_path():
    calls = []
    returned = {"key": "чат-1"}

    class Key(str):
        pass

    def key(update):
        calls.append(update)
        return returned["key"]

    sessions = Sessions(key=key, initial=lambda: {"n": 0})

    @sessions.with_session
    def handler(update):
        session["n"] += 1
        return session["n"]

    assert handler("u1") == 1 and calls == ["u1"]  # a non-ASCII key: checked, then stored
    returned["key"] = Key("чат-1")  # a str subclass: the same session
    assert handler("u2") == 2 and calls == ["u1", "u2"]
    returned["key"] = "\udcff"  # a lone surrogate cannot be stored anywhere
    with pytest.raises(ValueError, match="surrogate"):
        handler("u3")
    assert calls == ["u1", "u2", "u3"]
    assert sessions.get("чат-1") == {"n": 2}


def test_module_level_with_session_follows_configure(tmp_path):
    @telesession.with_session
    def handler(update):
        session["n"] = session.get("n", 0) + 1
        return session["n"]

    class Update:
        class chat:
            id = 77

    try:
        assert handler(Update()) == 1
        manager = telesession.configure(store=JSONFileStore(str(tmp_path / "s")), initial=lambda: {"n": 10})
        assert handler(Update()) == 11
        assert json.loads(open(manager.store.path("session:77")).read())["data"] == {"n": 11}
    finally:
        telesession.configure()


@pytest.mark.parametrize("value, path", [
    ((1, 2), 'session["pos"]'),
    ({1: "a"}, 'session["pos"]'),
    ({"a": [1, {2, 3}]}, 'session["pos"]["a"][1]'),
    (float("nan"), 'session["pos"]'),
    (object(), 'session["pos"]'),
])
def test_unserializable_values_name_the_path_and_change_nothing(json_store, value, path):
    sessions = Sessions(json_store, initial=counter)
    with sessions.open("1"):
        session["count"] = 1
    before = open(json_store.path("session:1"), "rb").read()
    with pytest.raises(SerializationError) as info:
        with sessions.open("1"):
            session["count"] = 2
            session["pos"] = value
    assert info.value.path == path, str(info.value)
    assert path in str(info.value) and "'session:1'" in str(info.value) and json_store.path("session:1") in str(info.value)
    assert open(json_store.path("session:1"), "rb").read() == before
    with sessions.open("1") as s:  # the lock was released, the old session is intact
        assert s["count"] == 1


def test_corrupt_record_is_reported_and_left_untouched(json_store):
    path = json_store.path("session:9")
    with open(path, "wb") as f:
        f.write(b'{"data": {"count": 1')
    sessions = Sessions(json_store, initial=counter)
    ran = []

    @sessions.with_session
    def handler(update):
        ran.append(1)

    class Update:
        class chat:
            id = 9

    with pytest.raises(CorruptSessionError) as info:
        handler(Update())
    assert not ran
    assert "'session:9'" in str(info.value) and path in str(info.value)
    assert info.value.key == "session:9" and isinstance(info.value, StoreError)
    assert open(path, "rb").read() == b'{"data": {"count": 1'


def test_expired_sessions_start_again(json_store):
    sessions = Sessions(json_store, initial=counter, ttl=60)
    with sessions.open("1"):
        session["count"] = 5
    with sessions.open("1") as s:
        assert s["count"] == 5
    record = read_record(json_store, "session:1")
    record["written"] -= 61
    with open(json_store.path("session:1"), "w") as f:
        json.dump(record, f)
    with sessions.open("1") as s:
        assert s["count"] == 0
        s["count"] = 1
    assert read_record(json_store, "session:1")["data"]["count"] == 1


def test_migrations_upgrade_old_records(json_store):
    with open(json_store.path("session:1"), "w") as f:
        json.dump({"version": 0, "written": time.time(), "key": "session:1", "data": {"n": 1}}, f)
    sessions = Sessions(json_store, initial=lambda: {"count": 0, "lang": "en"}, version=2, migrations={
        1: lambda d: {"count": d["n"]},
        2: lambda d: {**d, "lang": "en"},
    })
    with sessions.open("1") as s:
        assert s == {"count": 1, "lang": "en"}
    record = read_record(json_store, "session:1")
    assert record["version"] == 2 and record["data"] == {"count": 1, "lang": "en"}
    with sessions.open("new") as s:
        s["count"] = 1
    assert read_record(json_store, "session:new")["version"] == 2


def test_newer_record_version_is_refused(json_store):
    with open(json_store.path("session:1"), "w") as f:
        json.dump({"version": 5, "written": time.time(), "key": "session:1", "data": {}}, f)
    sessions = Sessions(json_store, version=1, migrations={1: dict})
    with pytest.raises(CorruptSessionError, match="newer"):
        with sessions.open("1"):
            pass


def test_only_the_migrations_records_need_are_required(json_store):
    Sessions(version=2, migrations={2: dict})  # a bot that started at version 1
    with pytest.raises(ValueError, match="version"):
        Sessions(version=-1)


@dataclasses.dataclass
class Profile:
    name: str = ""
    age: int = 0
    tags: list = dataclasses.field(default_factory=list)


def test_dataclass_sessions(json_store):
    sessions: Sessions[Profile] = Sessions(json_store, initial=Profile)
    with sessions.open("1"):
        assert isinstance(session.__wrapped__, Profile)
        session.name = "Ann"
        sessions.current.tags.append("x")
    assert read_record(json_store, "session:1")["data"] == {"name": "Ann", "age": 0, "tags": ["x"]}
    with sessions.open("1") as p:
        assert p == Profile("Ann", 0, ["x"]) and isinstance(p, Profile)
    before = os.stat(json_store.path("session:1")).st_mtime_ns
    with sessions.open("1") as p:
        p.age = 0  # unchanged
    assert os.stat(json_store.path("session:1")).st_mtime_ns == before


def test_dataclass_record_that_no_longer_fits(json_store):
    with open(json_store.path("session:1"), "w") as f:
        json.dump({"version": 0, "written": time.time(), "key": "session:1", "data": {"age": "x"}}, f)
    sessions = Sessions(json_store, initial=Profile)
    with pytest.raises(CorruptSessionError, match="Profile") as info:
        with sessions.open("1"):
            pass
    assert "session.age" in str(info.value) and "migration" in str(info.value)


def test_lazy_session_untouched_takes_no_lock_and_reads_nothing(json_store):
    with open(json_store.path("session:1"), "wb") as f:
        f.write(b"garbage")  # any read would raise CorruptSessionError
    holder = Sessions(JSONFileStore(json_store.directory))
    lazy = Sessions(json_store, lazy=True, lock_timeout=0.1)
    with held_in_another_thread(holder, "2"):
        with lazy.open("1"):
            pass  # no read, so no CorruptSessionError
        with lazy.open("2"):
            pass  # no lock, so no LockTimeout although another thread holds "2"
        with pytest.raises(LockTimeout):
            with lazy.open("2") as s:
                s["x"] = 1  # first touch takes the lock
        with pytest.raises(CorruptSessionError):
            with lazy.open("1") as s:
                s.get("x")
    with lazy.open("2") as s:
        s["x"] = 1
    assert read_record(json_store, "session:2")["data"] == {"x": 1}


def test_errors_share_one_base_and_pickle():
    samples = [NoActiveSession("m"), LockTimeout("m", "k", "w"), StoreError("m", "k", "w"),
               CorruptSessionError("m", "k", "w"), SerializationError("m", "k", "w", "session['a']"),
               ConflictError("m", "k", "w"), errors.BacklogFull("m", "k")]
    for exc in samples:
        assert isinstance(exc, SessionError)
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == "m" and copy.key == exc.key and copy.where == exc.where
    assert pickle.loads(pickle.dumps(samples[4])).path == "session['a']"
    assert set(errors.__all__) == {"SessionError", "NoActiveSession", "LockTimeout", "StoreError",
                                   "CorruptSessionError", "SerializationError", "ConflictError", "BacklogFull"}


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, telesession; print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'telebot')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_memory_store_copies(tmp_path):
    store = MemoryStore()
    sessions = Sessions(store, initial=lambda: {"items": []})
    with sessions.open("1") as s:
        items = s["items"]
        items.append(1)
    items.append(2)  # after the lock is gone: must not reach the store
    with sessions.open("1") as s:
        assert s["items"] == [1]


def test_prefixed_keys_let_two_managers_share_a_store(json_store):
    from telesession import keys

    class User:
        id = 5

    class Chat:
        id = 5  # a private chat: its id is the user's id

    class Message:
        from_user = User()
        chat = Chat()

    chats = Sessions(json_store, initial=lambda: {"form": "empty"})
    users = Sessions(json_store, initial=lambda: {"lang": "en"}, key=keys.prefixed("user:", keys.by_user))

    @chats.with_session
    @users.with_session
    def handler(message):
        assert users.current["lang"] == "en" and chats.current["form"] == "empty"
        chats.current["form"] = "filled"
        users.current["lang"] = "de"

    handler(Message())
    assert sorted(json_store.keys()) == ["session:5", "session:user:5"]
    assert read_record(json_store, "session:user:5")["data"] == {"lang": "de"}
    assert keys.prefixed("u:", keys.by_user)(object()) is None
