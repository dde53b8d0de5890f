"""Typed (dataclass) sessions: they behave as their class, hold rich values checked on load, and evolve."""
import dataclasses
import datetime
import enum
import json
import logging
import time
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

import pytest
import telebot
from support import drain

from telesession import Sessions, keys, session
from telesession.errors import CorruptSessionError, SerializationError
from telesession.records import build_record
from telesession.stores import from_url
from telesession.testing import message_update

UTC = datetime.timezone.utc

#: Every attribute a mapping proxy has, plus the proxy's own ``delete``.
SHADOWED = ["items", "keys", "values", "get", "setdefault", "pop", "popitem", "update", "clear", "delete"]


@dataclasses.dataclass
class Shadowing:
    items: list = dataclasses.field(default_factory=list)
    keys: int = 0
    values: str = ""
    get: bool = False
    setdefault: Optional[str] = None
    pop: float = 0.0
    popitem: list = dataclasses.field(default_factory=list)
    update: int = 0
    clear: bool = False
    delete: bool = False


@dataclasses.dataclass
class Order:
    address: str = ""
    items: List[str] = dataclasses.field(default_factory=list)


def test_every_shadowed_field_name_is_the_field_through_every_access(store_url):
    sessions = Sessions(from_url(store_url), initial=Shadowing)
    assert sorted(f.name for f in dataclasses.fields(Shadowing)) == sorted(SHADOWED)
    with sessions.open("1") as s:
        for view in (s, session, sessions.current):
            assert view.items == [] and view.keys == 0 and view.values == "" and view.get is False
            assert view.setdefault is None and view.pop == 0.0 and view.popitem == []
            assert view.update == 0 and view.clear is False and view.delete is False
        session.items.append("pizza")
        s.keys += 1
        sessions.current.values = "v"
        session.get = True
        session.delete = True  # a field: no session is dropped
        if session.clear:  # a field that is False, not a bound method (always true)
            pytest.fail("session.clear is the method, not the field")
    with sessions.open("1") as s:
        assert s == Shadowing(items=["pizza"], keys=1, values="v", get=True, delete=True)
    assert sessions.get("1").items == ["pizza"]


def test_handler_parameter_is_the_instance(tmp_path):
    bot = telebot.TeleBot("123456:TEST", threaded=True, num_threads=2, use_class_middlewares=True)
    sessions = Sessions(from_url(f"sqlite:{tmp_path / 's.db'}"), initial=Shadowing, name="cart")
    sessions.setup(bot)
    seen = []

    @bot.message_handler(func=lambda m: True)
    def handle(message, cart):
        cart.items.append(message.text)
        seen.append((type(cart), isinstance(cart, Shadowing), dataclasses.asdict(cart)["items"][:]))

    try:
        bot.process_new_updates([message_update("a", chat_id=7)])
        drain(bot)
        bot.process_new_updates([message_update("b", chat_id=7)])
        drain(bot)
    finally:
        bot.worker_pool.close()
    assert [s[1:] for s in seen] == [(True, ["a"]), (True, ["a", "b"])]
    assert seen[0][0].__name__ == "Shadowing" and issubclass(seen[0][0], Shadowing)
    assert sessions.get("7") == Shadowing(items=["a", "b"])


def test_unknown_attributes_raise_and_save_nothing(tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    sessions = Sessions(store, initial=Order)
    with sessions.open("1") as s:
        s.address = "Main St 1"
    before = store.load("session:1")
    for setter in (lambda s: setattr(s, "adress", "x"), lambda s: setattr(session, "adress", "x"),
                   lambda s: setattr(sessions.current, "adress", "x")):
        with pytest.raises(AttributeError, match="adress") as info:
            with sessions.open("1") as s:
                s.address = "changed"
                setter(s)
        assert "address" in str(info.value)  # the message lists the fields
    with pytest.raises(AttributeError):
        with sessions.open("1"):
            session.adress  # reading a typo fails too (as on any object)
    assert store.load("session:1") == before


def test_isinstance_asdict_equality_and_json(tmp_path):
    sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=Order)
    with sessions.open("1") as s:
        s.items.append("tea")
        assert isinstance(s, Order) and isinstance(session, Order) and isinstance(sessions.current, Order)
        assert s == Order(items=["tea"]) and Order(items=["tea"]) == s and session == Order(items=["tea"])
        assert s != Order(items=["coffee"])
        assert dataclasses.asdict(s) == {"address": "", "items": ["tea"]}
        assert dataclasses.asdict(sessions.current) == dataclasses.asdict(session.__wrapped__)
        assert json.loads(json.dumps(dataclasses.asdict(s))) == {"address": "", "items": ["tea"]}
        assert repr(s) == "Order(address='', items=['tea'])"
        assert dataclasses.replace(s, address="x") == Order("x", ["tea"])


