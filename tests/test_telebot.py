"""A real threaded TeleBot processing real Update objects through the middleware and the decorator."""
import os
import threading
import time

import pytest
import telebot
from support import drain, held_in_another_thread
from telebot.handler_backends import BaseMiddleware, CancelUpdate

from telesession import Sessions, SessionMiddleware, keys, session
from telesession.stores import from_url
from telesession.testing import callback_update, make_update, message_update

TOKEN = "123456:TEST"


def make_bot(**options) -> telebot.TeleBot:
    options.setdefault("threaded", True)
    options.setdefault("num_threads", 8)
    options.setdefault("use_class_middlewares", True)
    return telebot.TeleBot(TOKEN, **options)


def stop(bot: telebot.TeleBot) -> None:
    bot.worker_pool.close()


@pytest.fixture
def bot():
    bot = make_bot()
    yield bot
    stop(bot)


def test_middleware_counts_exactly_on_one_chat(store_url, bot):
    sessions = Sessions(from_url(store_url), initial=lambda: {"count": 0})
    sessions.setup(bot)

    @bot.message_handler(commands=["count"])
    def count(message):
        session["count"] += 1

    n = 16 * 25
    bot.process_new_updates([message_update("/count", chat_id=7) for _ in range(n)])
    drain(bot)
    with sessions.open("7") as s:
        assert s["count"] == n


def test_decorator_counts_exactly_over_many_chats(store_url, bot):
    sessions = Sessions(from_url(store_url), initial=lambda: {"count": 0})

    @bot.message_handler(func=lambda m: True)
    @sessions.with_session
    def count(message):
        session["count"] += 1

    chats = list(range(1, 11))
    bot.process_new_updates([message_update("hi", chat_id=c) for _ in range(30) for c in chats])
    drain(bot)
    for chat in chats:
        with sessions.open(str(chat)) as s:
            assert s["count"] == 30


def test_one_chat_serializes_while_other_chats_overlap(bot, tmp_path):
    sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=lambda: {"count": 0})
    sessions.setup(bot)
    spans = []
    spans_lock = threading.Lock()

    @bot.message_handler(func=lambda m: True)
    def slow(message):
        start = time.monotonic()
        time.sleep(0.02)
        session["count"] += 1
        with spans_lock:
            spans.append((message.chat.id, start, time.monotonic()))

    bot.process_new_updates([message_update("x", chat_id=c) for _ in range(6) for c in (1, 2, 3, 4)])
    drain(bot)
    assert len(spans) == 24
    same_chat_overlaps = cross_chat_overlaps = 0
    for i, (chat_a, a0, a1) in enumerate(spans):
        for chat_b, b0, b1 in spans[i + 1:]:
            if a0 < b1 and b0 < a1:
                if chat_a == chat_b:
                    same_chat_overlaps += 1
                else:
                    cross_chat_overlaps += 1
    assert same_chat_overlaps == 0
    assert cross_chat_overlaps > 0
    for chat in (1, 2, 3, 4):
        with sessions.open(str(chat)) as s:
            assert s["count"] == 6


def test_handler_receives_the_session_through_data(bot):
    sessions = Sessions(initial=lambda: {"seen": []}, name="state")
    sessions.setup(bot)
    got = []

    @bot.message_handler(func=lambda m: True)
    def handler(message, state):
        state["seen"].append(message.text)
        got.append(state.__wrapped__ is sessions.current.__wrapped__)

    bot.process_new_updates([message_update("a", chat_id=1), message_update("b", chat_id=1)])
    drain(bot)
    assert got == [True, True]
    with sessions.open("1") as s:
        assert sorted(s["seen"]) == ["a", "b"]


def test_handler_exception_discards_changes_and_releases(bot):
    sessions = Sessions(initial=lambda: {"count": 0}, lock_timeout=2)
    sessions.setup(bot)

    @bot.message_handler(func=lambda m: True)
    def handler(message):
        session["count"] += 1
        if message.text == "fail":
            raise RuntimeError("handler failed")

    bot.process_new_updates([message_update("ok", chat_id=1), message_update("fail", chat_id=1),
                             message_update("ok", chat_id=1)])
    drain(bot)
    with sessions.open("1") as s:
        assert s["count"] == 2


