"""Isolation: a handler sees only its own key's session; nothing leaks across pool threads or into forks."""
import multiprocessing
import os
import threading

import telebot
from support import drain

from telesession import Sessions, context, session
from telesession.errors import LockTimeout, NoActiveSession
from telesession.stores import from_url
from telesession.testing import message_update

fork = multiprocessing.get_context("fork")


def test_pool_threads_never_see_another_chats_session(tmp_path):
    bot = telebot.TeleBot("123456:TEST", threaded=True, num_threads=2, use_class_middlewares=True)
    try:
        sessions = Sessions(from_url(f"json:{tmp_path / 's'}"), initial=lambda: {"owner": None, "n": 0})
        sessions.setup(bot)
        seen = []
        lock = threading.Lock()

        @bot.message_handler(func=lambda m: True)
        def handler(message):
            if session["owner"] is None:
                session["owner"] = message.chat.id
            session["n"] += 1
            with lock:
                seen.append((threading.get_ident(), message.chat.id, session["owner"]))

        chats = [101, 202, 303, 404]
        bot.process_new_updates([message_update("x", chat_id=c) for _ in range(25) for c in chats])
        drain(bot)
        assert len(seen) == 100
        assert all(chat == owner for _, chat, owner in seen)
        served = {thread: {c for t, c, _ in seen if t == thread} for thread, _, _ in seen}
        assert max(len(c) for c in served.values()) > 1  # a pool thread served several chats (a worker
        # runs one chat's queued updates back to back, so a chat need not move between threads)

        # between updates, a pool thread holds no session at all
        leftovers = []
        barrier = threading.Barrier(3, timeout=30)

        def probe():
            try:
                session["n"]
                leftovers.append("bound")
            except NoActiveSession:
                leftovers.append(context.active_frames())
            barrier.wait()

        for _ in range(2):
            bot.worker_pool.put(probe)
        barrier.wait()
        assert leftovers == [(), ()]
        for chat in chats:
            with sessions.open(str(chat)) as s:
                assert s["owner"] == chat and s["n"] == 25
    finally:
        bot.worker_pool.close()


def _child_inside_a_held_session(url, key, out):
    """Runs in a child forked while the parent held ``key``."""
    try:
        session["n"]
        out.put("bound")
    except NoActiveSession:
        out.put("unbound")
    try:
        with Sessions(from_url(url), lock_timeout=0.3).open(key):
            out.put("entered")
    except LockTimeout:
        out.put("timeout")
    with Sessions(from_url(url)).open("other") as s:  # its own keys work
        s["n"] = os.getpid()
    out.put("done")


def test_a_forked_child_shares_no_session_lock_or_connection(tmp_path):
    url = f"sqlite:{tmp_path / 'db.sqlite'}"
    sessions = Sessions(from_url(url), initial=lambda: {"n": 0})
    out = fork.Queue()
    with sessions.open("k") as s:
        s["n"] = 1
        child = fork.Process(target=_child_inside_a_held_session, args=(url, "k", out))
        child.start()
        results = [out.get(timeout=30) for _ in range(3)]
        child.join(30)
        s["n"] = 2  # the parent still holds the key and saves it
    assert results == ["unbound", "timeout", "done"]
    assert child.exitcode == 0
    with sessions.open("k") as s:
        assert s["n"] == 2
    with sessions.open("other") as s:
        assert s["n"] == child.pid
