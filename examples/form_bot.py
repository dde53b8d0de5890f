"""A form bot: a multi-step form per chat, a language preference per user, in SQLite.

Two session managers work side by side:

* ``forms``: the chat's form (name -> age -> confirm with Yes/No buttons), a typed
  session: ``initial=Form`` makes every session a ``Form`` dataclass instance.
* ``prefs``: the user's language (``/lang de``), keyed by user, so it follows the user
  into every chat.  In a group, the form is shared by the chat while every member
  gets the replies in their own language.

Handlers take their sessions with stacked decorators instead of a middleware, and
read them through ``forms.current`` and ``prefs.current``.

    BOT_TOKEN=123:ABC python3 examples/form_bot.py [--data data]
    python3 examples/form_bot.py --demo     # no token, no internet: a local fake Bot API
"""
import argparse
import os
import sys
import tempfile
import threading
from dataclasses import dataclass

import telebot
from telebot.types import InlineKeyboardButton, InlineKeyboardMarkup

from telesession import Sessions, keys
from telesession.stores import SQLiteStore

TEXTS = {
    "en": {"ask_name": "What's your name?", "ask_age": "How old are you, {name}?",
           "bad_age": "Please send your age as a number, e.g. 42.", "confirm": "{name}, {age}. Is that right?",
           "yes": "Yes", "no": "No", "saved": "Thank you, {name}! Your form is saved.",
           "again": "Let's start again. What's your name?", "closed": "This form is already closed.",
           "help": "Send /form to fill in the form.", "lang": "I'll speak English with you.",
           "bad_lang": "Unknown language. Try /lang en, /lang de or /lang fr."},
    "de": {"ask_name": "Wie heißt du?", "ask_age": "Wie alt bist du, {name}?",
           "bad_age": "Bitte schick dein Alter als Zahl, z. B. 42.", "confirm": "{name}, {age}. Stimmt das?",
           "yes": "Ja", "no": "Nein", "saved": "Danke, {name}! Dein Formular ist gespeichert.",
           "again": "Noch einmal von vorn. Wie heißt du?", "closed": "Dieses Formular ist schon abgeschlossen.",
           "help": "Schick /form, um das Formular auszufüllen.", "lang": "Ich spreche Deutsch mit dir.",
           "bad_lang": "Unbekannte Sprache. Versuch /lang en, /lang de oder /lang fr."},
    "fr": {"ask_name": "Comment tu t'appelles ?", "ask_age": "Quel âge as-tu, {name} ?",
           "bad_age": "Envoie ton âge en chiffres, par ex. 42.", "confirm": "{name}, {age}. C'est bien ça ?",
           "yes": "Oui", "no": "Non", "saved": "Merci, {name} ! Ton formulaire est enregistré.",
           "again": "On recommence. Comment tu t'appelles ?", "closed": "Ce formulaire est déjà fermé.",
           "help": "Envoie /form pour remplir le formulaire.", "lang": "Je te parle en français.",
           "bad_lang": "Langue inconnue. Essaie /lang en, /lang de ou /lang fr."},
}


@dataclass
class Form:
    """A chat's form: the step it is at and the answers so far (stored as its fields)."""
    step: str = "idle"  # idle -> name -> age -> confirm -> done
    name: str = ""
    age: int = 0

    def restart(self) -> None:
        self.step, self.name, self.age = "name", "", 0