def test_delete_through_the_proxy_and_the_manager(tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    orders = Sessions(store, initial=Order, name="order")
    with orders.open("1") as s:
        s.items.append("x")
    with orders.open("1") as s:
        session.delete()  # no field named delete: the proxy's delete()
        assert s == Order() and s is orders.current  # reset in place: the instance stays the session
    assert store.load("order:1") is None

    shadowing = Sessions(store, initial=Shadowing, name="shadowing")
    with shadowing.open("1") as s:
        s.keys = 5
    with shadowing.open("1") as s:
        assert session.delete is False  # the field
        shadowing.delete_current()
        assert s.keys == 0
    assert store.load("shadowing:1") is None
    with shadowing.open("1") as s:
        shadowing.delete_current()
        s.keys = 2  # changed after delete: the new value is stored
    assert shadowing.get("1") == Shadowing(keys=2)


# -- rich values ---------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Address:
    street: str = ""
    since: Optional[datetime.date] = None


@dataclasses.dataclass
class Rich:
    when: datetime.datetime = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    naive: datetime.datetime = datetime.datetime(2024, 5, 1, 12, 0, 30, 250000)
    day: datetime.date = datetime.date(2024, 5, 1)
    color: Color = Color.RED
    level: Level = Level.LOW
    pair: Tuple[int, str] = (0, "")
    many: Tuple[int, ...] = ()
    tags: Set[str] = dataclasses.field(default_factory=set)
    frozen: FrozenSet[int] = frozenset()
    home: Optional[Address] = None
    addresses: List[Address] = dataclasses.field(default_factory=list)
    by_name: Dict[str, Address] = dataclasses.field(default_factory=dict)
    by_id: Dict[int, Color] = dataclasses.field(default_factory=dict)
    maybe: Optional[int] = None


def rich_value() -> Rich:
    return Rich(when=datetime.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
                naive=datetime.datetime(2025, 1, 2, 3, 4, 5), day=datetime.date(2025, 12, 31),
                color=Color.BLUE, level=Level.HIGH, pair=(7, "seven"), many=(1, 2, 3),
                tags={"b", "a", "c"}, frozen=frozenset({3, 1, 2}),
                home=Address("Main St 1", datetime.date(2020, 1, 1)),
                addresses=[Address("a"), Address("b", datetime.date(2021, 2, 3))],
                by_name={"work": Address("Office 5")}, by_id={10: Color.RED, 2: Color.BLUE}, maybe=0)


def test_each_rich_type_round_trips_with_its_type(store_url):
    store = from_url(store_url)
    sessions = Sessions(store, initial=Rich)
    with sessions.open("1") as s:
        assert s == Rich()
        for field in dataclasses.fields(Rich):
            setattr(s, field.name, getattr(rich_value(), field.name))
    record = store.load("session:1")
    with sessions.open("1") as s:
        assert s == rich_value()
        assert type(s.when) is datetime.datetime and s.when.utcoffset() == datetime.timedelta(hours=2)
        assert s.naive.tzinfo is None and type(s.day) is datetime.date
        assert s.color is Color.BLUE and s.level is Level.HIGH
        assert type(s.pair) is tuple and type(s.many) is tuple and type(s.tags) is set
        assert type(s.frozen) is frozenset and type(s.home) is Address and type(s.home.since) is datetime.date
        assert all(type(a) is Address for a in s.addresses) and type(s.by_name["work"]) is Address
        assert s.by_id == {10: Color.RED, 2: Color.BLUE} and s.maybe == 0
    assert store.load("session:1") == record  # unchanged: not rewritten (sets are encoded sorted)
    assert sessions.get("1") == rich_value()
    data = json.loads(record)["data"]
    assert data == {
        "when": "2025-01-02T03:04:05.678901+02:00", "naive": "2025-01-02T03:04:05", "day": "2025-12-31",
        "color": "blue", "level": 2, "pair": [7, "seven"], "many": [1, 2, 3], "tags": ["a", "b", "c"],
        "frozen": [1, 2, 3], "home": {"street": "Main St 1", "since": "2020-01-01"},
        "addresses": [{"street": "a", "since": None}, {"street": "b", "since": "2021-02-03"}],
        "by_name": {"work": {"street": "Office 5", "since": None}}, "by_id": {"10": "red", "2": "blue"},
        "maybe": 0}
    assert list(data) == [f.name for f in dataclasses.fields(Rich)]  # fields in declaration order


@pytest.mark.parametrize("field, value, path", [
    ("level", 3, "session.level"),
    ("pair", [1, 2], "session.pair[1]"),
    ("when", "yesterday", "session.when"),
    ("addresses", [{"street": 5}], "session.addresses[0].street"),
    ("by_id", {"x": "red"}, "session.by_id"),
    ("maybe", "1", "session.maybe"),
    ("color", "green", "session.color"),
])
def test_a_record_that_does_not_fit_is_refused_and_untouched(store_url, field, value, path):
    store = from_url(store_url)
    data = json.dumps({field: value})
    store.save("session:1", build_record("session:1", data, 0, time.time()))
    before = store.load("session:1")
    sessions = Sessions(store, initial=Rich)
    with pytest.raises(CorruptSessionError) as info:
        with sessions.open("1"):
            pytest.fail("the handler ran")
    message = str(info.value)
    assert path in message and "'session:1'" in message and "Rich" in message, message
    assert info.value.key == "session:1" and store.describe("session:1") in message
    with pytest.raises(CorruptSessionError, match=path.replace("[", r"\[").replace("]", r"\]")):
        sessions.get("1")
    assert store.load("session:1") == before  # bytes identical


@pytest.mark.parametrize("field, value, path", [
    ("level", "high", "session.level"),
    ("pair", [1, "x"], "session.pair"),  # a list in a tuple field would come back a tuple
    ("addresses", [Address(street=5)], "session.addresses[0].street"),  # type: ignore[arg-type]
    ("tags", ["a"], "session.tags"),
    ("when", "2024-01-01", "session.when"),
])
def test_a_value_that_does_not_fit_is_not_saved(tmp_path, field, value, path):
    store = from_url(f"sqlite:{tmp_path / 's.db'}")
    sessions = Sessions(store, initial=Rich)
    with sessions.open("1") as s:
        s.maybe = 1
    before = store.load("session:1")
    with pytest.raises(SerializationError) as info:
        with sessions.open("1") as s:
            s.maybe = 2
            setattr(s, field, value)
    assert info.value.path == path and path in str(info.value) and "'session:1'" in str(info.value)
    assert store.load("session:1") == before


def test_what_cannot_be_encoded_names_the_key(tmp_path):
    @dataclasses.dataclass
    class Holder:
        thing: object = None

    sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=Holder)
    with pytest.raises(SerializationError, match="'session:1'"):
        with sessions.open("1") as s:
            s.thing = threading_lock()