class Canceller(BaseMiddleware):
    """A middleware registered after ours that cancels some updates or raises in pre_process."""

    def __init__(self):
        super().__init__()
        self.update_types = ["message"]

    def pre_process(self, message, data):
        if message.text == "cancel":
            return CancelUpdate()
        if message.text == "raise":
            raise RuntimeError("middleware failed")

    def post_process(self, message, data, exception):
        pass


def test_a_later_middleware_cancelling_or_raising_does_not_leak_the_lock(bot):
    bot.exception_handler = None
    sessions = Sessions(initial=lambda: {"count": 0}, lock_timeout=2)
    sessions.setup(bot)
    bot.setup_middleware(Canceller())
    handled = []

    @bot.message_handler(func=lambda m: True)
    def handler(message):
        session["count"] += 1
        handled.append(message.text)

    texts = ["cancel", "ok", "raise", "ok", "cancel", "ok"]
    for text in texts:  # one at a time, so a leaked lock would block the next update of chat 1
        bot.process_new_updates([message_update(text, chat_id=1)])
        drain(bot)
    assert handled == ["ok", "ok", "ok"]
    with sessions.open("1") as s:
        assert s["count"] == 3


def test_setup_needs_class_middlewares():
    plain = make_bot(use_class_middlewares=False)
    try:
        with pytest.raises(ValueError, match="use_class_middlewares=True"):
            Sessions().setup(plain)
    finally:
        stop(plain)


def test_middleware_is_a_telebot_middleware(bot):
    middleware = Sessions().setup(bot)
    assert isinstance(middleware, SessionMiddleware) and isinstance(middleware, BaseMiddleware)
    assert middleware in bot.middlewares
    assert {"message", "callback_query", "inline_query", "poll"} <= set(middleware.update_types)


def test_chat_and_user_sessions_side_by_side_with_callbacks(bot):
    chats = Sessions(initial=lambda: {"clicks": 0}, name="chat")
    users = Sessions(initial=lambda: {"clicks": 0}, key=keys.by_user, name="user")
    chats.setup(bot)
    users.setup(bot)

    @bot.callback_query_handler(func=lambda c: True)
    def clicked(call, chat, user):
        chat["clicks"] += 1
        user["clicks"] += 1
        assert session.__wrapped__ is user.__wrapped__  # the innermost is the one set up last

    updates = ([callback_update("x", chat_id=-100, user_id=u) for u in (1, 2, 3) for _ in range(5)]
               + [callback_update("x", chat_id=1, user_id=1) for _ in range(5)])
    bot.process_new_updates(updates)
    drain(bot)
    with chats.open("-100") as c, users.open("1") as u1, users.open("2") as u2:
        assert c["clicks"] == 15 and u1["clicks"] == 10 and u2["clicks"] == 5


def test_updates_without_a_chat_or_user_run_without_session(bot):
    sessions = Sessions(initial=lambda: {"n": 0})
    sessions.setup(bot)
    outcomes = []

    @bot.poll_handler(func=lambda p: True)
    def poll(p):
        try:
            session["n"] += 1
            outcomes.append("touched")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    bot.process_new_updates([make_update("poll")])
    drain(bot)
    assert outcomes == ["NoActiveSession"]


@pytest.mark.parametrize("kind, strategy, expected", [
    ("message", keys.by_chat, "-5"),
    ("message", keys.by_user, "9"),
    ("message", keys.by_user_in_chat, "-5:9"),
    ("callback_query", keys.by_chat, "-5"),
    ("inline_query", keys.by_chat, "9"),
    ("chosen_inline_result", keys.by_user, "9"),
    ("shipping_query", keys.by_chat, "9"),
    ("pre_checkout_query", keys.by_chat, "9"),
    ("poll_answer", keys.by_user, "9"),
    ("my_chat_member", keys.by_chat, "-5"),
    ("chat_member", keys.by_user_in_chat, "-5:9"),
    ("chat_join_request", keys.by_chat, "-5"),
    ("message_reaction", keys.by_chat, "-5"),
    ("business_message", keys.by_chat, "b:bc1:-5"),
    ("business_message", keys.by_user, "b:bc1:9"),
    ("deleted_business_messages", keys.by_chat, "b:bc1:-5"),
    ("poll", keys.by_chat, None),
])
def test_key_strategies_on_every_update_kind(kind, strategy, expected):
    update = make_update(kind, chat_id=-5, user_id=9)
    assert strategy(getattr(update, kind)) == expected


