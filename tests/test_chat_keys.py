"""Business connections and group → supergroup moves, through a real TeleBot fed real Update JSON."""
import json
import logging
import time

import telebot
from support import drain
from telebot import types

from telesession import Sessions, keys, session
from telesession.chat_moves import move_chat
from telesession.records import build_record
from telesession.stores import from_url
from telesession.testing import callback_query_dict, message_dict, update_dict

TOKEN = "123456:TEST"


def make_bot(**options) -> telebot.TeleBot:
    options.setdefault("threaded", False)
    options.setdefault("use_class_middlewares", True)
    return telebot.TeleBot(TOKEN, **options)


def update(**fields) -> types.Update:
    """A real ``Update`` parsed by telebot from its JSON."""
    return types.Update.de_json(json.dumps(update_dict(**fields)))


def stored(sessions, key):
    """A copy of the session stored under ``key``, ``None`` if there is none (``Sessions.get`` where present)."""
    if hasattr(sessions, "get"):
        return sessions.get(key)
    if sessions.store.load(key) is None:
        return None
    with sessions.open(key) as s:
        return json.loads(json.dumps(dict(s)))


def business_message(text, chat_id, connection, **extra):
    payload = message_dict(text, chat_id, chat_id, business_connection_id=connection, **extra)
    return update(business_message=payload)


# -- business connections ----------------------------------------------------------------------------


def test_business_updates_through_two_connections_never_share_a_session(store_url):
    bot = make_bot()
    sessions = Sessions(from_url(store_url), initial=lambda: {"seen": []})
    sessions.setup(bot)
    views = []

    @bot.business_message_handler(func=lambda m: True)
    def business(message):
        views.append((message.business_connection_id, list(session["seen"])))
        session["seen"].append(message.text)

    @bot.edited_business_message_handler(func=lambda m: True)
    def edited(message):
        session["seen"].append("edit:" + message.text)

    @bot.deleted_business_messages_handler(func=lambda m: True)
    def deleted(event):
        session["seen"].append(f"deleted:{event.message_ids}")

    @bot.message_handler(func=lambda m: True)
    def direct(message):
        views.append(("direct", list(session["seen"])))
        session["seen"].append(message.text)

    customer = 555
    bot.process_new_updates([business_message("to A", customer, "bcA")])
    bot.process_new_updates([business_message("to B", customer, "bcB")])
    bot.process_new_updates([update(message=message_dict("to bot", customer, customer))])
    bot.process_new_updates([business_message("A again", customer, "bcA")])
    edited_payload = message_dict("B fixed", customer, customer, business_connection_id="bcB", edit_date=1)
    bot.process_new_updates([update(edited_business_message=edited_payload)])
    bot.process_new_updates([update(deleted_business_messages={
        "business_connection_id": "bcA", "chat": {"id": customer, "type": "private"}, "message_ids": [1]})])

    # every handler saw only its own connection's data
    assert views == [("bcA", []), ("bcB", []), ("direct", []), ("bcA", ["to A"])]
    assert stored(sessions, "b:bcA:555") == {"seen": ["to A", "A again", "deleted:[1]"]}
    assert stored(sessions, "b:bcB:555") == {"seen": ["to B", "edit:B fixed"]}
    assert stored(sessions, "555") == {"seen": ["to bot"]}


def test_every_key_strategy_keeps_business_connections_apart():
    plain = update(message=message_dict("x", -77, 9, message_thread_id=4)).message
    via_a = update(business_message=message_dict("x", 9, 9, business_connection_id="bcA")).business_message
    via_b = update(business_message=message_dict("x", 9, 9, business_connection_id="bcB")).business_message
    direct = update(message=message_dict("x", 9, 9)).message
    call = update(callback_query=callback_query_dict(
        "d", 9, 9, message=message_dict("menu", 9, 9, business_connection_id="bcA"))).callback_query
    assert keys.by_chat(direct) == "9" and keys.by_chat(via_a) == "b:bcA:9" and keys.by_chat(via_b) == "b:bcB:9"
    assert keys.by_user(direct) == "9" and keys.by_user(via_a) == "b:bcA:9"
    assert keys.by_user_in_chat(via_b) == "b:bcB:9:9" and keys.by_user_in_chat(direct) == "9:9"
    assert keys.by_chat_topic(via_a) == "b:bcA:9" and keys.by_chat_topic(plain) == "-77:4"
    assert keys.by_chat(call) == "b:bcA:9"  # a button on a business message belongs to that connection
    assert keys.prefixed("u:", keys.by_user)(via_b) == "u:b:bcB:9"
    for strategy in (keys.by_chat, keys.by_user, keys.by_user_in_chat, keys.by_chat_topic):
        found = {strategy(via_a), strategy(via_b), strategy(direct)}
        assert len(found) == 3, strategy.__name__