def make_bot(token: str, data_dir: str):
    """The bot and its two managers.  Each manager has its own database: their keys would
    collide in one store, since a private chat's id is its user's id."""
    bot = telebot.TeleBot(token, num_threads=8)
    forms = Sessions(SQLiteStore(os.path.join(data_dir, "forms.sqlite")), initial=Form)
    prefs = Sessions(SQLiteStore(os.path.join(data_dir, "prefs.sqlite")), initial=lambda: {"lang": "en"},
                     key=keys.by_user, name="prefs")

    def text(key: str, **fields) -> str:
        """A reply in the language of the user who sent the update."""
        return TEXTS[prefs.current["lang"]][key].format(**fields)

    @bot.message_handler(commands=["start", "form"])
    @forms.with_session  # the chat's Form ...
    @prefs.with_session  # ... and the sender's preferences, both locked, loaded and saved around the call
    def start_form(message):
        forms.current.restart()
        bot.send_message(message.chat.id, text("ask_name"))

    @bot.message_handler(commands=["lang"])
    @prefs.with_session  # this one needs only the user's preferences
    def set_language(message):
        code = telebot.util.extract_arguments(message.text).strip().lower()  # "/lang de" -> "de"
        if code in TEXTS:
            prefs.current["lang"] = code
            bot.send_message(message.chat.id, text("lang"))
        else:
            bot.send_message(message.chat.id, text("bad_lang"))

    @bot.message_handler(func=lambda message: True)
    @forms.with_session
    @prefs.with_session
    def answer(message):
        form, chat_id, reply = forms.current, message.chat.id, message.text.strip()
        if form.step == "name":
            form.name, form.step = reply, "age"
            bot.send_message(chat_id, text("ask_age", name=form.name))
        elif form.step == "age":
            if not (reply.isdecimal() and 0 < int(reply) < 150):
                bot.send_message(chat_id, text("bad_age"))  # the form stays at "age"
                return
            form.age, form.step = int(reply), "confirm"
            buttons = InlineKeyboardMarkup()
            buttons.add(InlineKeyboardButton(text("yes"), callback_data="yes"),
                        InlineKeyboardButton(text("no"), callback_data="no"))
            bot.send_message(chat_id, text("confirm", name=form.name, age=form.age), reply_markup=buttons)
        else:
            bot.send_message(chat_id, text("help"))

    @bot.callback_query_handler(func=lambda call: call.data in ("yes", "no"))
    @forms.with_session  # a CallbackQuery's chat is the chat of the message with the buttons
    @prefs.with_session  # and its user is whoever pressed
    def confirm(call):
        form, chat_id = forms.current, call.message.chat.id
        bot.answer_callback_query(call.id)
        bot.edit_message_reply_markup(chat_id, call.message.message_id, reply_markup=None)  # buttons off
        if form.step != "confirm":
            bot.send_message(chat_id, text("closed"))
        elif call.data == "yes":
            form.step = "done"
            bot.send_message(chat_id, text("saved", name=form.name))
        else:
            form.restart()
            bot.send_message(chat_id, text("again"))

    return bot, forms, prefs


# --------------------------------------------------------------------------- the demo

YES, NO = "[yes]", "[no]"  # in the demo scripts: press that button instead of sending text


def reply(lang: str, key: str, **fields) -> str:
    return TEXTS[lang][key].format(**fields)


def private_script(user: int, name: str, age: int, lang: str, typo: bool, say_no: bool):
    """One user filling the form in a private chat: (user, what they send, the reply expected)."""
    steps = [] if lang == "en" else [(user, f"/lang {lang}", reply(lang, "lang"))]
    steps.append((user, "/form", reply(lang, "ask_name")))
    if say_no:  # confirm a wrong form with "No": the form starts again
        steps += [(user, "Nobody", reply(lang, "ask_age", name="Nobody")),
                  (user, "99", reply(lang, "confirm", name="Nobody", age=99)),
                  (user, NO, reply(lang, "again"))]
    steps.append((user, name, reply(lang, "ask_age", name=name)))
    if typo:  # a validation error: the age is asked again
        steps.append((user, "forty", reply(lang, "bad_age")))
    steps += [(user, str(age), reply(lang, "confirm", name=name, age=age)),
              (user, YES, reply(lang, "saved", name=name))]
    return steps


# Three people in one group: the form is the group's, each gets replies in their own language.
GROUP = -300
GROUP_SCRIPT = [
    (301, "/lang de", reply("de", "lang")),
    (302, "/form", reply("en", "ask_name")),
    (301, "Dana", reply("de", "ask_age", name="Dana")),  # anyone in the group may answer
    (303, "/lang xx", reply("en", "bad_lang")),
    (302, "/lang fr", reply("fr", "lang")),
    (302, "vingt", reply("fr", "bad_age")),
    (301, "33", reply("de", "confirm", name="Dana", age=33)),
    (302, NO, reply("fr", "again")),
    (301, "Dana K.", reply("de", "ask_age", name="Dana K.")),
    (302, "34", reply("fr", "confirm", name="Dana K.", age=34)),
    (301, YES, reply("de", "saved", name="Dana K.")),
]


