"""A counter bot: the README quickstart, with the session middleware and a JSON file store.

Every chat has its own counter.  ``/count`` adds one and replies with the new value,
``/reset`` deletes the chat's session.  The bot runs handlers on 8 worker threads,
yet no count is ever lost: telesession locks a chat's session while its handler
runs and writes it back (to ``DIR/<chat id>.json``) after the handler returns.

    BOT_TOKEN=123:ABC python3 examples/counter_bot.py [--data data/sessions]
    python3 examples/counter_bot.py --demo     # no token, no internet: a local fake Bot API
"""
import argparse
import os
import sys
import tempfile
import time

import telebot

from telesession import Sessions, session
from telesession.stores import JSONFileStore


def make_bot(token: str, data_dir: str):
    """The whole bot: a TeleBot, its Sessions, and two handlers."""
    bot = telebot.TeleBot(token, use_class_middlewares=True, num_threads=8)
    sessions = Sessions(store=JSONFileStore(data_dir), initial=lambda: {"count": 0})
    sessions.setup(bot)  # every handler of this bot gets its chat's session

    @bot.message_handler(commands=["count"])
    def count(message):
        session["count"] += 1  # loaded under the chat's lock, saved after the handler returns
        bot.reply_to(message, str(session["count"]))

    @bot.message_handler(commands=["reset"])
    def reset(message):
        session.delete()  # removed from the store after return; the next update starts from 0
        bot.reply_to(message, "Reset. Send /count to start again.")

    return bot, sessions


# --------------------------------------------------------------------------- the demo

def demo(data_dir: str) -> None:
    """Drive the bot through a local fake Bot API, check every count, restart it, check again."""
    from telesession.testing import FakeBotAPI

    check(not (os.path.isdir(data_dir) and os.listdir(data_dir)),
          f"--data {data_dir} is not empty: the demo needs a fresh directory")

    # 30 private chats (chat id = user id) and 10 groups where 3 users share the counter.
    private = list(range(1001, 1031))
    groups = list(range(-2001, -2011, -1))
    chats = private + groups
    sent = {chat: 8 + i % 5 for i, chat in enumerate(chats)}  # 8..12 /count per chat, 400 in all
    updates = [chat for round_ in range(max(sent.values())) for chat in chats if sent[chat] > round_]

    def sender(chat: int, i: int = 0) -> int:
        return chat if chat > 0 else 1 + i % 3  # in groups users 1, 2 and 3 take turns

    with FakeBotAPI() as api:
        print(f"counter_bot demo: {len(updates)} /count updates in {len(chats)} chats "
              f"({len(groups)} groups), 8 worker threads, sessions in {data_dir}")

        # Phase 1: real long polling, handlers on telebot's worker threads.
        bot, sessions = make_bot(api.token, data_dir)
        started = time.monotonic()
        with api.run_bot(bot):
            for i, chat in enumerate(updates):
                api.send_message(chat, "/count", user_id=sender(chat, i))
            api.wait_for_replies(len(updates), timeout=60)
        bot.worker_pool.close()  # the old bot is gone: its worker threads finish and stop
        print(f"  phase 1: {len(updates)} replies in {time.monotonic() - started:.1f} s")
        for chat in chats:
            replies = api.replies(chat)
            expected = [str(n) for n in range(1, sent[chat] + 1)]
            check(replies == expected, f"chat {chat}: replies {replies}, expected {expected}")
            with sessions.open(str(chat)) as stored:  # a session outside handlers
                check(stored["count"] == sent[chat], f"chat {chat}: stored {stored['count']} != {sent[chat]}")
        print(f"  every chat's replies are 1..N in order and its stored count is N: exact "
              f"(e.g. chat {chats[2]}: {sent[chats[2]]}, group {groups[-1]}: {sent[groups[-1]]})")

        # Phase 2: a restart.  A new TeleBot and new Sessions on the same directory continue the counts.
        api.clear()
        bot, sessions = make_bot(api.token, data_dir)
        with api.run_bot(bot):
            for chat in chats:
                api.send_message(chat, "/count", user_id=sender(chat))
            api.wait_for_replies(len(chats), timeout=30)
            for chat in chats:
                check(api.replies(chat) == [str(sent[chat] + 1)],
                      f"after restart chat {chat} replied {api.replies(chat)}, expected {sent[chat] + 1}")
            print(f"  restart: new TeleBot + Sessions on the same directory; counts survive and continue "
                  f"(chat {chats[0]}: {sent[chats[0]]} -> {sent[chats[0]] + 1})")

            # /reset deletes the session file; the next /count starts from 1 again.
            reset = chats[:10]
            api.clear()
            for chat in reset:
                api.send_message(chat, "/reset", user_id=sender(chat))
            api.wait_for_replies(len(reset), timeout=30)
            for chat in reset:
                with sessions.open(str(chat)) as stored:  # waits until the handler's delete is done
                    check(stored["count"] == 0, f"chat {chat} still has {stored['count']} after /reset")
                gone = not os.path.exists(os.path.join(data_dir, f"{chat}.json"))
                check(gone, f"chat {chat}: session file still there after /reset")
            for chat in reset:
                api.send_message(chat, "/count", user_id=sender(chat))
            api.wait_for_replies(2 * len(reset), timeout=30)
        bot.worker_pool.close()
        for chat in reset:
            check(api.replies(chat)[-1] == "1", f"chat {chat} replied {api.replies(chat)} after /reset")
        print(f"  /reset in {len(reset)} chats deleted their session files; the next /count replied 1")
    print("OK: all counts exact")


def check(condition: bool, message: str) -> None:
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Set BOT_TOKEN to run the bot, or pass --demo.")
    parser.add_argument("--demo", action="store_true", help="run against a local fake Bot API and verify")
    parser.add_argument("--data", help="session directory (default: data/sessions; a temp dir with --demo)")
    args = parser.parse_args()
    if args.demo:
        if args.data:
            demo(args.data)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                demo(os.path.join(tmp, "sessions"))
        return
    token = os.environ.get("BOT_TOKEN")
    if not token:
        parser.print_usage(sys.stderr)
        print("error: set BOT_TOKEN to run the bot, or pass --demo", file=sys.stderr)
        sys.exit(2)
    bot, _ = make_bot(token, args.data or "data/sessions")
    bot.infinity_polling()


if __name__ == "__main__":
    main()