def test_by_chat_answers_a_plain_message_in_one_step_and_agrees_with_the_general_path():
    """by_chat's shortcut for telebot's ``Message`` gives what chat_id_of + _scoped give."""
    def general(m):
        found = keys.chat_id_of(m)
        found = keys.user_id_of(m) if found is None else found
        return None if found is None else keys._scoped(m, str(found))

    class MyMessage(types.Message):  # a subclass takes the general path
        pass

    direct = update(message=message_dict("x", -100123, 9)).message
    via_a = update(business_message=message_dict("x", 9, 9, business_connection_id="bcA")).business_message
    no_chat = update(message=message_dict("x", 5, 7)).message
    no_chat.chat = None  # built by hand: falls back to the user, as before
    sub = update(message=message_dict("x", 42, 9)).message
    sub.__class__ = MyMessage
    keys.by_chat(direct)  # the first call finds telebot's Message class
    assert keys._message_type is types.Message
    cases = {"-100123": direct, "b:bcA:9": via_a, "7": no_chat, "42": sub}
    for expected, message in cases.items():
        assert keys.by_chat(message) == general(message) == expected


def test_by_chat_without_business_connection_id_on_an_older_telebot(monkeypatch):
    """A telebot before Bot API 7.2 has no ``Message.business_connection_id``: no shortcut then."""
    monkeypatch.setattr(keys, "_message_type", None)
    old = update(message=message_dict("x", 31, 9)).message
    del old.business_connection_id  # what such a Message looks like
    assert [keys.by_chat(old) for _ in range(3)] == ["31", "31", "31"]
    assert keys._message_type is keys._NO_SHORTCUT


# -- group -> supergroup -----------------------------------------------------------------------------


def migration_updates(old: int, new: int, user: int = 9):
    """What Telegram sends: the notice in the old group, the notice in the supergroup."""
    to = message_dict(None, old, user, chat_type="group", migrate_to_chat_id=new)
    frm = message_dict(None, new, user, chat_type="supergroup", migrate_from_chat_id=old)
    return [update(message=to), update(message=frm)]


def counting_bot(sessions, **options):
    bot = make_bot(**options)
    sessions.setup(bot)

    @bot.message_handler(func=lambda m: m.text is not None)
    def count(message):
        session["n"] = session.get("n", 0) + 1
        session["last_chat"] = message.chat.id

    return bot


def test_a_group_that_becomes_a_supergroup_keeps_its_session(store_url):
    sessions = Sessions(from_url(store_url))
    bot = counting_bot(sessions)
    old, new = -4001, -1004001
    bot.process_new_updates([update(message=message_dict("hi", old, 9, chat_type="group")) for _ in range(3)])
    assert stored(sessions, str(old)) == {"n": 3, "last_chat": old}
    bot.process_new_updates(migration_updates(old, new))
    bot.process_new_updates([update(message=message_dict("again", new, 9, chat_type="supergroup"))])
    assert stored(sessions, str(new)) == {"n": 4, "last_chat": new}
    assert stored(sessions, str(old)) is None and str(old) not in set(sessions.store.keys())