def threading_lock():
    import threading

    return threading.Lock()


# -- evolving the dataclass ------------------------------------------------------------------------


@dataclasses.dataclass
class V1:
    name: str = ""
    nickname: str = ""


@dataclasses.dataclass
class V2:  # nickname removed, age added
    name: str = ""
    age: int = 18


def test_field_added_takes_its_default_and_a_removed_one_is_dropped_on_the_next_save(store_url, caplog):
    store = from_url(store_url)
    with Sessions(store, initial=V1).open("1") as s:
        s.name, s.nickname = "Ann", "annie"
    old = store.load("session:1")
    sessions = Sessions(store, initial=V2)
    with caplog.at_level(logging.INFO, logger="telesession"):
        with sessions.open("1") as s:
            assert s == V2(name="Ann", age=18)  # reading changes nothing
        assert store.load("session:1") == old
        assert sessions.get("1") == V2("Ann", 18)
        with sessions.open("1") as s:
            s.age = 30
        assert json.loads(store.load("session:1"))["data"] == {"name": "Ann", "age": 30}
        with sessions.open("1") as s:
            s.age = 31
    dropped = [r for r in caplog.records if "nickname" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].levelno == logging.INFO, caplog.text
    assert "'session:1'" in dropped[0].getMessage() and "V2" in dropped[0].getMessage()


