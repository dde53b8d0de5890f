"""Per-key scheduling under sessions.setup(bot): no chat holds back another, order per key, fault isolation.

Real TeleBots: polling FakeBotAPI over HTTP, or fed real Update objects. Latency bounds are
generous (the machine is shared) but far below what blocking a worker per queued update costs.
"""
import logging
import multiprocessing
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import telebot
from support import drain, hold_key
from telebot.handler_backends import BaseMiddleware, CancelUpdate

from telesession import BacklogFull, Sessions, keys, session
from telesession.errors import CorruptSessionError, LockTimeout, SerializationError, StoreError
from telesession.scheduling import KeyScheduler, commands
from telesession.testing import FakeBotAPI, callback_update, message_update

TOKEN = "123456:TEST"
#: An idle chat is answered in milliseconds; blocking a worker per queued update made it wait
#: for the whole 2 s slow handler (and more). The bound sits far from both.
IDLE_BOUND = 1.0


class Recorder(telebot.ExceptionHandler):
    """telebot's exception_handler: whatever reaches it is a failure of fault isolation."""

    def __init__(self):
        self.errors = []

    def handle(self, exception):
        self.errors.append(exception)
        return True


class Timeline:
    """When each (chat, text) was handled, and in which thread; waits for a number of them."""

    def __init__(self):
        self.cond = threading.Condition()
        self.done = {}
        self.threads = {}

    def mark(self, chat, text):
        with self.cond:
            self.done[(chat, text)] = time.monotonic()
            self.threads[(chat, text)] = threading.get_ident()
            self.cond.notify_all()

    def wait(self, wanted, timeout=20.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(w in self.done for w in wanted):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"not handled in time: {[w for w in wanted if w not in self.done]}"
                self.cond.wait(remaining)


def slow_chat_bot(bot, sessions, timeline, started=None):
    @bot.message_handler(func=lambda m: True)
    def handle(message):
        if message.text == "slow":
            if started is not None:
                started.set()
            time.sleep(2)
        session["seen"].append(message.text)
        timeline.mark(message.chat.id, message.text)


# --------------------------------------------------------------------------- fairness


def test_polling_a_slow_chat_with_a_backlog_delays_no_other_chat(tmp_path):
    with FakeBotAPI() as api:
        bot = telebot.TeleBot(api.token, num_threads=4, use_class_middlewares=True)
        bot.exception_handler = Recorder()
        sessions = Sessions(f"sqlite:{tmp_path / 's.db'}", initial=lambda: {"seen": []})
        sessions.setup(bot)
        timeline, started = Timeline(), threading.Event()
        slow_chat_bot(bot, sessions, timeline, started)
        with api.run_bot(bot):
            api.send_message(1, "slow")
            assert started.wait(10)
            for i in range(5):
                api.send_message(1, f"x{i}")
            pushed = {}
            for chat in range(2, 7):
                pushed[chat] = time.monotonic()
                api.send_message(chat, "hi")
            timeline.wait([(c, "hi") for c in pushed])
            latency = {c: timeline.done[(c, "hi")] - pushed[c] for c in pushed}
            timeline.wait([(1, f"x{i}") for i in range(5)])
        assert max(latency.values()) < IDLE_BOUND, latency
        assert timeline.done[(1, "x0")] > timeline.done[(1, "slow")]
        with sessions.open("1") as s:
            assert s["seen"] == ["slow", "x0", "x1", "x2", "x3", "x4"]
        assert bot.exception_handler.errors == []
        assert bot._telesession.scheduler.busy_keys() == 0


def test_unthreaded_bot_fed_by_four_threads_serves_other_chats_while_one_is_slow(tmp_path):
    bot = telebot.TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    sessions = Sessions(f"json:{tmp_path / 's'}", initial=lambda: {"seen": []})
    sessions.setup(bot)
    timeline, started = Timeline(), threading.Event()
    slow_chat_bot(bot, sessions, timeline, started)
    with ThreadPoolExecutor(4) as web:  # four web-server threads
        slow = web.submit(bot.process_new_updates, [message_update("slow", chat_id=1)])
        assert started.wait(10)
        for i in range(5):  # parked behind "slow": each request returns at once
            t0 = time.monotonic()
            web.submit(bot.process_new_updates, [message_update(f"x{i}", chat_id=1)]).result(10)
            assert time.monotonic() - t0 < IDLE_BOUND
        latency = {}
        for chat in range(2, 7):
            t0 = time.monotonic()
            web.submit(bot.process_new_updates, [message_update("hi", chat_id=chat)]).result(10)
            latency[chat] = timeline.done[(chat, "hi")] - t0
        assert not slow.done()  # the slow handler was still running all along
        slow.result(20)  # its thread also ran the five updates parked behind it
    assert max(latency.values()) < IDLE_BOUND, latency
    assert all(timeline.threads[(1, f"x{i}")] == timeline.threads[(1, "slow")] for i in range(5))
    with sessions.open("1") as s:
        assert s["seen"] == ["slow", "x0", "x1", "x2", "x3", "x4"]
    assert bot._telesession.scheduler.busy_keys() == 0


# --------------------------------------------------------------------------- order


def test_each_key_keeps_arrival_order_under_eight_workers_and_random_delays(tmp_path):
    """Messages and button presses of one chat interleave; telebot groups a batch by type."""
    bot = telebot.TeleBot(TOKEN, num_threads=8, use_class_middlewares=True)
    try:
        chats = Sessions(f"sqlite:{tmp_path / 's.db'}", initial=lambda: {"seen": []})
        users = Sessions(f"sqlite:{tmp_path / 's.db'}", initial=lambda: {"seen": []}, name="user",
                         key=keys.prefixed("user:", keys.by_user))
        chats.setup(bot)
        users.setup(bot)  # an update now has two keys: its chat and its user
        rng = random.Random(7)
        listened = []
        bot.set_update_listener(lambda messages: listened.append(len(messages)))

        def record(update, text, user):
            time.sleep(rng.random() * 0.004)
            n = int(text.split(":")[1])
            chats.current["seen"].append(n)
            user["seen"].append(n)

        @bot.message_handler(func=lambda m: True)
        def on_message(message, user):
            record(message, message.text, user)

        @bot.callback_query_handler(func=lambda c: True)
        def on_button(call, user):
            record(call, call.data, user)

        expected_chat = {c: [] for c in range(1, 11)}
        expected_user = {u: [] for u in (100, 101, 102)}
        n, messages = 0, []
        for _ in range(4):
            batch = []
            for _ in range(60):
                chat, user = rng.randrange(1, 11), rng.choice((100, 101, 102))
                n += 1
                text = f"{chat}:{n}"
                if rng.random() < 0.4:
                    batch.append(callback_update(text, chat_id=chat, user_id=user))
                else:
                    batch.append(message_update(text, chat_id=chat, user_id=user))
                expected_chat[chat].append(n)
                expected_user[user].append(n)
            messages.append(sum(1 for u in batch if u.message is not None))
            bot.process_new_updates(batch)
        drain(bot)
        for chat, seen in expected_chat.items():
            with chats.open(str(chat)) as s:
                assert s["seen"] == seen, chat
        for user, seen in expected_user.items():
            with users.open(f"user:{user}") as s:
                assert s["seen"] == seen, user
        assert bot._telesession.scheduler.busy_keys() == 0
        assert listened == messages  # telebot's update listeners still see whole batches
    finally:
        bot.worker_pool.close()


def test_scheduler_alone_runs_a_key_in_order_and_drops_its_queue_when_drained():
    ran, lock = [], threading.Lock()
    pool = ThreadPoolExecutor(4)
    scheduler = KeyScheduler(lambda fn, *args: pool.submit(fn, *args), lambda: False, max_pending=100, workers=4)

    def task(key, i):
        def run():
            time.sleep(random.random() * 0.002)
            with lock:
                ran.append((key, i))
        return run

    for i in range(50):
        for key in ("a", "b", "c"):
            assert scheduler.submit(None, (key,), task(key, i))
    deadline = time.monotonic() + 30
    while scheduler.busy_keys() and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.shutdown(wait=True)
    for key in ("a", "b", "c"):
        assert [i for k, i in ran if k == key] == list(range(50))
    assert scheduler.busy_keys() == 0


# --------------------------------------------------------------------------- faults


def test_corrupt_record_unstorable_value_and_foreign_lock_reach_on_error_only(tmp_path):
    url = f"json:{tmp_path / 's'}"
    failures, lock = [], threading.Lock()

    def on_error(update, exc):
        with lock:
            failures.append((update.chat.id, exc))

    sessions = Sessions(url, initial=lambda: {"n": 0}, lock_timeout=1.0, on_error=on_error)
    sessions.bind(TOKEN)  # FakeBotAPI's default token: the stored keys are those setup(bot) will use
    corrupt_path = sessions.store.path(sessions._stored_key("13"))
    os.makedirs(os.path.dirname(corrupt_path), exist_ok=True)
    with open(corrupt_path, "wb") as f:
        f.write(b"{not json")
    ready = multiprocessing.get_context("spawn").Event()
    holder = multiprocessing.get_context("spawn").Process(target=hold_key, args=(url, "15", ready, 30, TOKEN))
    holder.start()
    try:
        assert ready.wait(30), "the other process never took chat 15's lock"
        with FakeBotAPI() as api:
            bot = telebot.TeleBot(api.token, num_threads=4, use_class_middlewares=True)
            bot.exception_handler = Recorder()
            sessions.setup(bot)
            timeline, handled = Timeline(), []

            @bot.message_handler(func=lambda m: True)
            def handle(message):
                handled.append(message.chat.id)
                session["n"] += 1
                if message.chat.id == 14:
                    session["pair"] = (1, 2)  # a tuple cannot round-trip through JSON
                timeline.mark(message.chat.id, message.text)

            with api.run_bot(bot):
                for chat in (13, 14, 15):
                    api.send_message(chat, "x")
                pushed = {}
                for chat in range(20, 25):
                    pushed[chat] = time.monotonic()
                    api.send_message(chat, "hi")
                timeline.wait([(c, "hi") for c in pushed])
                latency = {c: timeline.done[(c, "hi")] - pushed[c] for c in pushed}
                deadline = time.monotonic() + 20
                while len(failures) < 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                api.wait_until_consumed()
        assert max(latency.values()) < IDLE_BOUND, latency
        by_chat = {chat: exc for chat, exc in failures}
        assert sorted(by_chat) == [13, 14, 15] and len(failures) == 3
        assert isinstance(by_chat[13], CorruptSessionError) and by_chat[13].key == sessions._stored_key("13")
        assert by_chat[13].where and corrupt_path in by_chat[13].where
        assert isinstance(by_chat[14], SerializationError) and by_chat[14].key == sessions._stored_key("14")
        assert isinstance(by_chat[15], LockTimeout) and by_chat[15].key == sessions._stored_key("15")
        assert sorted(handled) == [14, 20, 21, 22, 23, 24]  # 13 and 15 never reached the handler
        assert bot.exception_handler.errors == []
        with open(corrupt_path, "rb") as f:
            assert f.read() == b"{not json"  # left byte for byte
        with sessions.open("14") as s:
            assert dict(s) == {"n": 0}  # the handler's result was not saved
    finally:
        holder.kill()
        holder.join()


def test_default_on_error_logs_one_error_line_with_key_and_place(tmp_path, caplog):
    bot = telebot.TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    bot.exception_handler = Recorder()
    sessions = Sessions(f"json:{tmp_path / 's'}")
    sessions.bind(bot)
    path = sessions.store.path(sessions._stored_key("5"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"garbage")
    sessions.setup(bot)
    ran = []
    bot.message_handler(func=lambda m: True)(lambda m: ran.append(m.text))
    with caplog.at_level(logging.DEBUG, logger="telesession"):
        bot.process_new_updates([message_update("x", chat_id=5)])
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR and errors[0].name == "telesession"
    assert ":session:5'" in errors[0].getMessage() and path in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()
    assert ran == [] and bot.exception_handler.errors == []


def test_a_flooding_chat_is_capped_and_never_blocks_a_worker(tmp_path):
    bot = telebot.TeleBot(TOKEN, num_threads=2, use_class_middlewares=True)
    try:
        failures = []
        sessions = Sessions(f"json:{tmp_path / 's'}", initial=lambda: {"seen": []},
                            on_error=lambda update, exc: failures.append(exc))
        sessions.setup(bot, max_pending=3)
        release, other = threading.Event(), threading.Event()

        @bot.message_handler(func=lambda m: True)
        def handle(message):
            if message.text == "0":
                release.wait(20)
            if message.chat.id == 2:
                other.set()
            session["seen"].append(message.text)

        bot.process_new_updates([message_update(str(i), chat_id=1) for i in range(10)])
        bot.process_new_updates([message_update("hi", chat_id=2)])
        assert other.wait(IDLE_BOUND * 5), "the flood took every worker"
        release.set()
        drain(bot)
        with sessions.open("1") as s:
            assert s["seen"] == ["0", "1", "2", "3"]  # one running + 3 parked; the rest dropped
        assert len(failures) == 6 and all(isinstance(e, BacklogFull) and e.key == "1" for e in failures)
    finally:
        bot.worker_pool.close()


def test_user_handler_exceptions_still_go_to_telebot(tmp_path):
    bot = telebot.TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    bot.exception_handler = Recorder()
    failures = []
    sessions = Sessions(f"json:{tmp_path / 's'}", on_error=lambda u, e: failures.append(e))
    sessions.setup(bot)

    @bot.message_handler(func=lambda m: True)
    def handle(message):
        session["x"] = 1
        raise ValueError("the handler's own bug")

    bot.process_new_updates([message_update("x", chat_id=3)])
    assert [type(e) for e in bot.exception_handler.errors] == [ValueError] and failures == []
    with sessions.open("3") as s:
        assert dict(s) == {}  # not saved: the handler raised


# --------------------------------------------------------------------------- re-entry, cancel, bypass


def test_unthreaded_handler_dispatching_its_own_chat_re_enters_its_session(tmp_path, caplog):
    bot = telebot.TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    sessions = Sessions(f"json:{tmp_path / 's'}", initial=lambda: {"count": 0})
    sessions.setup(bot)
    seen = []

    @bot.message_handler(func=lambda m: True)
    def handle(message):
        session["count"] += 1
        if message.text == "outer":
            bot.process_new_updates([message_update("inner", chat_id=4) for _ in range(11)])
            seen.append(("outer after", session["count"]))

    with caplog.at_level(logging.WARNING, logger="telesession"):
        bot.process_new_updates([message_update("outer", chat_id=4)])
    assert seen == [("outer after", 12)]
    with sessions.open("4") as s:
        assert s["count"] == 12
    assert caplog.records == []


class CancelAfterTouching(BaseMiddleware):
    """A later middleware that changes the session, then cancels the update (normal telebot use)."""

    update_sensitive = False

    def __init__(self):
        super().__init__()
        self.update_types = ["message"]

    def pre_process(self, message, data):
        if message.text == "cancel":
            data["session"]["touched"] = True
            return CancelUpdate()
        return None

    def post_process(self, message, data, exception):
        pass


def test_a_cancelled_update_releases_its_session_quietly_and_saves_nothing(tmp_path, caplog):
    bot = telebot.TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    sessions = Sessions(f"json:{tmp_path / 's'}", initial=lambda: {"count": 0})
    sessions.setup(bot)
    bot.setup_middleware(CancelAfterTouching())
    bot.message_handler(func=lambda m: True)(lambda m: session.__setitem__("count", session["count"] + 1))
    with caplog.at_level(logging.WARNING, logger="telesession"):
        bot.process_new_updates([message_update("cancel", chat_id=6), message_update("x", chat_id=6)])
    assert caplog.records == []
    with sessions.open("6") as s:
        assert dict(s) == {"count": 1}  # the cancelled update's change was not saved


def test_bypass_lets_a_stop_command_past_a_long_running_update_of_its_chat(tmp_path):
    bot = telebot.TeleBot(TOKEN, num_threads=4, use_class_middlewares=True)
    try:
        sessions = Sessions(f"json:{tmp_path / 's'}", initial=lambda: {"runs": 0})
        sessions.setup(bot, bypass=commands("stop"))
        stop, stopped_at, started = threading.Event(), [], threading.Event()

        @bot.message_handler(commands=["long"])
        def long(message):
            session["runs"] += 1
            started.set()
            stop.wait(3)

        @bot.message_handler(commands=["stop"])
        def stop_it(message):  # never touches the session: no queue, no lock
            stopped_at.append(time.monotonic())
            stop.set()

        t0 = time.monotonic()
        bot.process_new_updates([message_update("/long", chat_id=8)])
        assert started.wait(5)
        bot.process_new_updates([message_update("/stop", chat_id=8)])
        drain(bot)
        assert stopped_at and stopped_at[0] - t0 < 2.0  # not after /long's 3 s
        with sessions.open("8") as s:
            assert s["runs"] == 1
    finally:
        bot.worker_pool.close()


def test_commands_predicate():
    stop = commands("stop", "/Cancel")
    assert stop(message_update("/stop").message) and stop(message_update("/stop@test_bot now").message)
    assert stop(message_update("/cancel").message)
    assert not stop(message_update("/stopped").message) and not stop(message_update("stop").message)
    assert not stop(callback_update("/stop").callback_query)


def test_ordered_is_accepted_for_compatibility():
    bot = telebot.TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    Sessions().setup(bot, ordered=True)
    with pytest.warns(DeprecationWarning, match=r"ordered=False\) is ignored"):
        Sessions(name="other").setup(bot, ordered=False)
    with pytest.raises(TypeError, match="on_error must be a callable"):
        Sessions(on_error="log")


# --------------------------------------------------------------------------- review regressions


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "threaded"])
def test_a_reply_callback_and_the_handlers_of_one_message_stay_ahead_of_the_next_update(tmp_path, threaded):
    """telebot hands a replied-to message two tasks (its reply callback, then the middlewares):
    the reservation keeps its place between them, so the next update of the chat runs after both."""
    bot = telebot.TeleBot(TOKEN, threaded=threaded, num_threads=4, use_class_middlewares=True)
    sessions = Sessions(f"sqlite:{tmp_path / 's.db'}", initial=lambda: {"seen": []})
    sessions.setup(bot)
    order = []

    @bot.message_handler(func=lambda m: True)
    def handle(message):
        order.append(("handler", message.text))
        session["seen"].append(message.text)

    bot.register_for_reply_by_message_id(500, lambda m: order.append(("reply", m.text)))
    first = message_update("first", chat_id=1, update_id=1)
    first.message.reply_to_message = telebot.types.Message.de_json(
        {"message_id": 500, "date": 0, "chat": {"id": 1, "type": "private"}, "text": "q"})
    bot.process_new_updates([first, message_update("second", chat_id=1, update_id=2)])
    if threaded:
        drain(bot)
    assert order == [("reply", "first"), ("handler", "first"), ("handler", "second")]
    assert sessions.get("1") == {"seen": ["first", "second"]}