def test_the_move_is_ordered_before_the_supergroups_first_message_on_a_threaded_bot(tmp_path):
    sessions = Sessions(from_url(f"sqlite:{tmp_path / 's.db'}"))
    bot = counting_bot(sessions, threaded=True, num_threads=4)
    try:
        old, new = -4002, -1004002
        bot.process_new_updates([update(message=message_dict("hi", old, 9, chat_type="group"))
                                 for _ in range(5)])
        drain(bot)
        # one batch: the two notices and a message in the supergroup right after
        bot.process_new_updates(migration_updates(old, new)
                                + [update(message=message_dict("x", new, 9, chat_type="supergroup"))])
        drain(bot)
        assert stored(sessions, str(new)) == {"n": 6, "last_chat": new}
        assert stored(sessions, str(old)) is None
    finally:
        bot.worker_pool.close()


def test_when_the_supergroup_has_a_session_already_both_are_kept(tmp_path, caplog):
    sessions = Sessions(from_url(f"json:{tmp_path / 'j'}"))
    bot = counting_bot(sessions)
    old, new = -4003, -1004003
    bot.process_new_updates([update(message=message_dict("hi", old, 9, chat_type="group"))])
    bot.process_new_updates([update(message=message_dict("hi", new, 9, chat_type="supergroup"))] * 2)
    with caplog.at_level(logging.WARNING, logger="telesession"):
        bot.process_new_updates(migration_updates(old, new))
    assert stored(sessions, str(old)) == {"n": 1, "last_chat": old}
    assert stored(sessions, str(new)) == {"n": 2, "last_chat": new}
    assert any("was not moved" in r.getMessage() and str(new) in r.getMessage() for r in caplog.records)


def test_keys_that_hold_the_chat_id_with_more_after_it_move_too(tmp_path):
    store = from_url(f"sqlite:{tmp_path / 's.db'}")
    per_user = Sessions(store, key=keys.by_user_in_chat, name="per_user")
    topics = Sessions(store, key=keys.prefixed("t:", keys.by_chat_topic), name="topics")
    for key in ("-5:1", "-5:2", "-50:1", "-5"):
        with per_user.open(key) as s:
            s["v"] = key
    with topics.open("t:-5") as s:
        s["v"] = "topic"
    moved = move_chat(per_user, -5, -1005)
    assert sorted(moved) == [("-5", "-1005"), ("-5:1", "-1005:1"), ("-5:2", "-1005:2")]
    assert move_chat(topics, -5, -1005) == [("t:-5", "t:-1005")]
    assert sorted(store.keys()) == ["per_user:-1005", "per_user:-1005:1", "per_user:-1005:2",
                                    "per_user:-50:1", "topics:t:-1005"]
    with per_user.open("-1005:2") as s:
        assert s == {"v": "-5:2"}
    assert json.loads(store.load("per_user:-1005:1"))["key"] == "per_user:-1005:1"  # names its new key
    assert move_chat(Sessions(store, key=keys.by_user), -50, -1050) == []  # no chat id in its keys


def test_a_moved_session_keeps_its_version_and_write_time(tmp_path):
    store = from_url(f"json:{tmp_path / 'j'}")
    written = time.time() - 100
    store.save("session:-6", build_record("session:-6", '{"n":1}', 2, written))
    sessions = Sessions(store, version=2, migrations={1: dict, 2: dict}, ttl=3600)
    assert move_chat(sessions, -6, -1006) == [("-6", "-1006")]
    record = json.loads(store.load("session:-1006"))
    assert record["version"] == 2 and abs(record["written"] - written) < 1e-3 and record["data"] == {"n": 1}


def test_an_unreadable_session_is_not_moved_and_the_update_is_still_handled(tmp_path, caplog):
    sessions = Sessions(from_url(f"sqlite:{tmp_path / 's.db'}"))
    bot = counting_bot(sessions)
    old_key, new_key = sessions._stored_key("-7"), sessions._stored_key("-1007")
    sessions.store.save(old_key, b"not json")
    with caplog.at_level(logging.ERROR, logger="telesession"):
        bot.process_new_updates(migration_updates(-7, -1007)[1:])
    assert sessions.store.load(old_key) == b"not json" and sessions.store.load(new_key) is None
    assert any("could not be moved" in r.getMessage() and "session:-7'" in r.getMessage() for r in caplog.records)
    bot.process_new_updates([update(message=message_dict("x", -1007, 9, chat_type="supergroup"))])
    assert stored(sessions, "-1007") == {"n": 1, "last_chat": -1007}