def test_forum_topics_get_their_own_session():
    update = message_update("x", chat_id=-100, user_id=1)
    message = update.message
    assert keys.by_chat_topic(message) == "-100"
    message.message_thread_id, message.is_topic_message = 12, True
    assert keys.by_chat_topic(message) == "-100:12"


def test_ordered_processing_keeps_each_chats_order(tmp_path):
    bot = make_bot()
    try:
        sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=lambda: {"seen": []})
        sessions.setup(bot, ordered=True)
        bot.setup_middleware(Canceller())  # cancels some updates after our pre_process ran

        @bot.message_handler(func=lambda m: True)
        def record(message):
            if message.text.endswith(":3"):
                time.sleep(0.01)  # make the race that ordering prevents likely
            session["seen"].append(int(message.text.split(":")[1]))

        @bot.poll_handler(func=lambda p: True)
        def poll(p):  # no key: gets no ticket, must never stall anyone
            pass

        chats, per_chat = 12, 25
        updates = []
        for i in range(per_chat):
            for chat in range(chats):
                updates.append(message_update(f"{chat}:{i}", chat_id=chat + 1))
            updates.append(make_update("poll"))
            updates.append(message_update("cancel", chat_id=1))
        bot.process_new_updates(updates[: len(updates) // 2])
        bot.process_new_updates(updates[len(updates) // 2:])
        drain(bot)
        for chat in range(chats):
            with sessions.open(str(chat + 1)) as s:
                assert s["seen"] == list(range(per_chat)), chat
        assert bot._telesession.scheduler.busy_keys() == 0
    finally:
        stop(bot)


def test_ordered_an_update_taken_by_a_next_step_handler_never_stalls_its_chat(tmp_path, caplog):
    """telebot hands such a message straight to the step handler, past every middleware."""
    bot = make_bot()
    try:
        sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=lambda: {"seen": []},
                            lock_timeout=5)
        sessions.setup(bot, ordered=True)
        steps = []

        @bot.message_handler(commands=["ask"])
        def ask(message):
            session["seen"].append(message.text)
            bot.register_next_step_handler(message, lambda answer: steps.append(answer.text))

        @bot.message_handler(func=lambda m: True)
        def other(message):
            session["seen"].append(message.text)

        bot.process_new_updates([message_update("/ask", chat_id=3)])
        drain(bot)
        started = time.monotonic()
        bot.process_new_updates([message_update("answer", chat_id=3)])  # to the step handler
        bot.process_new_updates([message_update("after", chat_id=3)])
        drain(bot)
        assert time.monotonic() - started < 2.5, "the next update waited for a ticket that never ends"
        assert steps == ["answer"]
        with sessions.open("3") as s:
            assert s["seen"] == ["/ask", "after"]
        assert "out of order" not in caplog.text
        assert bot._telesession.scheduler.busy_keys() == 0
    finally:
        stop(bot)


def test_ordered_a_step_handler_that_raises_in_an_unthreaded_bot_never_stalls_its_chat(tmp_path):
    """With threaded=False telebot re-raises from dispatch: the ticket must still be finished."""
    bot = make_bot(threaded=False)
    sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=lambda: {"seen": []}, lock_timeout=3)
    sessions.setup(bot, ordered=True)

    def step(answer):
        raise RuntimeError("the step failed")

    @bot.message_handler(commands=["ask"])
    def ask(message):
        session["seen"].append(message.text)
        bot.register_next_step_handler(message, step)

    @bot.message_handler(func=lambda m: True)
    def other(message):
        session["seen"].append(message.text)

    bot.process_new_updates([message_update("/ask", chat_id=3)])
    with pytest.raises(RuntimeError, match="the step failed"):
        bot.process_new_updates([message_update("answer", chat_id=3)])
    started = time.monotonic()
    bot.process_new_updates([message_update("after", chat_id=3)])
    assert time.monotonic() - started < 1.5, "the next update waited for the failed update's ticket"
    assert bot._telesession.scheduler.busy_keys() == 0
    with sessions.open("3") as s:
        assert s["seen"] == ["/ask", "after"]


class CountingHandler(telebot.ExceptionHandler):
    """Collects the exceptions that escape telebot's tasks (what a bot would log)."""

    def __init__(self):
        self.errors = []
        self.lock = threading.Lock()

    def handle(self, exception):
        with self.lock:
            self.errors.append(exception)
        return True


def test_redis_outage_mid_run_gives_store_errors_and_the_bot_recovers(redis_server, redis_store_url):
    from telesession.errors import StoreError

    bot = make_bot()
    bot.exception_handler = CountingHandler()
    try:
        failures = []
        sessions = Sessions(from_url(redis_store_url, socket_timeout=2, socket_connect_timeout=2),
                            initial=lambda: {"count": 0}, on_error=lambda update, exc: failures.append(exc))
        sessions.setup(bot)
        handled = []

        @bot.message_handler(func=lambda m: True)
        def count(message):
            session["count"] += 1
            handled.append(message.chat.id)

        bot.process_new_updates([message_update("x", chat_id=c) for c in (1, 2) for _ in range(50)])
        drain(bot)
        redis_server.client().save()  # so the restarted server comes back with the data
        redis_server.stop()
        started = time.monotonic()
        bot.process_new_updates([message_update("x", chat_id=c) for c in (1, 2) for _ in range(20)])
        drain(bot)
        assert time.monotonic() - started < 60, "the outage made the bot hang"
        assert bot.exception_handler.errors == []  # on_error got them, telebot saw nothing
        assert len(failures) == 40
        assert all(isinstance(e, StoreError) and "127.0.0.1" in str(e) for e in failures)
        redis_server.start()
        bot.process_new_updates([message_update("x", chat_id=c) for c in (1, 2) for _ in range(30)])
        drain(bot)
        assert len(handled) == 160  # every update handled while Redis was up, none during the outage
        with sessions.open("1") as one, sessions.open("2") as two:
            assert one["count"] == 80 and two["count"] == 80
    finally:
        stop(bot)
        redis_server.start()
        dump = os.path.join(redis_server.directory, "dump.rdb")
        if os.path.exists(dump):
            os.unlink(dump)


def test_one_broken_chat_does_not_stop_the_others(bot, tmp_path):
    from telesession.errors import StoreError

    bot.exception_handler = CountingHandler()
    store = from_url(f"json:{tmp_path / 's'}")
    os.mkdir(store.path("123456:session:13"))  # chat 13's record path is a directory: unreadable and unwritable
    errors = []
    sessions = Sessions(store, initial=lambda: {"count": 0}, on_error=lambda update, exc: errors.append(exc))
    sessions.setup(bot)

    @bot.message_handler(func=lambda m: True)
    def count(message):
        session["count"] += 1

    bot.process_new_updates([message_update("x", chat_id=c) for c in (12, 13, 14) for _ in range(10)])
    drain(bot)
    assert bot.exception_handler.errors == []
    assert len(errors) == 10 and all(isinstance(e, StoreError) and "'123456:session:13'" in str(e) for e in errors)
    with sessions.open("12") as a, sessions.open("14") as b:
        assert a["count"] == 10 and b["count"] == 10


def test_lazy_sessions_through_the_middleware_touch_nothing_until_used(bot, tmp_path):
    store = from_url(f"json:{tmp_path / 's'}")
    with open(store.path("123456:session:5"), "wb") as f:
        f.write(b"not json")  # reading it would raise CorruptSessionError
    failures = []
    sessions = Sessions(store, initial=lambda: {"count": 0}, lazy=True, lock_timeout=0.2,
                        on_error=lambda update, exc: failures.append(exc))
    sessions.setup(bot)
    bot.exception_handler = CountingHandler()
    ran = []

    @bot.message_handler(commands=["ping"])
    def ping(message):  # never touches the session: no lock, no read
        ran.append("ping")

    @bot.message_handler(commands=["count"])
    def count(message):
        session["count"] += 1
        ran.append("count")

    holder = Sessions(from_url(f"json:{tmp_path / 's'}"))
    holder.bind(bot)  # the same stored keys as the bot's manager
    with held_in_another_thread(holder, "6"):
        bot.process_new_updates([message_update("/ping", chat_id=5), message_update("/ping", chat_id=6)])
        drain(bot)
        assert ran == ["ping", "ping"] and failures == []
        bot.process_new_updates([message_update("/count", chat_id=6)])
        drain(bot)
        assert [type(e).__name__ for e in failures] == ["LockTimeout"]
    bot.process_new_updates([message_update("/count", chat_id=6), message_update("/count", chat_id=5)])
    drain(bot)
    assert ran.count("count") == 1  # chat 6 counted; chat 5's corrupt record refused
    assert [type(e).__name__ for e in failures] == ["LockTimeout", "CorruptSessionError"]
    assert bot.exception_handler.errors == []  # on_error got them; telebot saw nothing
    with sessions.open("6") as s:
        assert s["count"] == 1


# ---- every update type telebot dispatches gets its session (issue 11) ------------------------

import inspect  # noqa: E402
import re  # noqa: E402

from telebot import types as tb_types  # noqa: E402
from telebot import util as tb_util  # noqa: E402

from telesession import context  # noqa: E402
from telesession.middleware import UPDATE_TYPES  # noqa: E402
from telesession.testing import UPDATE_KINDS, update_dict, user_dict, chat_dict, message_dict  # noqa: E402


def telebot_dispatch_types():
    """The update types telebot hands to class middlewares, read from telebot's own dispatch code."""
    source = inspect.getsource(telebot.TeleBot)
    return set(re.findall(r"_notify_command_handlers\(\s*[^()]*?,\s*'(\w+)'\s*\)", source))


#: Update JSON for kinds the factories do not build (newer Bot API types).
EXTRA_UPDATES = {
    "managed_bot": lambda: {"managed_bot": {"user": user_dict(41), "bot": user_dict(9041, is_bot=True)}},
    "guest_message": lambda: {"guest_message": message_dict("hi", chat_id=42)},
    "subscription": lambda: {"subscription": {"user": user_dict(43), "invoice_payload": "p", "state": "active"}},
    "stopped_message_generation": lambda: {"stopped_message_generation": {"chat": chat_dict(44), "draft_id": 1}},
}


def update_of(field):
    if field in UPDATE_KINDS:
        return tb_types.Update.de_json(update_dict(field))
    return tb_types.Update.de_json(update_dict(**EXTRA_UPDATES[field]()))


def test_the_middleware_knows_every_update_type_telebot_dispatches():
    dispatched = telebot_dispatch_types()
    assert len(dispatched) >= 20 and "chosen_inline_query" in dispatched  # the regex still reads telebot
    # (telebot 4.32 dispatches 23 update types, 4.37 more)
    assert dispatched <= set(UPDATE_TYPES), sorted(dispatched - set(UPDATE_TYPES))
    assert set(tb_util.update_types) <= set(UPDATE_TYPES)
    missing = [f for f in tb_util.update_types if f not in UPDATE_KINDS and f not in EXTRA_UPDATES]
    assert missing == [], f"no Update JSON for a new telebot update type: {missing}"


class SeesSession(BaseMiddleware):
    """Registered after ours: records the session key bound when telebot runs the update's middlewares."""

    update_sensitive = False

    def __init__(self):
        super().__init__()
        self.update_types = list(UPDATE_TYPES)
        self.seen = []

    def pre_process(self, message, data):
        frames = context.active_frames()
        self.seen.append((message, frames[-1].handle.key if frames else "NO SESSION", "session" in data))

    def post_process(self, message, data, exception):
        pass


@pytest.mark.parametrize("strategy", [keys.by_chat, keys.by_user, keys.by_user_in_chat, keys.by_chat_topic],
                         ids=lambda s: s.__name__)
def test_every_update_type_gets_its_session(tmp_path, strategy):
    bot = make_bot(threaded=False)
    sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), key=strategy)
    sessions.setup(bot)
    probe = SeesSession()
    bot.setup_middleware(probe)
    for field in tb_util.update_types:
        probe.seen.clear()
        update = update_of(field)
        content = getattr(update, field)
        bot.process_new_updates([update])
        assert len(probe.seen) == 1, f"{field}: telebot did not run the middlewares once"
        seen, key, in_data = probe.seen[0]
        assert seen is content and in_data, field
        expected = strategy(content)
        assert key == (None if expected is None else sessions._stored_key(expected)), field
        if strategy is keys.by_chat and field != "poll":  # a poll carries no chat and no user
            assert key is not None, field