def test_a_required_field_missing_from_the_record_is_refused(tmp_path):
    @dataclasses.dataclass
    class Needs:
        user_id: int

    store = from_url(f"json:{tmp_path / 's'}")
    store.save("session:1", build_record("session:1", "{}", 0, time.time()))
    with pytest.raises(CorruptSessionError, match="user_id"):
        with Sessions(store, initial=lambda: Needs(0)).open("1"):
            pass
    sessions = Sessions(store, initial=Needs)  # a dataclass as initial needs defaults for new sessions
    with pytest.raises(CorruptSessionError, match="user_id"):
        sessions.get("1")


# -- migrations --------------------------------------------------------------------------------------


def test_migrations_with_gaps(store_url):
    store = from_url(store_url)
    for key, version, data in (("v1", 1, '{"n":1}'), ("v2", 2, '{"n":2}'), ("v3", 3, '{"count":3}')):
        store.save(f"session:{key}", build_record(f"session:{key}", data, version, time.time()))
    before = store.load("session:v1")
    # The bot started at version 2; version 1 records were all migrated long ago.
    sessions = Sessions(store, initial=lambda: {"count": 0}, version=3, migrations={3: lambda d: {"count": d["n"]}})
    with sessions.open("v2") as s:
        assert s == {"count": 2}
    assert json.loads(store.load("session:v2"))["version"] == 3
    with sessions.open("v3") as s:
        assert s == {"count": 3}
    with pytest.raises(CorruptSessionError) as info:
        with sessions.open("v1"):
            pass
    message = str(info.value)
    assert "version 1" in message and "migrations[2]" in message and "'session:v1'" in message, message
    assert store.load("session:v1") == before
    with sessions.open("new") as s:
        s["count"] = 1
    assert json.loads(store.load("session:new"))["version"] == 3


