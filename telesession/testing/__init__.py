"""Test helpers: a local Bot API server that a real, unmodified TeleBot polls, and update factories.

``FakeBotAPI`` (``api``) is a real HTTP server (``server``) on a free loopback port that
answers the Bot API methods telebot uses for polling and replying, records what the
bot did, and lets a test push user updates; ``wait_until_idle`` (``idle``) waits until
the bot has handled all of them.  The factories (``updates``: ``make_message``,
``make_update`` ...) build the very objects telebot builds, via ``types.Update.de_json``,
for unit tests without any server.

This package imports only telebot and the standard library, so it works on its own.

Example::

    with FakeBotAPI() as api:
        bot = telebot.TeleBot(api.token)

        @bot.message_handler(commands=["start"])
        def start(message):
            bot.reply_to(message, "hello")

        with api.run_bot(bot):
            api.send_message(42, "/start")
            api.wait_until_idle()
            assert api.replies(42) == ["hello"]
"""
from .api import FakeBotAPI
from .idle import drain
from .server import BotAPIError, Call, UploadedFile
from .updates import (DEFAULT_GROUP_ID, DEFAULT_TOKEN, DEFAULT_USER_ID, UPDATE_KINDS, callback_query_dict,
                      callback_update, chat_dict, inline_query_update, make_callback_query, make_chat,
                      make_inline_query, make_message, make_update, make_user, message_dict, message_update,
                      next_update_id, update_dict, user_dict)

__all__ = [
    "FakeBotAPI",
    "drain",
    "BotAPIError",
    "Call",
    "UploadedFile",
    "DEFAULT_TOKEN",
    "DEFAULT_USER_ID",
    "DEFAULT_GROUP_ID",
    "UPDATE_KINDS",
    "next_update_id",
    "user_dict",
    "chat_dict",
    "message_dict",
    "callback_query_dict",
    "update_dict",
    "make_user",
    "make_chat",
    "make_message",
    "make_callback_query",
    "make_inline_query",
    "make_update",
    "message_update",
    "callback_update",
    "inline_query_update",
]