def test_a_base_exception_in_an_inline_job_still_runs_the_jobs_it_freed():
    scheduler = KeyScheduler(lambda fn, *args: fn(*args), lambda: True)
    ran = []

    def first():
        ran.append(1)
        scheduler.submit(None, ("k",), lambda: ran.append(2))  # parked behind this one
        raise SystemExit("the handler called sys.exit")

    with pytest.raises(SystemExit):
        scheduler.submit(None, ("k",), first)
    scheduler.submit(None, ("k",), lambda: ran.append(3))
    assert ran == [1, 2, 3] and scheduler.busy_keys() == 0


def test_a_reservation_keeps_its_update_and_middlewares():
    scheduler = KeyScheduler(lambda fn, *args: fn(*args), lambda: True)
    job = scheduler.reserve(("z",), content="UPDATE", owners=("MW",))
    assert (job.content, job.owners, job.args) == ("UPDATE", ("MW",), ())
    scheduler.cancel(job)
    assert scheduler.busy_keys() == 0


def test_a_release_that_fails_after_a_cancel_is_reported_and_frees_the_other_managers(tmp_path):
    bot = telebot.TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    errors = []
    a = Sessions(f"sqlite:{tmp_path / 'a.db'}", name="a", lock_timeout=2)
    b = Sessions(f"sqlite:{tmp_path / 'b.db'}", name="b", on_error=lambda update, exc: errors.append(exc))
    a.setup(bot)
    b.setup(bot)

    class Cancel(BaseMiddleware):
        update_types = ["message"]

        def pre_process(self, message, data):
            return CancelUpdate()

        def post_process(self, message, data, exception):
            pass

    cancel = Cancel()
    bot.setup_middleware(cancel)

    @bot.message_handler(func=lambda m: True)
    def handle(message, a, b):
        a["n"] = a.get("n", 0) + 1

    release = type(b.store).release

    def failing_release(store, key, token):
        if store is b.store:
            release(store, key, token)  # the lock is given back, but the store reports a failure
            raise StoreError("the store went away", key, None)
        return release(store, key, token)

    type(b.store).release = failing_release
    try:
        bot.process_new_updates([message_update("x", chat_id=1, update_id=1)])
    finally:
        type(b.store).release = release
    assert len(errors) == 1 and isinstance(errors[0], StoreError)
    bot.middlewares.remove(cancel)
    for update_id in (2, 3, 4):
        bot.process_new_updates([message_update("x", chat_id=1, update_id=update_id)])
    assert a.get("1") == {"n": 3}  # saved: no session was left bound to this thread
    with a.open("1") as s:  # and its lock is free
        assert s["n"] == 3