def test_migrations_feed_typed_sessions(tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    store.save("session:1", build_record("session:1", '{"name":"Ann","nickname":"a"}', 0, time.time()))
    sessions = Sessions(store, initial=V2, version=1,
                        migrations={1: lambda d: {"name": d["name"], "age": 40}})
    assert sessions.get("1") == V2("Ann", 40)
    assert json.loads(store.load("session:1"))["version"] == 0  # get() never writes back
    with sessions.open("1") as s:
        assert s == V2("Ann", 40)
    assert json.loads(store.load("session:1")) ["version"] == 1  # a migrated record is saved


# -- dict sessions keep the JSON-only rules ------------------------------------------------------


def test_dict_sessions_still_refuse_rich_values(tmp_path):
    sessions = Sessions(from_url(f"json:{tmp_path / 's'}"))
    for value in ((1, 2), {1, 2}, datetime.date(2024, 1, 1), Color.RED, Address()):
        with pytest.raises(SerializationError, match=r'session\["x"\]'):
            with sessions.open("1") as s:
                s["x"] = value


# -- a chat-level and a user-level manager over one store -------------------------------------------


def test_chat_and_user_managers_over_one_store_in_a_private_chat(store_url):
    store = from_url(store_url)
    bot = telebot.TeleBot("123456:TEST", threaded=True, num_threads=4, use_class_middlewares=True)
    chats = Sessions(store, initial=Order, name="chat")
    users = Sessions(store, initial=lambda: {"lang": "en"}, key=keys.by_user, name="user")
    chats.setup(bot)
    users.setup(bot)

    @bot.message_handler(func=lambda m: True)
    def handle(message, chat, user):
        chat.items.append(message.text)
        user["lang"] = "de"

    try:
        # A private chat: the chat's id is its user's id.
        bot.process_new_updates([message_update("pizza", chat_id=5, user_id=5)])
        drain(bot)
    finally:
        bot.worker_pool.close()
    assert sorted(store.keys()) == ["123456:chat:5", "123456:user:5"]
    assert chats.get("5") == Order(items=["pizza"]) and users.get("5") == {"lang": "de"}
    assert list(chats.keys()) == ["5"] and list(users.keys()) == ["5"]


def test_decorated_managers_over_one_store_stay_apart(tmp_path):
    store = from_url(f"sqlite:{tmp_path / 's.db'}")
    chats = Sessions(store, initial=Order, name="chat")
    users = Sessions(store, initial=lambda: {"lang": "en"}, key=keys.by_user, name="user")

    @chats.with_session
    @users.with_session
    def handle(message):
        chats.current.items.append("x")
        users.current["lang"] = "fr"

    handle(message_update("x", chat_id=9, user_id=9).message)
    assert sorted(store.keys()) == ["chat:9", "user:9"]
    with chats.open("9") as c, users.open("9") as u:
        assert c.items == ["x"] and u == {"lang": "fr"}


def test_names_that_could_meet_another_namespace_are_refused():
    for name in ("a:b", "", "1st", "telebot-states", "my session"):
        with pytest.raises(ValueError, match="name"):
            Sessions(name=name)


@dataclasses.dataclass
class Bounded:
    n: int = 0

    def __post_init__(self) -> None:
        assert self.n <= 100, "n is at most 100"  # any exception, not only TypeError/ValueError


def test_a_post_init_that_refuses_is_a_session_error_both_ways(tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    sessions = Sessions(store, initial=Bounded)
    store.save("session:big", build_record("session:big", '{"n":500}', 0, time.time()))
    before = store.load("session:big")
    with pytest.raises(CorruptSessionError, match="AssertionError"):
        with sessions.open("big"):
            pass
    assert store.load("session:big") == before  # left untouched
    with pytest.raises(SerializationError, match="AssertionError"):
        with sessions.open("small") as s:
            s.n = 500  # would not load back
    assert store.load("session:small") is None


def test_lazy_typed_sessions_give_a_proxy_that_behaves_as_the_class(tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    sessions = Sessions(store, initial=Shadowing, lazy=True)
    with sessions.open("1") as s:  # nothing read or locked yet
        assert store.load("session:1") is None
        s.items.append("x")  # first touch loads
        assert isinstance(s, Shadowing) and s == Shadowing(items=["x"]) and s.get is False
        with pytest.raises(AttributeError, match="typo"):
            s.typo = 1
    assert sessions.get("1") == Shadowing(items=["x"])


def test_the_proxy_outside_a_session(tmp_path):
    assert not isinstance(session, Order)  # no active session: the proxy is just a proxy
    assert repr(session) == "<session (none active)>"
    with pytest.raises(LookupError):
        session.items


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: int = 0


def test_frozen_dataclasses_and_hashes(tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    store.save("session:1", build_record("session:1", '{"a":3}', 0, time.time()))
    sessions = Sessions(store, initial=Frozen)
    with sessions.open("1") as s:
        assert s == Frozen(3) and hash(s) == hash(Frozen(3)) and {s: 1}[Frozen(3)] == 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.a = 4
        sessions.delete_current()  # still deletable
    assert sessions.get("1") is None


def test_sessions_pickle_and_copy_as_their_class(tmp_path):
    import copy
    import pickle

    sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=Order)
    with sessions.open("1") as s:
        s.items.append("tea")
        for clone in (pickle.loads(pickle.dumps(s)), copy.copy(s), copy.deepcopy(s)):
            assert type(clone) is Order and clone == s
        deep = copy.deepcopy(s)
        deep.items.append("changed")
        assert s.items == ["tea"]