def run_script(api, chat: int, steps, failures: list) -> None:
    """Play one chat's script: send each step, wait for the bot's answer, compare it."""
    for user, sent, expected in steps:
        before = len(api.replies(chat))
        if sent in (YES, NO):
            api.press_button(chat, sent.strip("[]"), user_id=user)
        else:
            api.send_message(chat, sent, user_id=user)
        try:
            got = api.wait_for_replies(before + 1, timeout=20, chat_id=chat)[before].text
        except TimeoutError as error:
            failures.append(f"chat {chat}: no reply to {sent!r} of user {user}: {error}")
            return
        if got != expected:
            failures.append(f"chat {chat}: user {user} sent {sent!r}, bot replied {got!r}, expected {expected!r}")
            return


def demo(data_dir: str) -> None:
    from telesession.testing import FakeBotAPI

    names = ["Alice", "Björn", "Chloé", "Dmitri", "Emma", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kim", "Léa"]
    users = {201 + i: dict(name=name, age=20 + i, lang="en de fr".split()[i % 3], typo=i % 4 == 1,
                           say_no=i % 5 == 2) for i, name in enumerate(names)}
    scripts = {user: private_script(user, **u) for user, u in users.items()}  # private chat id = user id
    scripts[GROUP] = GROUP_SCRIPT
    updates = sum(len(steps) for steps in scripts.values())

    with FakeBotAPI() as api:
        print(f"form_bot demo: {len(users) + 3} users fill forms concurrently in {len(scripts)} chats "
              f"(one group), {updates} updates, sessions in {data_dir}")
        bot, forms, prefs = make_bot(api.token, data_dir)
        failures: list = []
        with api.run_bot(bot):
            threads = [threading.Thread(target=run_script, args=(api, chat, steps, failures))
                       for chat, steps in scripts.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        bot.worker_pool.close()
        check(not failures, "\n  ".join(failures))
        print(f"  every one of the {updates} replies was the expected one, in the sender's language")
        print(f"  group {GROUP}, interleaved (the form is the chat's, the language each user's):")
        for (user, sent, _), got in zip(GROUP_SCRIPT, api.replies(GROUP)):
            print(f"    user {user}: {sent!r:11} -> {got!r}")

        # The stored sessions, read outside any handler.
        expected_forms = {user: Form("done", u["name"], u["age"]) for user, u in users.items()}
        expected_forms[GROUP] = Form("done", "Dana K.", 34)
        for chat, form in expected_forms.items():
            with forms.open(str(chat)) as stored:
                check(stored == form, f"chat {chat}: stored form {stored}, expected {form}")
        languages = {user: u["lang"] for user, u in users.items()}
        languages.update({301: "de", 302: "fr", 303: "en"})
        for user, lang in languages.items():
            with prefs.open(str(user)) as stored:
                check(stored["lang"] == lang, f"user {user}: stored language {stored['lang']}, expected {lang}")
        sample = ", ".join(f"{user}:{lang}" for user, lang in list(languages.items())[:4])
        print(f"  stored: {len(expected_forms)} forms done (e.g. chat 203: {expected_forms[203]}), "
              f"{len(languages)} languages ({sample}, ...)")
    print(f"OK: {sum(u['typo'] for u in users.values()) + 1} validation errors and "
          f"{sum(u['say_no'] for u in users.values()) + 1} restarts handled, all forms and languages exact")


def check(condition: bool, message: str) -> None:
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Set BOT_TOKEN to run the bot, or pass --demo.")
    parser.add_argument("--demo", action="store_true", help="run against a local fake Bot API and verify")
    parser.add_argument("--data", help="directory of the databases (default: data; a temp dir with --demo)")
    args = parser.parse_args()
    if args.demo:
        with tempfile.TemporaryDirectory() as tmp:
            demo(args.data or tmp)
        return
    token = os.environ.get("BOT_TOKEN")
    if not token:
        parser.print_usage(sys.stderr)
        print("error: set BOT_TOKEN to run the bot, or pass --demo", file=sys.stderr)
        sys.exit(2)
    bot, _, _ = make_bot(token, args.data or "data")
    bot.infinity_polling()


if __name__ == "__main__":
    main()
