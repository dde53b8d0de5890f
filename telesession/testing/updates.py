"""Update factories: the JSON of Telegram updates, and the telebot objects built from it.

``update_dict``/``message_dict`` ... build the payloads; ``make_update``/``make_message``
... build the very objects telebot builds (via ``types.Update.de_json``), for unit
tests that feed ``bot.process_new_updates`` without any server.
"""
import copy
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from telebot import types

__all__ = [
    "DEFAULT_TOKEN", "DEFAULT_USER_ID", "DEFAULT_GROUP_ID", "UPDATE_KINDS", "next_update_id", "user_dict",
    "chat_dict", "message_dict", "callback_query_dict", "update_dict", "make_user", "make_chat", "make_message",
    "make_callback_query", "make_inline_query", "make_update", "message_update", "callback_update",
    "inline_query_update",
]

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
               "is_enabled": is_enabled,
               "can_reply": True}  # Bot API before 9.0: telebot 4.32 requires it; later ones also take `rights`
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

