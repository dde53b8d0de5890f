"""A telebot States V2 bot (StateMiddleware, StateContext, StateFilter) on telesession's StateStorage.

The bot is written exactly as telebot's own states examples are; the one change is
``state_storage=StateStorage("sqlite:...")``: its ``with state.data() as data:``
blocks hold the user's lock, so concurrent updates of one user lose nothing, and the
states live in SQLite, so a restarted bot continues every conversation.

    BOT_TOKEN=123:ABC python3 examples/states_bot.py [--db states.sqlite]
    python3 examples/states_bot.py --demo     # no token, no internet: a local fake Bot API
"""
import argparse
import os
import sys
import tempfile
import threading

import telebot
from telebot import custom_filters
from telebot.states import State, StatesGroup
from telebot.states.sync.context import StateContext
from telebot.states.sync.middleware import StateMiddleware

from telesession import StateStorage


class Form(StatesGroup):
    name = State()
    age = State()
    done = State()


def make_bot(token: str, db: str) -> telebot.TeleBot:
    """A form (name -> age -> done) and a /tap counter, both kept by telebot's states API."""
    bot = telebot.TeleBot(token, state_storage=StateStorage(f"sqlite:{db}"), use_class_middlewares=True,
                          num_threads=8)
    bot.add_custom_filter(custom_filters.StateFilter(bot))
    bot.add_custom_filter(custom_filters.IsDigitFilter())
    bot.setup_middleware(StateMiddleware(bot))

    @bot.message_handler(commands=["tap"])
    def tap(message, state: StateContext):
        with state.data() as data:  # read-modify-write under the user's lock
            data["taps"] = data.get("taps", 0) + 1
            taps = data["taps"]
        bot.send_message(message.chat.id, f"tap {taps}")

    @bot.message_handler(commands=["start"])
    def start(message, state: StateContext):
        state.set(Form.name)
        bot.send_message(message.chat.id, "What's your name?")

    @bot.message_handler(state=Form.name)
    def got_name(message, state: StateContext):
        state.add_data(name=message.text)
        state.set(Form.age)
        bot.send_message(message.chat.id, f"How old are you, {message.text}?")

    @bot.message_handler(state=Form.age, is_digit=False)
    def bad_age(message, state: StateContext):
        with state.data() as data:
            data["typos"] = data.get("typos", 0) + 1
        bot.send_message(message.chat.id, "Your age as a number, please.")

    @bot.message_handler(state=Form.age, is_digit=True)
    def got_age(message, state: StateContext):
        with state.data() as data:
            data["age"] = int(message.text)
            name = data["name"]
        state.set(Form.done)
        bot.send_message(message.chat.id, f"Saved: {name}, {message.text}.")

    @bot.message_handler(state=Form.done)
    def done(message, state: StateContext):
        with state.data() as data:
            bot.send_message(message.chat.id, f"Your form is done: {data['name']}, {data['age']}.")

    return bot


# --------------------------------------------------------------------------- the demo


def script(user: int, name: str, age: int, typo: bool):
    """(what the user sends, the reply expected), in order."""
    steps = [("/start", "What's your name?"), (name, f"How old are you, {name}?")]
    if typo:
        steps.append(("forty", "Your age as a number, please."))
    return steps + [(str(age), f"Saved: {name}, {age}."), ("hello?", f"Your form is done: {name}, {age}.")]


def play(api, chat: int, steps, failures: list) -> None:
    for sent, expected in steps:
        before = len(api.replies(chat))
        api.send_message(chat, sent, user_id=chat)
        try:
            got = api.wait_for_replies(before + 1, timeout=30, chat_id=chat)[before].text
        except TimeoutError as error:
            failures.append(f"chat {chat}: no reply to {sent!r}: {error}")
            return
        if got != expected:
            failures.append(f"chat {chat}: sent {sent!r}, bot replied {got!r}, expected {expected!r}")
            return


def demo(db: str) -> None:
    from telesession.testing import FakeBotAPI

    names = ["Alice", "Björn", "Chloé", "Dmitri", "Emma", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
    users = {401 + i: (name, 20 + i, i % 3 == 1) for i, name in enumerate(names)}
    tapper, taps = 499, 80
    late = 498  # leaves its form at the age step; answers after the restart
    with FakeBotAPI() as api:
        print(f"states_bot demo: {len(users)} users fill a States V2 form concurrently, user {tapper} "
              f"sends {taps} /tap at once; states in sqlite:{db}")
        bot = make_bot(api.token, db)
        failures: list = []
        with api.run_bot(bot):
            threads = [threading.Thread(target=play, args=(api, user, script(user, *u), failures))
                       for user, u in users.items()]
            threads.append(threading.Thread(target=play, args=(api, late, script(late, "Zoe", 0, False)[:2],
                                                               failures)))
            for t in threads:
                t.start()
            for _ in range(taps):
                api.send_message(tapper, "/tap", user_id=tapper)
            for t in threads:
                t.join()
            try:
                api.wait_for_replies(taps, timeout=60, chat_id=tapper)
            except TimeoutError as error:
                failures.append(f"/tap: {error}")
        bot.worker_pool.close()
        check(not failures, "\n  ".join(failures))
        replies = sorted(int(text.split()[1]) for text in api.replies(tapper))
        check(replies == list(range(1, taps + 1)), f"/tap replies {replies}")
        with bot.retrieve_data(tapper, tapper) as data:
            check(data == {"taps": taps}, f"stored taps {data}")
        print(f"  every form reply was the expected one; /tap replied 1..{taps} once each, stored taps = {taps}")
        for user, (name, age, typo) in users.items():
            check(bot.get_state(user, user) == "Form:done", f"user {user}: state {bot.get_state(user, user)}")
            with bot.retrieve_data(user, user) as data:
                want = {"name": name, "age": age, **({"typos": 1} if typo else {})}
                check(data == want, f"user {user}: stored {data}, expected {want}")
        print(f"  stored: {len(users)} forms in state Form:done, e.g. user 402 "
              f"{bot.current_states.get_data(402, 402, bot_id=bot.bot_id)}")
        check(bot.get_state(late, late) == "Form:age", f"user {late}: state {bot.get_state(late, late)}")
        bot.current_states.close()

        # A new bot process over the same database: user 498 continues where it stopped.
        bot = make_bot(api.token, db)
        with api.run_bot(bot):
            failures = []
            play(api, late, [("31", "Saved: Zoe, 31."), ("/tap", "tap 1")], failures)
        bot.worker_pool.close()
        check(not failures, "\n  ".join(failures))
        print(f"  after a restart, user {late} answered the age question it was asked before: 'Saved: Zoe, 31.'")
        bot.current_states.close()
    print(f"OK: {len(users) + 1} forms and {taps} concurrent taps exact")


def check(condition: bool, message: str) -> None:
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Set BOT_TOKEN to run the bot, or pass --demo.")
    parser.add_argument("--demo", action="store_true", help="run against a local fake Bot API and verify")
    parser.add_argument("--db", help="the SQLite file of the states (default: states.sqlite; a temp file with --demo)")
    args = parser.parse_args()
    if args.demo:
        with tempfile.TemporaryDirectory() as tmp:
            demo(args.db or os.path.join(tmp, "states.sqlite"))
        return
    token = os.environ.get("BOT_TOKEN")
    if not token:
        parser.print_usage(sys.stderr)
        print("error: set BOT_TOKEN to run the bot, or pass --demo", file=sys.stderr)
        sys.exit(2)
    make_bot(token, args.db or "states.sqlite").infinity_polling()


if __name__ == "__main__":
    main()