def test_run_inline_runs_a_free_key_now_and_then_what_other_threads_parked_on_it():
    scheduler = KeyScheduler(lambda fn, *args: fn(*args), lambda: True)
    ran, inside, go = [], threading.Event(), threading.Event()

    def first():
        inside.set()
        assert go.wait(10)
        ran.append("first")

    runner = threading.Thread(target=scheduler.run_inline, args=(("k",), first, ()))
    runner.start()
    assert inside.wait(10)
    assert not scheduler.run_inline(("k",), lambda: ran.append("no"), ())  # busy: the caller must submit
    assert scheduler.submit(None, ("k",), lambda: ran.append("parked"))  # parked, returns at once
    assert scheduler.run_inline(("other",), lambda: ran.append("other"), ())  # another key runs here, now
    go.set()
    runner.join(10)
    assert ran == ["other", "first", "parked"]  # the thread that freed "k" ran what was parked on it
    with pytest.raises(ZeroDivisionError):
        scheduler.run_inline(("k",), lambda: 1 / 0, ())
    assert scheduler.busy_keys() == 0  # a task that raised still freed its key
    nested = []
    assert scheduler.run_inline(("k",), lambda: nested.append(scheduler.run_inline(("j",), lambda: None, ())), ())
    assert nested == [False] and scheduler.busy_keys() == 0  # inside a job, updates go through submit