def test_next_step_steps_get_the_chats_session_in_order_on_a_polling_bot(tmp_path):
    from telesession.testing import FakeBotAPI

    with FakeBotAPI() as api:
        bot = telebot.TeleBot(api.token, num_threads=4, use_class_middlewares=True)
        sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=lambda: {"seen": []})
        sessions.setup(bot)

        @bot.message_handler(commands=["ask"])
        def ask(message):
            session["seen"].append(message.text)
            bot.register_next_step_handler(message, answer)  # before the reply the test waits for
            bot.send_message(message.chat.id, "your name?")

        def answer(message):
            time.sleep(0.3)  # without per-key order the later messages overtake the step
            session["seen"].append(message.text)
            bot.send_message(message.chat.id, f"hello {message.text}")

        @bot.message_handler(func=lambda m: True)
        def other(message):
            session["seen"].append(message.text)
            bot.send_message(message.chat.id, "ok")

        with api.run_bot(bot):
            api.send_message(3, "/ask")
            api.wait_for_replies(1, chat_id=3)
            for text in ("answer", "after1", "after2"):
                api.send_message(3, text)
            api.wait_for_replies(4, chat_id=3)
            api.wait_until_consumed()
            drain(bot)
        with sessions.open("3") as s:
            assert s["seen"] == ["/ask", "answer", "after1", "after2"]
        assert api.replies(3) == ["your name?", "hello answer", "ok", "ok"]


