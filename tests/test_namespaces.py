"""Stored keys: "{name}:{key}", and "{bot_id}:{name}:{key}" once a manager is set up on a bot."""
import pytest
import telebot
from support import drain

from telesession import Sessions, session
from telesession.stores import from_url
from telesession.testing import message_update


def make_bot(token: str) -> telebot.TeleBot:
    return telebot.TeleBot(token, threaded=True, num_threads=4, use_class_middlewares=True)


def count_in(bot: telebot.TeleBot, chat_id: int, times: int) -> None:
    bot.process_new_updates([message_update("/count", chat_id=chat_id) for _ in range(times)])
    drain(bot)


def test_two_bots_over_one_sqlite_store_are_kept_apart(tmp_path):
    url = f"sqlite:{tmp_path / 'bots.db'}"
    first, second = make_bot("111111:FIRST"), make_bot("222222:SECOND")
    managers = {}
    for bot in (first, second):
        sessions = Sessions(url, initial=lambda: {"count": 0})
        sessions.setup(bot)
        managers[bot] = sessions

        @bot.message_handler(commands=["count"])
        def count(message):
            session["count"] += 1

    try:
        count_in(first, 9, 5)
        count_in(second, 9, 3)
    finally:
        first.worker_pool.close()
        second.worker_pool.close()
    store = from_url(url)
    assert sorted(store.keys()) == ["111111:session:9", "222222:session:9"]
    assert managers[first].get("9") == {"count": 5} and managers[second].get("9") == {"count": 3}
    # open() and keys() of a set-up manager agree with its middleware
    with managers[first].open("9") as s:
        assert s["count"] == 5
    assert list(managers[second].keys()) == ["9"]


def test_the_bot_id_survives_a_token_change(tmp_path):
    url = f"sqlite:{tmp_path / 'bot.db'}"
    old, new = make_bot("111111:OLD-TOKEN"), make_bot("111111:REVOKED-AND-NEW")
    try:
        for bot, times in ((old, 2), (new, 3)):
            sessions = Sessions(url, initial=lambda: {"count": 0})
            sessions.setup(bot)

            @bot.message_handler(commands=["count"])
            def count(message):
                session["count"] += 1

            count_in(bot, 4, times)
    finally:
        old.worker_pool.close()
        new.worker_pool.close()
    reader = Sessions(url)
    reader.bind(111111)
    assert reader.get("4") == {"count": 5}


def test_bind_accepts_a_bot_a_token_or_an_id_and_serves_one_bot(tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    for target in (make_bot("42:A"), "42:A", 42):
        sessions = Sessions(store)
        sessions.bind(target)
        assert sessions.bot_id == 42 and sessions._stored_key("7") == "42:session:7"
        sessions.bind("42:ANOTHER-TOKEN")  # the same bot again: fine
        with pytest.raises(ValueError, match="already serves the bot 42"):
            sessions.bind(43)
    bot = make_bot("43:B")
    try:
        with pytest.raises(ValueError, match="already serves"):
            sessions.setup(bot)
        assert not bot.middlewares  # refused before anything was installed
    finally:
        bot.worker_pool.close()
    for bad in ("TOKEN", "abc:def", None, ""):
        with pytest.raises(ValueError, match="bot id"):
            Sessions(store).bind(bad)


def test_unbound_managers_use_their_name(tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    carts, profiles = Sessions(store, name="cart"), Sessions(store, name="profile")
    with carts.open("1") as c, profiles.open("1") as p:
        c["items"] = ["tea"]
        p["name"] = "Ann"
    assert sorted(store.keys()) == ["cart:1", "profile:1"]
    assert carts.get("1") == {"items": ["tea"]} and profiles.get("1") == {"name": "Ann"}
    assert store.describe("cart:1").endswith("cart%3A1.json")  # a file per stored key


def test_same_name_with_different_key_functions_is_warned_about(tmp_path, caplog):
    from telesession import keys

    url = f"sqlite:{tmp_path / 's.db'}"
    chats = Sessions(url)
    same = Sessions(url)  # another manager for the same sessions (a job, an admin tool): fine
    assert "different key functions" not in caplog.text
    users = Sessions(url, key=keys.by_user)  # by_chat and by_user meet in private chats
    assert "different key functions" in caplog.text and "name=" in caplog.text
    caplog.clear()
    apart = Sessions(url, key=keys.by_user, name="user")  # its own name: no warning
    assert "different key functions" not in caplog.text
    assert chats and same and users and apart
