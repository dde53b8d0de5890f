"""Test helpers: a local Bot API server that a real, unmodified TeleBot polls, and update factories.

``FakeBotAPI`` is a real HTTP server on a free loopback port that answers the Bot API
methods telebot uses for polling and replying, records what the bot did, and lets a test
push user updates.  The factories (``make_message``, ``make_update`` ...) build the very
objects telebot builds, via ``types.Update.de_json``, for unit tests without any server.

This module imports only telebot and the standard library, so it works on its own.

Example::

    with FakeBotAPI() as api:
        bot = telebot.TeleBot(api.token)

        @bot.message_handler(commands=["start"])
        def start(message):
            bot.reply_to(message, "hello")

        with api.run_bot(bot):
            api.send_message(42, "/start")
            assert api.wait_for_replies(1, chat_id=42)[0].text == "hello"
"""
import contextlib
import copy
import email.parser
import email.policy
import hashlib
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional,
                    Sequence, Set, Tuple, Union)

import telebot
from telebot import apihelper, types

__all__ = [
    "FakeBotAPI",
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

logger = logging.getLogger("telesession.testing")

DEFAULT_TOKEN = "123456:TEST"
"""The token ``FakeBotAPI`` accepts unless given another one."""
DEFAULT_USER_ID = 1
"""The user who writes in a group when no ``user_id`` is given."""
DEFAULT_GROUP_ID = -100
"""The chat of group-only updates (chat_member, chat_join_request ...) when none is given."""

_SUPERGROUP_LIMIT = -1000000000000  # supergroup and channel ids look like -100XXXXXXXXXX
_MAX_TEXT = 4096
_MAX_CAPTION = 1024
_MAX_BODY = 50 * 1024 * 1024


def _now() -> int:
    return int(time.time())


class _Counter:
    """A thread-safe, monotonic integer source."""

    def __init__(self, start: int = 1) -> None:
        self._lock = threading.Lock()
        self._next = start

    def next(self) -> int:
        with self._lock:
            value = self._next
            self._next += 1
            return value

    def bump(self, seen: int) -> None:
        """Make sure later values are greater than ``seen``."""
        with self._lock:
            if seen >= self._next:
                self._next = seen + 1


_update_ids = _Counter()
_message_ids = _Counter(1000)
_query_ids = _Counter(1)
_file_ids = _Counter(1)


def next_update_id() -> int:
    """Next value of the process-wide update_id counter that factories and FakeBotAPI share."""
    return _update_ids.next()


# --------------------------------------------------------------------------- factories (dicts)


def _default_chat_type(chat_id: int) -> str:
    if chat_id > 0:
        return "private"
    if chat_id <= _SUPERGROUP_LIMIT:
        return "supergroup"
    return "group"


def _default_user_id(chat_id: int) -> int:
    return chat_id if chat_id > 0 else DEFAULT_USER_ID


def user_dict(user_id: int = DEFAULT_USER_ID, *, is_bot: bool = False, first_name: Optional[str] = None,
              username: Optional[str] = None, language_code: Optional[str] = "en",
              **extra: Any) -> Dict[str, Any]:
    """The JSON of a Telegram ``User``: ``first_name`` "User <id>", ``username`` "user<id>"."""
    user: Dict[str, Any] = {
        "id": user_id,
        "is_bot": is_bot,
        "first_name": first_name if first_name is not None else "User {}".format(user_id),
        "username": username if username is not None else "user{}".format(user_id),
    }
    if language_code and not is_bot:
        user["language_code"] = language_code
    user.update(extra)
    return user


def chat_dict(chat_id: int = 1, chat_type: Optional[str] = None, *, title: Optional[str] = None,
              user: Optional[Mapping[str, Any]] = None, is_forum: Optional[bool] = None,
              **extra: Any) -> Dict[str, Any]:
    """The JSON of a ``Chat``: private for ids > 0, supergroup for -100…, group for other negative ids."""
    kind = chat_type or _default_chat_type(chat_id)
    chat: Dict[str, Any] = {"id": chat_id, "type": kind}
    if kind == "private":
        who = user if user is not None and user.get("id") == chat_id else user_dict(chat_id)
        chat["first_name"] = who.get("first_name", "User {}".format(chat_id))
        if who.get("username"):
            chat["username"] = who["username"]
    else:
        if title is None:
            title = "{} {}".format("Channel" if kind == "channel" else "Group", abs(chat_id))
        chat["title"] = title
    if is_forum:
        chat["is_forum"] = True
    chat.update(extra)
    return chat


def _command_entities(text: Optional[str]) -> Optional[List[Dict[str, Any]]]:
    """A ``bot_command`` entity for texts like "/start arg" (what Telegram adds)."""
    if not text or not text.startswith("/"):
        return None
    command = text.split(None, 1)[0]
    if len(command) < 2:
        return None
    # Telegram counts offsets and lengths in UTF-16 code units.
    return [{"type": "bot_command", "offset": 0, "length": len(command.encode("utf-16-le")) // 2}]


def message_dict(text: Optional[str] = "hi", chat_id: int = 1, user_id: Optional[int] = None, *,
                 chat_type: Optional[str] = None, message_thread_id: Optional[int] = None,
                 message_id: Optional[int] = None, date: Optional[int] = None,
                 reply_to_message: Optional[Mapping[str, Any]] = None,
                 entities: Optional[List[Mapping[str, Any]]] = None,
                 from_user: Optional[Mapping[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
    """The JSON of a ``Message`` a user wrote; commands get their ``bot_command`` entity.

    A ``message_thread_id`` makes it a forum-topic message (in a supergroup when the chat id
    is negative).  ``chat_type="channel"`` gives a channel post (``sender_chat``, no ``from``).
    ``from_user`` replaces the sender (e.g. the bot's user dict, for a message the bot sent).
    ``extra`` keys are copied into the message last, e.g. ``photo=[...]``.
    """
    if chat_type is None and message_thread_id is not None and chat_id < 0:
        chat_type = "supergroup"
    kind = chat_type or _default_chat_type(chat_id)
    uid = user_id if user_id is not None else _default_user_id(chat_id)
    sender = user_dict(uid)
    chat = chat_dict(chat_id, kind, user=sender,
                     is_forum=True if (message_thread_id is not None and kind == "supergroup") else None)
    message: Dict[str, Any] = {
        "message_id": message_id if message_id is not None else _message_ids.next(),
        "date": date if date is not None else _now(),
        "chat": chat,
    }
    if kind == "channel":
        message["sender_chat"] = dict(chat)
    else:
        message["from"] = dict(from_user) if from_user is not None else sender
    if message_thread_id is not None:
        message["message_thread_id"] = message_thread_id
        message["is_topic_message"] = True
    if reply_to_message is not None:
        message["reply_to_message"] = dict(reply_to_message)
    if text is not None:
        message["text"] = text
        found = entities if entities is not None else _command_entities(text)
        if found:
            message["entities"] = [dict(e) for e in found]
    message.update(extra)
    return message


def _bot_user_dict(bot_user: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    if bot_user is not None:
        return {k: bot_user[k] for k in ("id", "is_bot", "first_name", "username") if k in bot_user}
    bot_id = int(DEFAULT_TOKEN.split(":", 1)[0])
    return {"id": bot_id, "is_bot": True, "first_name": "Test Bot", "username": "test_bot"}


def callback_query_dict(data: Optional[str] = "", chat_id: int = 1, user_id: Optional[int] = None, *,
                        message_id: Optional[int] = None, message: Optional[Mapping[str, Any]] = None,
                        inline_message_id: Optional[str] = None, query_id: Optional[str] = None,
                        chat_instance: Optional[str] = None, bot_user: Optional[Mapping[str, Any]] = None,
                        **extra: Any) -> Dict[str, Any]:
    """The JSON of a ``CallbackQuery``: a user pressed an inline button on a message the bot sent."""
    uid = user_id if user_id is not None else _default_user_id(chat_id)
    query: Dict[str, Any] = {
        "id": query_id if query_id is not None else str(_query_ids.next()),
        "from": user_dict(uid),
        "chat_instance": chat_instance if chat_instance is not None else str(abs(chat_id) * 7 + 1000),
    }
    if data is not None:
        query["data"] = data
    if inline_message_id is not None:
        query["inline_message_id"] = inline_message_id
    else:
        if message is None:
            message = message_dict("Choose:", chat_id, uid, message_id=message_id,
                                   from_user=_bot_user_dict(bot_user))
        query["message"] = dict(message)
    query.update(extra)
    return query


def _inline_query(query: str = "", user_id: int = DEFAULT_USER_ID, *, offset: str = "",
                  chat_type: Optional[str] = "sender", query_id: Optional[str] = None,
                  **extra: Any) -> Dict[str, Any]:
    payload: Dict[str, Any] = {"id": query_id or str(_query_ids.next()), "from": user_dict(user_id),
                               "query": query, "offset": offset}
    if chat_type:
        payload["chat_type"] = chat_type
    payload.update(extra)
    return payload


def _chosen_inline_result(result_id: str = "1", user_id: int = DEFAULT_USER_ID, *, query: str = "",
                          inline_message_id: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    payload: Dict[str, Any] = {"result_id": result_id, "from": user_dict(user_id), "query": query}
    if inline_message_id is not None:
        payload["inline_message_id"] = inline_message_id
    payload.update(extra)
    return payload


def _shipping_query(user_id: int = DEFAULT_USER_ID, *, invoice_payload: str = "payload",
                    shipping_address: Optional[Mapping[str, Any]] = None, query_id: Optional[str] = None,
                    **extra: Any) -> Dict[str, Any]:
    address = dict(shipping_address) if shipping_address is not None else {
        "country_code": "DE", "state": "", "city": "Berlin", "street_line1": "Street 1",
        "street_line2": "", "post_code": "10115"}
    payload = {"id": query_id or str(_query_ids.next()), "from": user_dict(user_id),
               "invoice_payload": invoice_payload, "shipping_address": address}
    payload.update(extra)
    return payload


def _pre_checkout_query(user_id: int = DEFAULT_USER_ID, *, currency: str = "USD", total_amount: int = 100,
                        invoice_payload: str = "payload", query_id: Optional[str] = None,
                        **extra: Any) -> Dict[str, Any]:
    payload = {"id": query_id or str(_query_ids.next()), "from": user_dict(user_id), "currency": currency,
               "total_amount": total_amount, "invoice_payload": invoice_payload}
    payload.update(extra)
    return payload


def _poll_option(index: int, option: Any) -> Dict[str, Any]:
    if isinstance(option, Mapping):
        opt = dict(option)
    else:
        opt = {"text": str(option)}
    opt.setdefault("voter_count", 0)
    opt.setdefault("persistent_id", str(index))
    return opt


def _poll(question: str = "Question?", options: Sequence[Any] = ("Yes", "No"), *, poll_id: Optional[str] = None,
          **extra: Any) -> Dict[str, Any]:
    payload: Dict[str, Any] = {
        "id": poll_id or str(_query_ids.next()), "question": question,
        "options": [_poll_option(i, o) for i, o in enumerate(options)],
        "total_voter_count": 0, "is_closed": False, "is_anonymous": True, "type": "regular",
        "allows_multiple_answers": False}
    payload.update(extra)
    return payload


def _poll_answer(poll_id: str = "1", user_id: int = DEFAULT_USER_ID, *, option_ids: Sequence[int] = (0,),
                 **extra: Any) -> Dict[str, Any]:
    payload: Dict[str, Any] = {"poll_id": poll_id, "user": user_dict(user_id), "option_ids": list(option_ids),
                               "option_persistent_ids": [str(i) for i in option_ids]}
    payload.update(extra)
    return payload


def _member(user: Mapping[str, Any], status: str) -> Dict[str, Any]:
    member: Dict[str, Any] = {"user": dict(user), "status": status}
    if status == "creator":
        member["is_anonymous"] = False
    elif status == "administrator":
        member.update({k: False for k in (
            "is_anonymous", "can_manage_chat", "can_delete_messages", "can_manage_video_chats",
            "can_restrict_members", "can_promote_members", "can_change_info", "can_invite_users",
            "can_post_stories", "can_edit_stories", "can_delete_stories")})
        member["can_be_edited"] = False
    elif status == "restricted":
        member.update({"is_member": True, "until_date": 0})
    elif status == "kicked":
        member["until_date"] = 0
    return member


def _chat_member_updated(chat_id: int = DEFAULT_GROUP_ID, user_id: Optional[int] = None, *,
                         member: Optional[Mapping[str, Any]] = None, old_status: str = "left",
                         new_status: str = "member", date: Optional[int] = None,
                         **extra: Any) -> Dict[str, Any]:
    uid = user_id if user_id is not None else _default_user_id(chat_id)
    sender = user_dict(uid)
    who = dict(member) if member is not None else sender
    payload = {"chat": chat_dict(chat_id, user=sender), "from": sender, "date": date or _now(),
               "old_chat_member": _member(who, old_status), "new_chat_member": _member(who, new_status)}
    payload.update(extra)
    return payload


def _my_chat_member(chat_id: int = DEFAULT_GROUP_ID, user_id: Optional[int] = None, *,
                    bot_user: Optional[Mapping[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
    return _chat_member_updated(chat_id, user_id, member=_bot_user_dict(bot_user), **extra)


def _chat_join_request(chat_id: int = DEFAULT_GROUP_ID, user_id: int = DEFAULT_USER_ID, *,
                       date: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
    payload = {"chat": chat_dict(chat_id), "from": user_dict(user_id), "user_chat_id": user_id,
               "date": date or _now()}
    payload.update(extra)
    return payload


def _reactions(emojis: Union[str, Iterable[Any]]) -> List[Dict[str, Any]]:
    if isinstance(emojis, str):
        emojis = [emojis]
    return [dict(e) if isinstance(e, Mapping) else {"type": "emoji", "emoji": str(e)} for e in emojis]


def _message_reaction(chat_id: int = 1, user_id: Optional[int] = None, message_id: int = 1, *,
                      new_reaction: Union[str, Iterable[Any]] = ("\U0001F44D",),
                      old_reaction: Union[str, Iterable[Any]] = (), date: Optional[int] = None,
                      **extra: Any) -> Dict[str, Any]:
    uid = user_id if user_id is not None else _default_user_id(chat_id)
    sender = user_dict(uid)
    payload = {"chat": chat_dict(chat_id, user=sender), "message_id": message_id, "user": sender,
               "date": date or _now(), "old_reaction": _reactions(old_reaction),
               "new_reaction": _reactions(new_reaction)}
    payload.update(extra)
    return payload


def _message_reaction_count(chat_id: int = DEFAULT_GROUP_ID, message_id: int = 1, *,
                            reactions: Optional[Mapping[str, int]] = None, date: Optional[int] = None,
                            **extra: Any) -> Dict[str, Any]:
    counts = reactions if reactions is not None else {"\U0001F44D": 1}
    payload = {"chat": chat_dict(chat_id), "message_id": message_id, "date": date or _now(),
               "reactions": [{"type": {"type": "emoji", "emoji": e}, "total_count": n} for e, n in counts.items()]}
    payload.update(extra)
    return payload


def _chat_boost(chat_id: int = -1000000000001, user_id: int = DEFAULT_USER_ID, *, boost_id: str = "boost1",
                **extra: Any) -> Dict[str, Any]:
    now = _now()
    payload = {"chat": chat_dict(chat_id, "channel"),
               "boost": {"boost_id": boost_id, "add_date": now, "expiration_date": now + 86400 * 30,
                         "source": {"source": "premium", "user": user_dict(user_id)}}}
    payload.update(extra)
    return payload


def _removed_chat_boost(chat_id: int = -1000000000001, user_id: int = DEFAULT_USER_ID, *,
                        boost_id: str = "boost1", **extra: Any) -> Dict[str, Any]:
    payload = {"chat": chat_dict(chat_id, "channel"), "boost_id": boost_id, "remove_date": _now(),
               "source": {"source": "premium", "user": user_dict(user_id)}}
    payload.update(extra)
    return payload


def _business_connection(user_id: int = DEFAULT_USER_ID, *, connection_id: str = "bc1", is_enabled: bool = True,
                         **extra: Any) -> Dict[str, Any]:
    payload = {"id": connection_id, "user": user_dict(user_id), "user_chat_id": user_id, "date": _now(),
               "is_enabled": is_enabled}
    payload.update(extra)
    return payload


def _deleted_business_messages(chat_id: int = 1, *, message_ids: Sequence[int] = (1,),
                               connection_id: str = "bc1", **extra: Any) -> Dict[str, Any]:
    payload = {"business_connection_id": connection_id, "chat": chat_dict(chat_id),
               "message_ids": list(message_ids)}
    payload.update(extra)
    return payload


def _purchased_paid_media(user_id: int = DEFAULT_USER_ID, *, paid_media_payload: str = "payload",
                          **extra: Any) -> Dict[str, Any]:
    sender = user_dict(user_id)
    # The Bot API field is "from"; telebot 4.37.1 reads "from_user", so both are present.
    payload = {"from": sender, "from_user": dict(sender), "paid_media_payload": paid_media_payload}
    payload.update(extra)
    return payload


def _edited(builder: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    def build(*args: Any, **kwargs: Any) -> Dict[str, Any]:
        message = builder(*args, **kwargs)
        message.setdefault("edit_date", message["date"] + 1)
        return message
    return build


def _channel_post(text: Optional[str] = "hi", chat_id: int = -1000000000001, **kwargs: Any) -> Dict[str, Any]:
    kwargs.setdefault("chat_type", "channel")
    return message_dict(text, chat_id, **kwargs)


def _business_message(text: Optional[str] = "hi", chat_id: int = 1, user_id: Optional[int] = None, *,
                      connection_id: str = "bc1", **kwargs: Any) -> Dict[str, Any]:
    message = message_dict(text, chat_id, user_id, **kwargs)
    message.setdefault("business_connection_id", connection_id)
    return message


_BUILDERS: Dict[str, Callable[..., Dict[str, Any]]] = {
    "message": message_dict,
    "edited_message": _edited(message_dict),
    "channel_post": _channel_post,
    "edited_channel_post": _edited(_channel_post),
    "business_message": _business_message,
    "edited_business_message": _edited(_business_message),
    "callback_query": callback_query_dict,
    "inline_query": _inline_query,
    "chosen_inline_result": _chosen_inline_result,
    "shipping_query": _shipping_query,
    "pre_checkout_query": _pre_checkout_query,
    "poll": _poll,
    "poll_answer": _poll_answer,
    "my_chat_member": _my_chat_member,
    "chat_member": _chat_member_updated,
    "chat_join_request": _chat_join_request,
    "message_reaction": _message_reaction,
    "message_reaction_count": _message_reaction_count,
    "chat_boost": _chat_boost,
    "removed_chat_boost": _removed_chat_boost,
    "business_connection": _business_connection,
    "deleted_business_messages": _deleted_business_messages,
    "purchased_paid_media": _purchased_paid_media,
}

UPDATE_KINDS: Tuple[str, ...] = tuple(_BUILDERS)
"""The update kinds ``update_dict``/``make_update`` can build with defaults."""


def update_dict(kind: Optional[str] = None, *, update_id: Optional[int] = None, **fields: Any) -> Dict[str, Any]:
    """The JSON of an ``Update``.

    ``update_dict("message", text="/start", chat_id=5)`` builds the payload of that kind with
    sensible defaults (``fields`` are the builder's parameters, e.g. ``chat_id``, ``user_id``,
    ``data``, ``query``; unknown ones are copied into the payload).  Without a kind, ``fields``
    are the raw update fields: ``update_dict(message={...})``.
    """
    if kind is None:
        if not fields:
            raise ValueError("update_dict() needs a kind or the update's fields")
        payload_fields = copy.deepcopy(fields)
    else:
        builder = _BUILDERS.get(kind)
        if builder is None:
            raise ValueError("unknown update kind {!r}; known kinds: {}".format(kind, ", ".join(UPDATE_KINDS)))
        payload_fields = {kind: builder(**fields)}
    uid = update_id if update_id is not None else next_update_id()
    _update_ids.bump(uid)
    update: Dict[str, Any] = {"update_id": uid}
    update.update(payload_fields)
    return update


# --------------------------------------------------------------------------- factories (telebot objects)


def make_user(user_id: int = DEFAULT_USER_ID, **fields: Any) -> types.User:
    """A real ``types.User``."""
    return types.User.de_json(user_dict(user_id, **fields))


def make_chat(chat_id: int = 1, chat_type: Optional[str] = None, **fields: Any) -> types.Chat:
    """A real ``types.Chat`` (private for ids > 0, group/supergroup for negative ids)."""
    return types.Chat.de_json(chat_dict(chat_id, chat_type, **fields))


def make_message(text: Optional[str] = "hi", chat_id: int = 1, user_id: Optional[int] = None,
                 chat_type: Optional[str] = None, message_thread_id: Optional[int] = None,
                 **fields: Any) -> types.Message:
    """A real ``types.Message`` a user sent (see :func:`message_dict` for the defaults)."""
    return types.Message.de_json(message_dict(text, chat_id, user_id, chat_type=chat_type,
                                              message_thread_id=message_thread_id, **fields))


def make_callback_query(data: Optional[str] = "", chat_id: int = 1, user_id: Optional[int] = None,
                        **fields: Any) -> types.CallbackQuery:
    """A real ``types.CallbackQuery`` on a bot message in ``chat_id``."""
    return types.CallbackQuery.de_json(callback_query_dict(data, chat_id, user_id, **fields))


def make_inline_query(query: str = "", user_id: int = DEFAULT_USER_ID, **fields: Any) -> types.InlineQuery:
    """A real ``types.InlineQuery`` from ``user_id``."""
    return types.InlineQuery.de_json(_inline_query(query, user_id, **fields))


def make_update(kind: Optional[str] = None, *, update_id: Optional[int] = None, **fields: Any) -> types.Update:
    """A real ``types.Update``, parsed by telebot from :func:`update_dict`'s JSON."""
    return types.Update.de_json(update_dict(kind, update_id=update_id, **fields))


def message_update(text: Optional[str] = "hi", chat_id: int = 1, user_id: Optional[int] = None,
                   update_id: Optional[int] = None, **fields: Any) -> types.Update:
    """An ``Update`` holding a user's message (feed it to ``bot.process_new_updates([...])``)."""
    return make_update("message", update_id=update_id, text=text, chat_id=chat_id, user_id=user_id, **fields)


def callback_update(data: Optional[str] = "", chat_id: int = 1, user_id: Optional[int] = None,
                    update_id: Optional[int] = None, **fields: Any) -> types.Update:
    """An ``Update`` holding a callback query (an inline button press)."""
    return make_update("callback_query", update_id=update_id, data=data, chat_id=chat_id, user_id=user_id,
                       **fields)


def inline_query_update(query: str = "", user_id: int = DEFAULT_USER_ID, update_id: Optional[int] = None,
                        **fields: Any) -> types.Update:
    """An ``Update`` holding an inline query."""
    return make_update("inline_query", update_id=update_id, query=query, user_id=user_id, **fields)


# --------------------------------------------------------------------------- the fake server


class BotAPIError(Exception):
    """An error answer of the fake Bot API; raise it from a handler given to ``FakeBotAPI.add_method``."""

    def __init__(self, error_code: int, description: str, parameters: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__("{} {}".format(error_code, description))
        self.error_code = error_code
        self.description = description
        self.parameters = dict(parameters) if parameters else None

    def to_json(self) -> Dict[str, Any]:
        """The response body, as Telegram sends it."""
        body: Dict[str, Any] = {"ok": False, "error_code": self.error_code, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


class UploadedFile(NamedTuple):
    """A file the bot uploaded in a multipart request."""

    filename: Optional[str]
    content: bytes
    content_type: str


@dataclass
class Call:
    """One Bot API request the server received: ``method``, decoded ``params`` and what it answered.

    ``chat_id`` and ``text`` (the text, or caption) are lifted from the params; ``message`` is the
    message the call created or edited (a snapshot); ``result`` the answer's result, or
    ``error_code``/``description`` for failed calls.  ``call["text"]`` works like ``call.text``.
    """

    method: str
    params: Dict[str, Any]
    chat_id: Optional[Union[int, str]] = None
    text: Optional[str] = None
    files: Dict[str, UploadedFile] = field(default_factory=dict)
    result: Any = None
    message: Optional[Dict[str, Any]] = None
    created_message: bool = False
    error_code: Optional[int] = None
    description: Optional[str] = None
    time: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        """Whether the call succeeded."""
        return self.error_code is None

    @property
    def message_id(self) -> Optional[int]:
        """The id of the message this call created or edited."""
        return self.message.get("message_id") if self.message else None

    def __getitem__(self, key: str) -> Any:
        if key.startswith("_") or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access to the fields."""
        try:
            return self[key]
        except KeyError:
            return default


# Parameter decoding: everything arrives as strings in a query string or form, or typed in JSON.
_JSON_FIELDS = frozenset((
    "reply_markup", "entities", "caption_entities", "link_preview_options", "reply_parameters",
    "allowed_updates", "commands", "scope", "media", "results", "options", "permissions", "reaction",
    "menu_button", "rights", "message_ids", "prices", "shipping_options", "explanation_entities",
    "question_entities", "button", "suggested_post_parameters", "input_message_content",
))
_NUMBER_FIELDS = frozenset((
    "message_id", "from_chat_id", "user_id", "offset", "limit", "timeout", "message_thread_id", "cache_time",
    "until_date", "duration", "width", "height", "length", "max_connections", "direct_messages_topic_id",
    "open_period", "close_date", "latitude", "longitude", "horizontal_accuracy", "live_period", "heading",
    "proximity_alert_radius", "correct_option_id", "total_amount", "sender_chat_id", "draft_id",
))
_BOOL_FIELDS = frozenset((
    "show_alert", "disable_notification", "protect_content", "drop_pending_updates", "disable_web_page_preview",
    "allow_sending_without_reply", "is_anonymous", "allows_multiple_answers", "is_closed", "revoke_messages",
    "only_if_banned", "is_big", "return_bots", "has_spoiler", "supports_streaming", "allow_paid_broadcast",
    "disable_content_type_detection", "show_caption_above_media", "ok", "for_channels",
))
_HOUSEKEEPING = frozenset(("getUpdates", "getMe", "setWebhook", "deleteWebhook", "getWebhookInfo", "close",
                           "logOut"))
_TRUE_METHODS = (
    "sendChatAction", "deleteMyCommands", "setMessageReaction", "pinChatMessage", "unpinChatMessage",
    "unpinAllChatMessages", "unpinAllForumTopicMessages", "leaveChat", "banChatMember", "unbanChatMember",
    "restrictChatMember", "promoteChatMember", "setChatAdministratorCustomTitle", "banChatSenderChat",
    "unbanChatSenderChat", "setChatPermissions", "setChatTitle", "setChatDescription", "setChatPhoto",
    "deleteChatPhoto", "approveChatJoinRequest", "declineChatJoinRequest", "setMyName", "setMyDescription",
    "setMyShortDescription", "setChatMenuButton", "setMyDefaultAdministratorRights", "answerInlineQuery",
    "answerShippingQuery", "answerPreCheckoutQuery", "answerWebAppQuery", "setChatStickerSet",
    "deleteChatStickerSet", "sendMessageDraft", "readBusinessMessage",
)
_TOO_OLD = "Bad Request: query is too old and response timeout expired or query ID is invalid"
_NOT_MODIFIED = ("Bad Request: message is not modified: specified new message content and reply markup are "
                 "exactly the same as a current content and reply markup of the message")
_COMMAND_RE = re.compile(r"^[a-z0-9_]{1,32}$")
_PATH_RE = re.compile(r"^/bot([^/]+)/([^/]+)/?$")


def _decode_value(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if name in _JSON_FIELDS:
        try:
            return json.loads(value)
        except ValueError:
            return value
    if name in _NUMBER_FIELDS or name == "chat_id":
        try:
            return int(value)
        except ValueError:
            try:
                return float(value) if name != "chat_id" else value
            except ValueError:
                return value
    if name in _BOOL_FIELDS:
        lowered = value.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0", ""):
            return False
    return value


def _decode_params(raw: Mapping[str, Any]) -> Dict[str, Any]:
    return {name: _decode_value(name, value) for name, value in raw.items()}


def _parse_multipart(body: bytes, content_type: str) -> Tuple[Dict[str, str], Dict[str, UploadedFile]]:
    head = "Content-Type: {}\r\nMIME-Version: 1.0\r\n\r\n".format(content_type).encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("malformed multipart/form-data body")
    fields: Dict[str, str] = {}
    files: Dict[str, UploadedFile] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        raw = part.get_payload(decode=True)
        payload = raw if isinstance(raw, bytes) else b""
        filename = part.get_filename()
        if filename is None:
            charset = part.get_content_charset() or "utf-8"
            fields[str(name)] = payload.decode(charset, "replace")
        else:
            files[str(name)] = UploadedFile(filename, payload, part.get_content_type())
    return fields, files


class _Params:
    """Typed access to one request's decoded params, raising Telegram-style 400 errors."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.values = call.params
        self.files = call.files

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value

    def string(self, name: str, default: Optional[str] = None) -> Optional[str]:
        value = self.values.get(name)
        if value is None:
            return default
        return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else \
            str(value)

    def number(self, name: str, default: Optional[float] = None) -> Optional[float]:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BotAPIError(400, "Bad Request: invalid {} specified".format(name))
        return value

    def integer(self, name: str, default: Optional[int] = None, missing: Optional[str] = None) -> Optional[int]:
        value = self.number(name)
        if value is None:
            if missing is not None:
                raise BotAPIError(400, missing)
            return default
        if int(value) != value:
            raise BotAPIError(400, "Bad Request: invalid {} specified".format(name))
        return int(value)

    def required_integer(self, name: str, missing: str) -> int:
        value = self.integer(name)
        if value is None:
            raise BotAPIError(400, missing)
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.values.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BotAPIError(400, "Bad Request: invalid {} specified".format(name))
        return value

    def obj(self, name: str, kind: type = dict, error: Optional[str] = None) -> Any:
        value = self.values.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, kind):
            raise BotAPIError(400, error or "Bad Request: can't parse {} JSON object".format(name))
        return value

    def markup(self) -> Optional[Dict[str, Any]]:
        """The reply_markup, validated; only an inline keyboard becomes part of a message."""
        markup = self.obj("reply_markup", dict, "Bad Request: can't parse reply keyboard markup JSON object")
        if markup is None:
            return None
        if not any(k in markup for k in ("inline_keyboard", "keyboard", "remove_keyboard", "force_reply")):
            raise BotAPIError(400, "Bad Request: can't parse reply keyboard markup JSON object")
        if "inline_keyboard" in markup:
            rows = markup["inline_keyboard"]
            if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
                raise BotAPIError(400, "Bad Request: field \"inline_keyboard\" of the InlineKeyboardMarkup "
                                       "should be an Array of Arrays")
            for row in rows:
                for button in row:
                    if not isinstance(button, dict) or "text" not in button:
                        raise BotAPIError(400, "Bad Request: can't find field \"text\"")
                    data = button.get("callback_data")
                    if data is not None and not 1 <= len(str(data).encode("utf-8")) <= 64:
                        raise BotAPIError(400, "Bad Request: BUTTON_DATA_INVALID")
        return markup


def _is_inline(markup: Optional[Mapping[str, Any]]) -> bool:
    return bool(markup) and "inline_keyboard" in markup  # type: ignore[operator]


def _callback_datas(message: Mapping[str, Any]) -> List[str]:
    markup = message.get("reply_markup") or {}
    return [str(b.get("callback_data")) for row in markup.get("inline_keyboard", []) for b in row
            if isinstance(b, dict) and b.get("callback_data") is not None]


def _update_kind(update: Mapping[str, Any]) -> str:
    for key in update:
        if key != "update_id":
            return key
    return "?"


def _describe(update: Mapping[str, Any]) -> str:
    kind = _update_kind(update)
    payload = update.get(kind)
    text = ""
    if isinstance(payload, dict):
        text = payload.get("text") or payload.get("data") or payload.get("query") or ""
    return "#{} {}{}".format(update.get("update_id"), kind, " {!r}".format(text) if text else "")


class _Failure:
    def __init__(self, method: str, error: BotAPIError, times: int, chat_id: Optional[Union[int, str]]) -> None:
        self.method = method
        self.error = error
        self.times = times
        self.chat_id = chat_id


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, api: "FakeBotAPI", address: Tuple[str, int]) -> None:
        self.api = api
        self._conn_lock = threading.Lock()
        self._conns: Set[socket.socket] = set()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conn_lock:
            if alive:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("FakeBotAPI: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeBotAPI/1.0"
    # Headers and body go out in two writes; with Nagle on, loopback delays the body ~40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        logger.debug("FakeBotAPI %s: %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: List[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > _MAX_BODY:
                    self.close_connection = True
                    raise BotAPIError(413, "Request Entity Too Large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.close_connection = True
            raise BotAPIError(413, "Request Entity Too Large")
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        api = self.server.api
        api._request_started()
        try:
            try:
                status, body = self._process(api)
            except BotAPIError as error:
                status, body = error.error_code, error.to_json()
            except Exception as error:  # never let a bug hang the client
                logger.exception("FakeBotAPI: internal error on %s", self.path)
                status, body = 500, {"ok": False, "error_code": 500,
                                     "description": "Internal Server Error: {}".format(error)}
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:
                self.close_connection = True
        finally:
            api._request_finished()

    def _process(self, api: "FakeBotAPI") -> Tuple[int, Dict[str, Any]]:
        parts = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        match = _PATH_RE.match(parts.path)
        if not match:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        token = urllib.parse.unquote(match.group(1))
        method = urllib.parse.unquote(match.group(2))
        raw: Dict[str, Any] = {k: v[-1] for k, v in
                               urllib.parse.parse_qs(parts.query, keep_blank_values=True).items()}
        files: Dict[str, UploadedFile] = {}
        header = self.headers.get("Content-Type", "")
        ctype = header.split(";", 1)[0].strip().lower()
        try:
            if body:
                if ctype == "application/json":
                    obj = json.loads(body.decode("utf-8"))
                    if not isinstance(obj, dict):
                        raise ValueError("the JSON body must be an object")
                    raw.update(obj)
                elif ctype == "multipart/form-data":
                    fields, files = _parse_multipart(body, header)
                    raw.update(fields)
                elif ctype in ("application/x-www-form-urlencoded", ""):
                    raw.update({k: v[-1] for k, v in urllib.parse.parse_qs(
                        body.decode("utf-8"), keep_blank_values=True).items()})
                else:
                    raise ValueError("unsupported Content-Type {!r}".format(ctype))
        except (ValueError, UnicodeDecodeError) as error:
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: {}".format(error)}
        return api._handle(token, method, raw, files)


class FakeBotAPI:
    """A local Telegram Bot API server for tests: a real TeleBot polls it over HTTP.

    ``with FakeBotAPI() as api:`` starts it on a free 127.0.0.1 port and points
    ``telebot.apihelper.API_URL`` at it (restored on exit).  Push user updates with
    :meth:`send_message`, :meth:`press_button`, :meth:`push` or :meth:`push_update`; read what the
    bot did with :attr:`sent`, :meth:`replies`, :meth:`wait_for_replies` and :attr:`calls`.

    ``strict=True`` answers edits, deletions, forwards and callback answers that refer to
    messages or queries the server never saw with Telegram's "not found" errors; the default
    fabricates them, so handlers fed by factories through ``bot.process_new_updates`` work too.
    Updates of every kind are delivered unless the bot passes ``allowed_updates``.
    telebot uses requests, which honours ``HTTP(S)_PROXY``: keep 127.0.0.1 in ``NO_PROXY``.
    """

    def __init__(self, token: str = DEFAULT_TOKEN, *, bot_username: str = "test_bot",
                 bot_first_name: str = "Test Bot", host: str = "127.0.0.1", port: int = 0,
                 max_poll_timeout: float = 30.0, strict: bool = False, patch_telebot: bool = True) -> None:
        self.token = token
        prefix = token.split(":", 1)[0]
        bot_id = int(prefix) if prefix.isdigit() else 123456
        self.bot_user: Dict[str, Any] = {
            "id": bot_id, "is_bot": True, "first_name": bot_first_name, "username": bot_username,
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False,
            "can_connect_to_business": False, "has_main_web_app": False,
        }
        self.max_poll_timeout = max_poll_timeout
        self.strict = strict
        self._host = host
        self._port = port
        self._patch = patch_telebot
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: List[Dict[str, Any]] = []
        self._confirmed_below = 0
        self._calls: List[Call] = []
        self._sent: List[Call] = []
        self._chats: Dict[Union[int, str], Dict[str, Any]] = {}
        self._messages: Dict[Tuple[Union[int, str], int], Dict[str, Any]] = {}
        self._last_message_id: Dict[Union[int, str], int] = {}
        self._callback_queries: Dict[str, Optional[Dict[str, Any]]] = {}
        self._commands: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
        self._files: Dict[str, UploadedFile] = {}
        self._custom: Dict[str, Tuple[str, Callable[[Dict[str, Any]], Any]]] = {}
        self._failures: List[_Failure] = []
        self._allowed_updates: Optional[List[str]] = None
        self._poll_generation = 0
        self._webhook: Optional[Dict[str, Any]] = None
        self._active_requests = 0
        self._started = False
        self._stopping = False
        self._server: Optional[_Server] = None
        self._threads: List[threading.Thread] = []
        self._previous_api_url: Optional[str] = None
        self._methods: Dict[str, str] = {}
        for name in dir(self):
            if name.startswith("_m_"):
                self._methods[name[3:].lower()] = name[3:]
        for name in _TRUE_METHODS:
            self._methods.setdefault(name.lower(), name)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "FakeBotAPI":
        """Bind, start serving in daemon threads and (by default) point telebot at this server."""
        with self._lock:
            if self._started or self._server is not None:
                raise RuntimeError("FakeBotAPI.start() called twice")
            self._server = _Server(self, (self._host, self._port))
            self._started = True
        serve = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name="FakeBotAPI-{}".format(self.port), daemon=True)
        hook = threading.Thread(target=self._webhook_loop, name="FakeBotAPI-webhook-{}".format(self.port),
                                daemon=True)
        self._threads = [serve, hook]
        serve.start()
        hook.start()
        if self._patch:
            self._previous_api_url = apihelper.API_URL
            apihelper.API_URL = self.api_url  # type: ignore[assignment]  # telebot annotates it None
        logger.debug("FakeBotAPI listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Answer pending long polls, stop serving, close connections and restore telebot's API_URL."""
        with self._lock:
            if not self._started or self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
            deadline = time.monotonic() + 2.0
            while self._active_requests:  # let woken long polls send their answer
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        server = self._server
        assert server is not None
        server.shutdown()
        server.close_connections()
        server.server_close()
        for thread in self._threads:
            thread.join(5.0)
        if self._patch and apihelper.API_URL == self.api_url:
            apihelper.API_URL = self._previous_api_url
        logger.debug("FakeBotAPI on port %s stopped", self.port)

    def __enter__(self) -> "FakeBotAPI":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped" if self._stopping else "new"
        return "<FakeBotAPI {} {}>".format(self.url if self._server else "-", state)

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._started and not self._stopping

    @property
    def port(self) -> int:
        """The TCP port the server listens on (after start())."""
        if self._server is None:
            raise RuntimeError("FakeBotAPI is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT``."""
        return "http://{}:{}".format(self._host, self.port)

    @property
    def api_url(self) -> str:
        """The template for ``telebot.apihelper.API_URL``: ``http://127.0.0.1:PORT/bot{0}/{1}``."""
        return self.url + "/bot{0}/{1}"

    # ----------------------------------------------------------------- pushing updates

    def push_update(self, update: Union[Mapping[str, Any], str]) -> Dict[str, Any]:
        """Queue any update (a dict or its JSON) for getUpdates; assigns ``update_id`` when missing.

        The update is checked with ``types.Update.de_json`` first, so a malformed one fails
        here, in the test, rather than in the bot's polling thread.  Returns a copy as queued.
        """
        data = json.loads(update) if isinstance(update, str) else copy.deepcopy(dict(update))
        if not any(key != "update_id" for key in data):
            raise ValueError("an update needs a payload besides update_id, e.g. {'message': {...}}")
        with self._lock:
            if self._stopping:
                raise RuntimeError("FakeBotAPI is stopped")
            if data.get("update_id") is None:
                data["update_id"] = next_update_id()
            else:
                _update_ids.bump(int(data["update_id"]))
            try:
                types.Update.de_json(copy.deepcopy(data))
            except Exception as error:
                raise ValueError("telebot cannot parse this update: {!r}: {}".format(error, data)) from error
            uid = data["update_id"]
            if uid < self._confirmed_below:
                logger.warning("FakeBotAPI: update_id %s is below the confirmed offset %s; getUpdates will "
                               "drop it", uid, self._confirmed_below)
            index = len(self._queue)
            while index and self._queue[index - 1]["update_id"] > uid:
                index -= 1
            self._queue.insert(index, data)
            self._observe(data)
            self._cond.notify_all()
            return copy.deepcopy(data)

    def push(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Queue an update of ``kind`` built by :func:`update_dict` (e.g. ``push("poll_answer", ...)``)."""
        return self.push_update(update_dict(kind, **fields))

    def send_message(self, chat_id: int, text: str, user_id: Optional[int] = None, *,
                     chat_type: Optional[str] = None, message_thread_id: Optional[int] = None,
                     reply_to_message_id: Optional[int] = None, message_id: Optional[int] = None,
                     **fields: Any) -> Dict[str, Any]:
        """A user writes ``text`` in ``chat_id`` (private if > 0, group if < 0); returns the update.

        Message ids count per chat, shared with the bot's messages, as in Telegram.
        """
        with self._lock:
            mid = message_id if message_id is not None else self._next_message_id(chat_id)
            reply = None
            if reply_to_message_id is not None:
                found = self._messages.get((chat_id, reply_to_message_id))
                reply = _without_reply(found) if found else {
                    "message_id": reply_to_message_id, "date": _now(), "chat": chat_dict(chat_id, chat_type)}
        message = message_dict(text, chat_id, user_id, chat_type=chat_type, message_thread_id=message_thread_id,
                               message_id=mid, reply_to_message=reply, **fields)
        return self.push_update({"message": message})

    def press_button(self, chat_id: int, data: str, user_id: Optional[int] = None,
                     message_id: Optional[int] = None, **fields: Any) -> Dict[str, Any]:
        """A user presses the inline button with callback ``data`` under a bot message; returns the update.

        Without ``message_id`` it is the newest bot message in the chat that has an inline
        keyboard (else the newest bot message, else a made-up one).
        """
        with self._lock:
            message = self._find_bot_message(chat_id, message_id)
            if message is None:
                mid = message_id if message_id is not None else self._next_message_id(chat_id)
                message = message_dict("Choose:", chat_id, user_id, message_id=mid,
                                       from_user=_bot_user_dict(self.bot_user))
                self._messages[(chat_id, mid)] = message
            datas = _callback_datas(message)
            if datas and data not in datas:
                logger.warning("FakeBotAPI: message %s in chat %s has no button with callback_data %r (it has %r)",
                               message["message_id"], chat_id, data, datas)
            query = callback_query_dict(data, chat_id, user_id, message=copy.deepcopy(message),
                                        bot_user=self.bot_user, **fields)
        return self.push_update({"callback_query": query})

    # ----------------------------------------------------------------- reading what the bot did

    @property
    def calls(self) -> List[Call]:
        """Every request received, in order of arrival (getUpdates included)."""
        with self._lock:
            return list(self._calls)

    @property
    def sent(self) -> List[Call]:
        """The bot's successful actions in order: sends, edits, answers, deletions (no getUpdates/getMe/get*)."""
        with self._lock:
            return list(self._sent)

    def sent_messages(self, chat_id: Optional[Union[int, str]] = None) -> List[Call]:
        """The calls that created a message (sendMessage, sendPhoto, forwardMessage ...), optionally for one chat."""
        with self._lock:
            return self._sent_messages(chat_id)

    def replies(self, chat_id: Optional[Union[int, str]] = None) -> List[str]:
        """Texts (or captions) of the messages the bot sent, optionally to one chat; others are skipped."""
        return [c.text for c in self.sent_messages(chat_id) if c.text is not None]

    def get_message(self, chat_id: Union[int, str], message_id: int) -> Optional[Dict[str, Any]]:
        """The server's current copy of a message (after edits), or None if unknown or deleted."""
        with self._lock:
            found = self._messages.get((chat_id, message_id))
            return copy.deepcopy(found) if found is not None else None

    @property
    def pending_updates(self) -> List[Dict[str, Any]]:
        """Updates pushed but not yet confirmed by getUpdates (or delivered to the webhook)."""
        with self._lock:
            return copy.deepcopy(self._queue)

    def callback_answer(self, query_id: str) -> Optional[Dict[str, Any]]:
        """The params of the answerCallbackQuery for ``query_id``, or None if not answered."""
        with self._lock:
            answer = self._callback_queries.get(str(query_id))
            return dict(answer) if answer is not None else None

    def wait_for_replies(self, n: int, timeout: float = 10.0,
                         chat_id: Optional[Union[int, str]] = None) -> List[Call]:
        """Block until the bot has sent at least ``n`` messages (to ``chat_id``); return them all.

        Raises ``TimeoutError`` listing what did arrive, recent failed calls and pending updates.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = self._sent_messages(chat_id)
                if len(found) >= n:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    raise TimeoutError(self._timeout_report(
                        "expected {} message(s){} within {}s, got {}".format(
                            n, "" if chat_id is None else " to chat {}".format(chat_id), timeout, len(found))))
                self._cond.wait(remaining)

    def wait_for_calls(self, method: str, n: int = 1, timeout: float = 10.0,
                       chat_id: Optional[Union[int, str]] = None, *, completed: bool = True) -> List[Call]:
        """Block until ``method`` was called successfully ``n`` times (for ``chat_id``); return those calls.

        With ``completed=False`` calls count as soon as they arrive (e.g. a long poll in progress).
        """
        name = self._methods.get(method.lower(), method)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [c for c in self._calls if c.method == name and (chat_id is None or c.chat_id == chat_id)
                         and (not completed or (c.ok and c.result is not None))]
                if len(found) >= n:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    raise TimeoutError(self._timeout_report(
                        "expected {} successful {} call(s) within {}s, got {}".format(n, name, timeout, len(found))))
                self._cond.wait(remaining)

    def wait_until_consumed(self, timeout: float = 10.0) -> None:
        """Block until every pushed update was confirmed (getUpdates with a later offset, or webhook 2xx)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    polls = sum(1 for c in self._calls if c.method == "getUpdates")
                    raise TimeoutError(
                        "{} update(s) still unconfirmed after {}s: {}; getUpdates calls so far: {} "
                        "(is the bot polling, and with the right token?)".format(
                            len(self._queue), timeout, ", ".join(_describe(u) for u in self._queue[:10]), polls))
                self._cond.wait(remaining)

    def clear(self) -> None:
        """Forget the recorded calls and sent messages (chats, messages and pending updates stay)."""
        with self._lock:
            self._calls.clear()
            self._sent.clear()

    # ----------------------------------------------------------------- customising answers

    def add_method(self, name: str, handler: Callable[[Dict[str, Any]], Any]) -> None:
        """Answer ``name`` with ``handler(params)`` (its return value is the result; raise BotAPIError to fail).

        It overrides a built-in method of that name and runs outside the server's lock.
        """
        self._custom[name.lower()] = (name, handler)
        self._methods.setdefault(name.lower(), name)

    def fail(self, method: str, error_code: int = 500, description: Optional[str] = None, *, times: int = 1,
             chat_id: Optional[Union[int, str]] = None, retry_after: Optional[int] = None) -> None:
        """Make the next ``times`` calls of ``method`` (for ``chat_id``) fail with ``error_code``.

        ``fail("sendMessage", 429, retry_after=3)`` answers like Telegram's flood control;
        ``fail("sendMessage", 403, chat_id=5)`` like a user who blocked the bot.
        """
        defaults = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden: bot was blocked by the user",
                    404: "Not Found", 409: "Conflict", 429: "Too Many Requests: retry after {}".format(retry_after or 5),
                    500: "Internal Server Error", 502: "Bad Gateway"}
        parameters = {"retry_after": retry_after or 5} if error_code == 429 or retry_after else None
        error = BotAPIError(error_code, description or defaults.get(error_code, "Error"), parameters)
        name = self._methods.get(method.lower(), method)
        with self._lock:
            self._failures.append(_Failure(name, error, times, chat_id))

    # ----------------------------------------------------------------- running a bot

    @contextlib.contextmanager
    def run_bot(self, bot: "telebot.TeleBot", *, long_polling_timeout: int = 1, join_timeout: float = 10.0,
                start_timeout: float = 10.0, **polling_kwargs: Any) -> Iterator[threading.Thread]:
        """Run ``bot.infinity_polling`` in a daemon thread for the ``with`` block, then stop and join it.

        It returns once the bot's polling loop made its first getUpdates: telebot's
        ``stop_polling()`` is lost if it comes before polling started.
        """
        with self._lock:
            polls_before = sum(1 for c in self._calls if c.method == "getUpdates" and self._is_real_poll(c))
        polling_kwargs.setdefault("timeout", long_polling_timeout + 10)
        thread = threading.Thread(target=bot.infinity_polling, name="FakeBotAPI-bot-polling", daemon=True,
                                  kwargs=dict(polling_kwargs, long_polling_timeout=long_polling_timeout))
        thread.start()
        try:
            deadline = time.monotonic() + start_timeout
            with self._lock:
                while sum(1 for c in self._calls if c.method == "getUpdates" and self._is_real_poll(c)) \
                        <= polls_before:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not thread.is_alive():
                        raise RuntimeError(self._timeout_report("the bot did not start polling within {}s".format(
                            start_timeout)))
                    self._cond.wait(min(remaining, 0.1))  # also notice the thread dying
            yield thread
        finally:
            bot.stop_polling()
            thread.join(join_timeout)
            if thread.is_alive():
                logger.warning("FakeBotAPI: the bot's polling thread did not stop within %ss", join_timeout)

    @staticmethod
    def _is_real_poll(call: Call) -> bool:
        offset = call.params.get("offset")
        return not (isinstance(offset, (int, float)) and offset < 0)

    # ----------------------------------------------------------------- internals

    def _request_started(self) -> None:
        with self._lock:
            self._active_requests += 1

    def _request_finished(self) -> None:
        with self._lock:
            self._active_requests -= 1
            self._cond.notify_all()

    def _sent_messages(self, chat_id: Optional[Union[int, str]]) -> List[Call]:
        return [c for c in self._sent if c.created_message and (chat_id is None or c.chat_id == chat_id)]

    def _timeout_report(self, headline: str) -> str:
        lines = [headline + "."]
        messages = self._sent_messages(None)
        if messages:
            lines.append("Messages the bot sent ({}):".format(len(messages)))
            lines.extend("  {} to {}: {!r}".format(c.method, c.chat_id, c.text) for c in messages[-20:])
        else:
            lines.append("The bot sent no messages.")
        failed = [c for c in self._calls if not c.ok][-5:]
        if failed:
            lines.append("Failed calls:")
            lines.extend("  {} {}: {} {}".format(c.method, c.chat_id if c.chat_id is not None else "",
                                                 c.error_code, c.description) for c in failed)
        lines.append("Unconfirmed updates: {}{}; getUpdates calls: {}.".format(
            len(self._queue), " ({})".format(", ".join(_describe(u) for u in self._queue[:5])) if self._queue else "",
            sum(1 for c in self._calls if c.method == "getUpdates")))
        return "\n".join(lines)

    def _next_message_id(self, chat_id: Union[int, str]) -> int:
        value = self._last_message_id.get(chat_id, 0) + 1
        self._last_message_id[chat_id] = value
        return value

    def _remember_message(self, message: Dict[str, Any]) -> None:
        chat = message.get("chat") or {}
        chat_id = chat.get("id")
        mid = message.get("message_id")
        if chat_id is None or not isinstance(mid, int):
            return
        self._chats.setdefault(chat_id, dict(chat))
        self._messages[(chat_id, mid)] = copy.deepcopy(message)
        if mid > self._last_message_id.get(chat_id, 0):
            self._last_message_id[chat_id] = mid

    def _observe(self, update: Dict[str, Any]) -> None:
        """Learn chats, messages and callback query ids from a pushed update."""
        for kind in ("message", "edited_message", "channel_post", "edited_channel_post", "business_message",
                     "edited_business_message"):
            if isinstance(update.get(kind), dict):
                self._remember_message(update[kind])
        query = update.get("callback_query")
        if isinstance(query, dict):
            self._callback_queries.setdefault(str(query.get("id")), None)
            message = query.get("message")
            if isinstance(message, dict) and message.get("date"):
                chat_id = (message.get("chat") or {}).get("id")
                if (chat_id, message.get("message_id")) not in self._messages:
                    self._remember_message(message)

    def _find_bot_message(self, chat_id: int, message_id: Optional[int]) -> Optional[Dict[str, Any]]:
        if message_id is not None:
            return self._messages.get((chat_id, message_id))
        bot_id = self.bot_user["id"]
        mine = [m for (cid, _), m in self._messages.items()
                if cid == chat_id and (m.get("from") or {}).get("id") == bot_id]
        if not mine:
            return None
        with_buttons = [m for m in mine if _is_inline(m.get("reply_markup"))]
        return max(with_buttons or mine, key=lambda m: m["message_id"])

    def _handle(self, token: str, method: str, raw: Dict[str, Any],
                files: Dict[str, UploadedFile]) -> Tuple[int, Dict[str, Any]]:
        """Answer one request: (HTTP status, JSON body)."""
        canonical = self._methods.get(method.lower())
        params = _decode_params(raw)
        text = params.get("text", params.get("caption"))
        call = Call(method=canonical or method, params=params, files=dict(files), chat_id=params.get("chat_id"),
                    text=text if isinstance(text, str) else None)
        with self._lock:
            self._calls.append(call)
            self._cond.notify_all()
        try:
            if token != self.token:
                logger.warning("FakeBotAPI: %s with unknown token %r (expected %r)", method, token, self.token)
                raise BotAPIError(401, "Unauthorized")
            custom = self._custom.get(method.lower())
            with self._lock:
                failure = self._take_failure(call)
            if failure is not None:
                raise failure
            if custom is not None:
                result = custom[1](dict(params))
            elif canonical is None:
                logger.warning("FakeBotAPI: unknown method %r (teach it with api.add_method)", method)
                raise BotAPIError(404, "Not Found: method not found")
            else:
                with self._lock:
                    handler = getattr(self, "_m_" + canonical, None)
                    result = handler(_Params(call)) if handler is not None else True
                    result = copy.deepcopy(result)
        except BotAPIError as error:
            with self._lock:
                call.error_code = error.error_code
                call.description = error.description
                self._cond.notify_all()
            logger.debug("FakeBotAPI: %s -> %s %s", call.method, error.error_code, error.description)
            return error.error_code, error.to_json()
        with self._lock:
            call.result = result
            if call.method not in _HOUSEKEEPING and not call.method.startswith("get"):
                self._sent.append(call)
            self._cond.notify_all()
        return 200, {"ok": True, "result": result}

    def _take_failure(self, call: Call) -> Optional[BotAPIError]:
        for failure in self._failures:
            if failure.method == call.method and (failure.chat_id is None or failure.chat_id == call.chat_id):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                return failure.error
        return None

    # ---- helpers for method implementations (called with the lock held)

    def _chat(self, p: _Params, name: str = "chat_id") -> Dict[str, Any]:
        value = p.get(name)
        if value is None or value == "":
            raise BotAPIError(400, "Bad Request: {} is empty".format(name))
        if isinstance(value, str):
            wanted = value.lstrip("@").lower()
            for chat in self._chats.values():
                if str(chat.get("username", "")).lower() == wanted and value.startswith("@"):
                    return chat
            raise BotAPIError(400, "Bad Request: chat not found")
        if isinstance(value, bool) or not isinstance(value, int):
            raise BotAPIError(400, "Bad Request: chat not found")
        known = self._chats.get(value)
        if known is not None:
            return known
        chat = chat_dict(value)
        self._chats[value] = chat
        return chat

    def _new_bot_message(self, p: _Params, chat: Dict[str, Any], content: Mapping[str, Any]) -> Dict[str, Any]:
        chat_id = chat["id"]
        message: Dict[str, Any] = {"message_id": self._next_message_id(chat_id), "from": _bot_user_dict(self.bot_user),
                                   "chat": dict(chat), "date": _now()}
        if chat.get("type") == "channel":
            del message["from"]
            message["sender_chat"] = dict(chat)
        thread = p.integer("message_thread_id")
        if thread:
            message["message_thread_id"] = thread
            if chat.get("is_forum") or chat.get("type") == "private":
                message["is_topic_message"] = True
        reply_id = None
        reply = p.obj("reply_parameters", dict, "Bad Request: can't parse reply parameters JSON object")
        if reply is not None:
            reply_id = reply.get("message_id")
        elif p.get("reply_to_message_id") is not None:
            reply_id = p.integer("reply_to_message_id")
        if reply_id is not None:
            target_chat = reply.get("chat_id", chat_id) if reply else chat_id
            found = self._messages.get((target_chat, reply_id))
            if found is not None:
                message["reply_to_message"] = _without_reply(found)
            elif self.strict and not (reply or {}).get("allow_sending_without_reply"):
                raise BotAPIError(400, "Bad Request: message to be replied not found")
        for key in ("business_connection_id", "message_effect_id"):
            if p.get(key):
                message[key] = p.get(key)
        if p.flag("protect_content"):
            message["has_protected_content"] = True
        message.update({k: v for k, v in content.items() if v is not None})
        markup = p.markup()
        if _is_inline(markup):
            message["reply_markup"] = markup
        self._messages[(chat_id, message["message_id"])] = message
        p.call.message = copy.deepcopy(message)
        p.call.created_message = True
        p.call.chat_id = chat_id
        return message

    def _caption(self, p: _Params) -> Dict[str, Any]:
        caption = p.string("caption")
        if caption is not None and len(caption) > _MAX_CAPTION:
            raise BotAPIError(400, "Bad Request: message caption is too long")
        entities = p.obj("caption_entities", list)
        return {"caption": caption or None, "caption_entities": entities}

    def _file(self, p: _Params, name: str) -> Dict[str, Any]:
        upload = p.files.get(name)
        if upload is not None:
            file_id = "FAKE-{}-{}".format(name, _file_ids.next())
            self._files[file_id] = upload
            size: Optional[int] = len(upload.content)
        else:
            value = p.string(name)
            if not value:
                raise BotAPIError(400, "Bad Request: there is no {} in the request".format(name))
            if value.startswith(("http://", "https://", "attach://")):
                file_id = "FAKE-{}-{}".format(name, _file_ids.next())
                size = None
            else:
                file_id = value
                size = len(self._files[value].content) if value in self._files else None
        info: Dict[str, Any] = {"file_id": file_id,
                                "file_unique_id": hashlib.sha1(file_id.encode("utf-8")).hexdigest()[:16]}
        if size is not None:
            info["file_size"] = size
        return info

    def _edit_target(self, p: _Params, verb: str) -> Optional[Dict[str, Any]]:
        """The stored bot message an edit refers to, or None for inline messages."""
        if p.get("inline_message_id"):
            if p.get("chat_id") is not None or p.get("message_id") is not None:
                raise BotAPIError(400, "Bad Request: chat_id and message_id must be empty for inline messages")
            return None
        chat = self._chat(p)
        mid = p.required_integer("message_id", "Bad Request: message identifier is not specified")
        p.call.chat_id = chat["id"]
        message = self._messages.get((chat["id"], mid))
        if message is None:
            if self.strict:
                raise BotAPIError(400, "Bad Request: message to {} not found".format(verb))
            message = {"message_id": mid, "from": _bot_user_dict(self.bot_user), "chat": dict(chat), "date": _now(),
                       "text": ""}
            self._messages[(chat["id"], mid)] = message
        if (message.get("from") or {}).get("id") != self.bot_user["id"] and message.get("chat", {}).get("type") != \
                "channel":
            raise BotAPIError(400, "Bad Request: message can't be edited")
        return message

    def _apply_edit(self, p: _Params, message: Dict[str, Any], changes: Mapping[str, Any]) -> Dict[str, Any]:
        markup = p.markup()
        new_markup = markup if _is_inline(markup) else None
        before = {k: message.get(k) for k in changes}
        if before == dict(changes) and message.get("reply_markup") == new_markup:
            raise BotAPIError(400, _NOT_MODIFIED)
        for key, value in changes.items():
            if value is None:
                message.pop(key, None)
            else:
                message[key] = value
        if new_markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = new_markup
        message["edit_date"] = _now()
        p.call.message = copy.deepcopy(message)
        return message

    # ---- the Bot API methods (called with the lock held; the name after _m_ is the method)

    def _m_getMe(self, p: _Params) -> Any:
        return dict(self.bot_user)

    def _m_getUpdates(self, p: _Params) -> Any:
        if self._webhook is not None:
            raise BotAPIError(409, "Conflict: can't use getUpdates method while webhook is active; use "
                                   "deleteWebhook to delete the webhook first")
        offset = p.integer("offset", 0) or 0
        limit = min(max(p.integer("limit", 100) or 100, 1), 100)
        timeout = max(0.0, float(p.number("timeout", 0) or 0))
        allowed = p.obj("allowed_updates", list)
        if allowed is not None:
            self._allowed_updates = [str(a) for a in allowed] or None
        self._poll_generation += 1
        generation = self._poll_generation
        self._cond.notify_all()  # terminates an older long poll with 409, like Telegram
        self._confirm(offset)
        deadline = time.monotonic() + min(timeout, self.max_poll_timeout)
        while True:
            batch = self._deliverable(limit)
            if batch or self._stopping:
                return batch
            if generation != self._poll_generation:
                raise BotAPIError(409, "Conflict: terminated by other getUpdates request; make sure that only one "
                                       "bot instance is running")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._cond.wait(remaining)

    def _confirm(self, offset: int) -> None:
        before = len(self._queue)
        if offset > 0:
            self._confirmed_below = max(self._confirmed_below, offset)
            self._queue = [u for u in self._queue if u["update_id"] >= offset]
        elif offset < 0:
            self._queue = self._queue[offset:]
            if self._queue:
                self._confirmed_below = max(self._confirmed_below, self._queue[0]["update_id"])
        if len(self._queue) != before:
            self._cond.notify_all()

    def _deliverable(self, limit: int) -> List[Dict[str, Any]]:
        if self._allowed_updates:
            kept = [u for u in self._queue if _update_kind(u) in self._allowed_updates]
            if len(kept) != len(self._queue):
                self._queue = kept
                self._cond.notify_all()
        return self._queue[:limit]

    def _m_sendMessage(self, p: _Params) -> Any:
        chat = self._chat(p)
        text = p.string("text")
        if not text or not text.strip():
            raise BotAPIError(400, "Bad Request: message text is empty")
        if len(text) > _MAX_TEXT:
            raise BotAPIError(400, "Bad Request: message is too long")
        preview = p.obj("link_preview_options")
        return self._new_bot_message(p, chat, {"text": text, "entities": p.obj("entities", list),
                                               "link_preview_options": preview})

    def _send_media(self, p: _Params, name: str) -> Any:
        chat = self._chat(p)
        info = self._file(p, name)
        width = p.integer("width", 320) or 320
        height = p.integer("height", 240) or 240
        duration = p.integer("duration", 1) or 1
        upload = p.files.get(name)
        if name == "photo":
            obj: Any = [dict(info, width=90, height=90), dict(info, width=width, height=height)]
            obj[0]["file_id"] = info["file_id"] + "-thumb"
        elif name in ("document", "audio", "voice"):
            obj = dict(info)
            if upload is not None:
                obj.update(file_name=upload.filename, mime_type=upload.content_type)
            if name != "document":
                obj["duration"] = duration
        elif name in ("video", "animation"):
            obj = dict(info, width=width, height=height, duration=duration)
        elif name == "video_note":
            obj = dict(info, length=p.integer("length", 240) or 240, duration=duration)
        else:  # sticker
            obj = dict(info, type="regular", width=512, height=512, is_animated=False, is_video=False)
            if p.string("emoji"):
                obj["emoji"] = p.string("emoji")
        content: Dict[str, Any] = {name: obj}
        if name == "animation":
            content["document"] = dict(info)
        if name != "sticker":
            content.update(self._caption(p))
        return self._new_bot_message(p, chat, content)

    def _m_sendPhoto(self, p: _Params) -> Any:
        return self._send_media(p, "photo")

    def _m_sendDocument(self, p: _Params) -> Any:
        return self._send_media(p, "document")

    def _m_sendAudio(self, p: _Params) -> Any:
        return self._send_media(p, "audio")

    def _m_sendVideo(self, p: _Params) -> Any:
        return self._send_media(p, "video")

    def _m_sendVoice(self, p: _Params) -> Any:
        return self._send_media(p, "voice")

    def _m_sendAnimation(self, p: _Params) -> Any:
        return self._send_media(p, "animation")

    def _m_sendSticker(self, p: _Params) -> Any:
        return self._send_media(p, "sticker")

    def _m_sendVideoNote(self, p: _Params) -> Any:
        return self._send_media(p, "video_note")

    def _location(self, p: _Params) -> Dict[str, Any]:
        latitude = p.number("latitude")
        longitude = p.number("longitude")
        if latitude is None or longitude is None:
            raise BotAPIError(400, "Bad Request: wrong latitude or longitude")
        return {"latitude": latitude, "longitude": longitude}

    def _m_sendLocation(self, p: _Params) -> Any:
        chat = self._chat(p)
        return self._new_bot_message(p, chat, {"location": self._location(p)})

    def _m_sendVenue(self, p: _Params) -> Any:
        chat = self._chat(p)
        title, address = p.string("title"), p.string("address")
        if not title or not address:
            raise BotAPIError(400, "Bad Request: venue title and address must be non-empty")
        location = self._location(p)
        return self._new_bot_message(p, chat, {"venue": {"location": location, "title": title, "address": address},
                                               "location": location})

    def _m_sendContact(self, p: _Params) -> Any:
        chat = self._chat(p)
        phone, name = p.string("phone_number"), p.string("first_name")
        if not phone or not name:
            raise BotAPIError(400, "Bad Request: phone number and first name must be non-empty")
        contact = {"phone_number": phone, "first_name": name}
        if p.string("last_name"):
            contact["last_name"] = p.string("last_name")  # type: ignore[assignment]
        return self._new_bot_message(p, chat, {"contact": contact})

    def _m_sendDice(self, p: _Params) -> Any:
        chat = self._chat(p)
        emoji = p.string("emoji") or "\U0001F3B2"
        sides = {"\U0001F3C0": 5, "\u26BD": 5, "\U0001F3B0": 64}.get(emoji, 6)
        value = (self._last_message_id.get(chat["id"], 0) % sides) + 1
        return self._new_bot_message(p, chat, {"dice": {"emoji": emoji, "value": value}})

    def _m_sendPoll(self, p: _Params) -> Any:
        chat = self._chat(p)
        question = p.string("question")
        options = p.obj("options", list, "Bad Request: can't parse options JSON object")
        if not question:
            raise BotAPIError(400, "Bad Request: poll question must be non-empty")
        if not options or len(options) < 2:
            raise BotAPIError(400, "Bad Request: poll must have at least 2 option")
        poll = _poll(question, options, is_anonymous=p.flag("is_anonymous", True),
                     type=p.string("type") or "regular", allows_multiple_answers=p.flag("allows_multiple_answers"),
                     is_closed=p.flag("is_closed"))
        return self._new_bot_message(p, chat, {"poll": poll})

    def _source_message(self, p: _Params, verb: str) -> Dict[str, Any]:
        source_chat = self._chat(p, "from_chat_id")
        mid = p.required_integer("message_id", "Bad Request: message identifier is not specified")
        found = self._messages.get((source_chat["id"], mid))
        if found is None:
            if self.strict:
                raise BotAPIError(400, "Bad Request: message to {} not found".format(verb))
            found = {"message_id": mid, "date": _now(), "chat": dict(source_chat), "text": "(unknown message)"}
        return found

    _CONTENT_KEYS = ("text", "entities", "caption", "caption_entities", "photo", "document", "audio", "video",
                     "voice", "animation", "sticker", "video_note", "location", "venue", "contact", "dice", "poll")

    def _m_forwardMessage(self, p: _Params) -> Any:
        chat = self._chat(p)
        source = self._source_message(p, "forward")
        content = {k: copy.deepcopy(source[k]) for k in self._CONTENT_KEYS if k in source}
        sender = source.get("from")
        if sender:
            content["forward_origin"] = {"type": "user", "sender_user": dict(sender), "date": source["date"]}
        else:
            content["forward_origin"] = {"type": "chat", "sender_chat": dict(source["chat"]), "date": source["date"]}
        return self._new_bot_message(p, chat, content)

    def _m_copyMessage(self, p: _Params) -> Any:
        chat = self._chat(p)
        source = self._source_message(p, "copy")
        content = {k: copy.deepcopy(source[k]) for k in self._CONTENT_KEYS if k in source}
        if p.get("caption") is not None:
            content.update(self._caption(p))
        message = self._new_bot_message(p, chat, content)
        p.call.text = message.get("text", message.get("caption"))
        return {"message_id": message["message_id"]}

    def _m_editMessageText(self, p: _Params) -> Any:
        text = p.string("text")
        if not text or not text.strip():
            raise BotAPIError(400, "Bad Request: message text is empty")
        if len(text) > _MAX_TEXT:
            raise BotAPIError(400, "Bad Request: message is too long")
        message = self._edit_target(p, "edit")
        if message is None:
            p.markup()
            return True
        if "text" not in message:
            raise BotAPIError(400, "Bad Request: there is no text in the message to edit")
        return self._apply_edit(p, message, {"text": text, "entities": p.obj("entities", list)})

    def _m_editMessageCaption(self, p: _Params) -> Any:
        caption = self._caption(p)
        message = self._edit_target(p, "edit")
        if message is None:
            p.markup()
            return True
        return self._apply_edit(p, message, caption)

    def _m_editMessageReplyMarkup(self, p: _Params) -> Any:
        message = self._edit_target(p, "edit")
        if message is None:
            p.markup()
            return True
        return self._apply_edit(p, message, {})

    def _m_deleteMessage(self, p: _Params) -> Any:
        chat = self._chat(p)
        mid = p.required_integer("message_id", "Bad Request: message identifier is not specified")
        p.call.chat_id = chat["id"]
        if self._messages.pop((chat["id"], mid), None) is None and self.strict:
            raise BotAPIError(400, "Bad Request: message to delete not found")
        return True

    def _m_deleteMessages(self, p: _Params) -> Any:
        chat = self._chat(p)
        ids = p.obj("message_ids", list, "Bad Request: can't parse message_ids JSON array") or []
        for mid in ids:
            self._messages.pop((chat["id"], mid), None)
        return True

    def _m_answerCallbackQuery(self, p: _Params) -> Any:
        query_id = p.string("callback_query_id")
        if not query_id:
            raise BotAPIError(400, _TOO_OLD)
        if query_id in self._callback_queries:
            if self._callback_queries[query_id] is not None and self.strict:
                raise BotAPIError(400, _TOO_OLD)
        elif self.strict:
            logger.warning("FakeBotAPI: answerCallbackQuery for unknown query %r (push it with press_button, "
                           "or use strict=False)", query_id)
            raise BotAPIError(400, _TOO_OLD)
        text = p.string("text")
        if text is not None and len(text) > 200:
            raise BotAPIError(400, "Bad Request: MESSAGE_TOO_LONG")
        self._callback_queries[query_id] = dict(p.values)
        return True

    def _m_sendChatAction(self, p: _Params) -> Any:
        self._chat(p)
        if not p.string("action"):
            raise BotAPIError(400, "Bad Request: wrong parameter action in request")
        return True

    @staticmethod
    def _commands_key(p: _Params) -> Tuple[str, str]:
        scope = p.obj("scope") or {"type": "default"}
        return json.dumps(scope, sort_keys=True), p.string("language_code") or ""

    def _m_setMyCommands(self, p: _Params) -> Any:
        commands = p.obj("commands", list, "Bad Request: can't parse commands JSON object")
        if commands is None:
            raise BotAPIError(400, "Bad Request: parameter \"commands\" is required")
        if len(commands) > 100:
            raise BotAPIError(400, "Bad Request: too many commands specified")
        for command in commands:
            if not isinstance(command, dict) or not _COMMAND_RE.match(str(command.get("command", ""))) \
                    or not 1 <= len(str(command.get("description", ""))) <= 256:
                raise BotAPIError(400, "Bad Request: BOT_COMMAND_INVALID")
        self._commands[self._commands_key(p)] = [dict(c) for c in commands]
        return True

    def _m_getMyCommands(self, p: _Params) -> Any:
        return list(self._commands.get(self._commands_key(p), []))

    def _m_deleteMyCommands(self, p: _Params) -> Any:
        self._commands.pop(self._commands_key(p), None)
        return True

    def _m_getChat(self, p: _Params) -> Any:
        chat = dict(self._chat(p))
        chat.setdefault("accent_color_id", 0)
        chat.setdefault("max_reaction_count", 11)
        return chat

    def _m_getChatMember(self, p: _Params) -> Any:
        chat = self._chat(p)
        user_id = p.required_integer("user_id", "Bad Request: user_id is empty")
        if user_id == self.bot_user["id"]:
            user = _bot_user_dict(self.bot_user)
            status = "member" if chat["type"] == "private" else "administrator"
        else:
            user = user_dict(user_id)
            status = "member"
        return _member(user, status)

    def _m_getChatMemberCount(self, p: _Params) -> Any:
        self._chat(p)
        return 2

    def _m_getChatAdministrators(self, p: _Params) -> Any:
        self._chat(p)
        return []

    def _m_getUserProfilePhotos(self, p: _Params) -> Any:
        return {"total_count": 0, "photos": []}

    def _m_getMyName(self, p: _Params) -> Any:
        return {"name": self.bot_user["first_name"]}

    def _m_getMyDescription(self, p: _Params) -> Any:
        return {"description": ""}

    def _m_getMyShortDescription(self, p: _Params) -> Any:
        return {"short_description": ""}

    def _m_getChatMenuButton(self, p: _Params) -> Any:
        return {"type": "default"}

    def _m_getFile(self, p: _Params) -> Any:
        file_id = p.string("file_id")
        if not file_id:
            raise BotAPIError(400, "Bad Request: file_id is empty")
        info: Dict[str, Any] = {"file_id": file_id,
                                "file_unique_id": hashlib.sha1(file_id.encode("utf-8")).hexdigest()[:16],
                                "file_path": "files/{}".format(file_id)}
        if file_id in self._files:
            info["file_size"] = len(self._files[file_id].content)
        return info

    def _m_setWebhook(self, p: _Params) -> Any:
        url = p.string("url") or ""
        if p.flag("drop_pending_updates"):
            self._queue = []
        allowed = p.obj("allowed_updates", list)
        if allowed is not None:
            self._allowed_updates = [str(a) for a in allowed] or None
        if not url:
            self._webhook = None
        else:
            if not url.startswith(("http://", "https://")):
                raise BotAPIError(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
            self._webhook = {"url": url, "secret_token": p.string("secret_token"),
                             "max_connections": p.integer("max_connections", 40)}
        self._cond.notify_all()
        return True

    def _m_deleteWebhook(self, p: _Params) -> Any:
        if p.flag("drop_pending_updates"):
            self._queue = []
        self._webhook = None
        self._cond.notify_all()
        return True

    def _m_getWebhookInfo(self, p: _Params) -> Any:
        info: Dict[str, Any] = {"url": "", "has_custom_certificate": False, "pending_update_count": len(self._queue)}
        if self._webhook is not None:
            info["url"] = self._webhook["url"]
            info["max_connections"] = self._webhook["max_connections"]
            for key in ("last_error_date", "last_error_message"):
                if self._webhook.get(key):
                    info[key] = self._webhook[key]
        if self._allowed_updates:
            info["allowed_updates"] = list(self._allowed_updates)
        return info

    def _m_close(self, p: _Params) -> Any:
        return True

    def _m_logOut(self, p: _Params) -> Any:
        return True

    # ---- webhook delivery

    def _webhook_loop(self) -> None:
        """POST pending updates, oldest first, to the webhook URL while one is set (like Telegram)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        backoff = 0.1
        while True:
            with self._lock:
                while not self._stopping and (self._webhook is None or not self._deliverable(1)):
                    self._cond.wait()
                if self._stopping:
                    return
                hook = dict(self._webhook)  # type: ignore[arg-type]
                update = self._queue[0]
            error = self._post_update(opener, hook, update)
            with self._lock:
                if error is None:
                    self._queue = [u for u in self._queue if u is not update]
                    self._confirmed_below = max(self._confirmed_below, update["update_id"] + 1)
                    backoff = 0.1
                    self._cond.notify_all()
                    continue
                if self._webhook is not None:
                    self._webhook["last_error_date"] = _now()
                    self._webhook["last_error_message"] = error
                logger.debug("FakeBotAPI: webhook delivery failed: %s", error)
                if not self._stopping:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    @staticmethod
    def _post_update(opener: urllib.request.OpenerDirector, hook: Mapping[str, Any],
                     update: Mapping[str, Any]) -> Optional[str]:
        headers = {"Content-Type": "application/json"}
        if hook.get("secret_token"):
            headers["X-Telegram-Bot-Api-Secret-Token"] = str(hook["secret_token"])
        request = urllib.request.Request(str(hook["url"]), data=json.dumps(update).encode("utf-8"),
                                         headers=headers, method="POST")
        try:
            with opener.open(request, timeout=10) as response:
                response.read()
                return None
        except urllib.error.HTTPError as error:
            return "Wrong response from the webhook: {} {}".format(error.code, error.reason)
        except (OSError, ValueError) as error:
            return "Connection failed: {}".format(error)


def _without_reply(message: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``message`` fit to be a ``reply_to_message`` (Telegram nests only one level)."""
    copied = copy.deepcopy(dict(message))
    copied.pop("reply_to_message", None)
    return copied