def test_runners_share_one_ready_queue_yield_to_other_pool_tasks_and_survive_a_raising_job():
    pool = ThreadPoolExecutor(1)  # one worker: the runner and the bot's other tasks take turns on it
    futures = []
    scheduler = KeyScheduler(lambda fn, *args: futures.append(pool.submit(fn, *args)), lambda: False, workers=1)
    done, other_ran_after = [], []

    def job(i):
        def run():
            time.sleep(0.005)
            done.append(i)
            if i == 3:
                raise RuntimeError("a handler error telebot's worker would see")
        return run

    first_started = threading.Event()
    scheduler.submit(None, ("k0",), lambda: (first_started.set(), time.sleep(0.005), done.append(0)))
    assert first_started.wait(10)
    futures.append(pool.submit(lambda: other_ran_after.append(len(done))))  # queued behind the runner
    for i in range(1, 20):
        scheduler.submit(None, (f"k{i}",), job(i))
    deadline = time.monotonic() + 30
    while (len(done) < 20 or scheduler.busy_keys()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(done) == list(range(20)) and scheduler.busy_keys() == 0  # nothing stranded by the error
    assert other_ran_after and other_ran_after[0] < 19  # the runner went to the back of the pool after 20 ms
    assert sum(1 for f in list(futures) if f.exception() is not None) == 1  # the error ended its runner
    pool.shutdown(wait=True)


def test_no_more_runners_than_workers_run_at_once():
    pool = ThreadPoolExecutor(6)
    scheduler = KeyScheduler(lambda fn, *args: pool.submit(fn, *args), lambda: False, workers=2)
    lock, running, peak = threading.Lock(), [0], [0]

    def job():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1

    for i in range(40):
        scheduler.submit(None, (f"k{i}",), job)
    deadline = time.monotonic() + 30
    while scheduler.busy_keys() and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.shutdown(wait=True)
    assert scheduler.busy_keys() == 0 and peak[0] == 2  # two runners in parallel, never more


def test_run_inline_runs_what_its_task_frees_after_the_task():
    scheduler = KeyScheduler(lambda fn, *args: fn(*args), lambda: True)
    ran = []
    reservation = scheduler.reserve(("b",))
    assert scheduler.submit(None, ("b",), lambda: ran.append("b"))  # parked behind the reservation

    def task():
        scheduler.cancel(reservation)  # frees the job parked on "b" (as a nested dispatch would)
        ran.append("a done")

    assert scheduler.run_inline(("a",), task, ())
    assert ran == ["a done", "b"] and scheduler.busy_keys() == 0  # not nested inside the running handler


def test_drain_of_a_bot_without_threads_waits_for_updates_parked_by_another_thread():
    from telesession.testing import drain

    bot = telebot.TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    sessions = Sessions(initial=lambda: {"seen": []})
    sessions.setup(bot)
    inside, go = threading.Event(), threading.Event()

    @bot.message_handler(func=lambda m: True)
    def handle(message):
        if message.text == "slow":
            inside.set()
            assert go.wait(10)
        session["seen"].append(message.text)

    web = threading.Thread(target=bot.process_new_updates, args=([message_update("slow", chat_id=1, update_id=1)],))
    web.start()
    assert inside.wait(10)
    bot.process_new_updates([message_update("next", chat_id=1, update_id=2)])  # parked: returns at once
    threading.Timer(0.3, go.set).start()
    drain(bot, timeout=10)
    assert sessions.get("1") == {"seen": ["slow", "next"]}
    web.join(10)


def test_updates_of_a_polled_bot_go_through_the_key_queues_when_the_idle_tracker_wraps_them():
    with FakeBotAPI() as api:
        bot = telebot.TeleBot(api.token, num_threads=4, use_class_middlewares=True)
        sessions = Sessions(initial=lambda: {"n": 0})
        sessions.setup(bot)
        scheduled = []

        @bot.message_handler(func=lambda m: True)
        def on_message(message):
            scheduled.append(("message", bot._telesession.scheduler.current() is not None))
            session["n"] += 1

        @bot.callback_query_handler(func=lambda call: True)
        def on_button(call):
            scheduled.append(("button", bot._telesession.scheduler.current() is not None))
            session["n"] += 1

        with api.run_bot(bot):  # installs the IdleTracker around setup's wrappers
            api.send_message(7, "hi")
            api.press_button(7, "go")
            api.wait_until_idle(20)
        assert sorted(scheduled) == [("button", True), ("message", True)]
        assert sessions.get("7") == {"n": 2}