def test_reply_callbacks_get_the_chats_session(tmp_path):
    bot = make_bot(threaded=False)
    sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=lambda: {"seen": []})
    sessions.setup(bot)
    got = []

    @bot.message_handler(commands=["q"])
    def question(message):
        session["seen"].append("q")
        bot.register_for_reply_by_message_id(777, on_reply)

    def on_reply(message):
        session["seen"].append("reply:" + message.text)
        got.append(message.text)

    bot.process_new_updates([message_update("/q", chat_id=5)])
    bot.process_new_updates([message_update("42", chat_id=5,
                                            reply_to_message=message_dict("q?", chat_id=5, message_id=777))])
    assert got == ["42"]
    with sessions.open("5") as s:
        assert s["seen"][:2] == ["q", "reply:42"]


def test_setup_refuses_the_async_bot():
    pytest.importorskip("aiohttp", reason="telebot's AsyncTeleBot needs aiohttp, which older telebot "
                                          "releases (4.32, the last for Python 3.9) do not install")
    from telebot.async_telebot import AsyncTeleBot

    with pytest.raises(TypeError, match="async"):
        Sessions().setup(AsyncTeleBot(TOKEN))


def test_with_session_refuses_coroutines():
    sessions = Sessions()

    async def handler(message):
        pass

    with pytest.raises(TypeError, match="AsyncTeleBot"):
        sessions.with_session(handler)
    from telesession import with_session

    with pytest.raises(TypeError, match="coroutine"):
        with_session(handler)


def test_setup_refuses_the_same_manager_twice_and_two_managers_of_one_name(bot):
    one, two = Sessions(), Sessions()
    one.setup(bot)
    with pytest.raises(ValueError, match="already set up"):
        one.setup(bot)
    with pytest.raises(ValueError, match="named 'session'"):
        two.setup(bot)
    Sessions(name="user").setup(bot)  # another name is fine
    assert [mw.sessions.name for mw in bot._telesession.middlewares] == ["session", "user"]
