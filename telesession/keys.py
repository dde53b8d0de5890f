"""Session key strategies: which session an update belongs to.

A key function takes the handler's first argument (a ``Message``, a
``CallbackQuery``, an ``InlineQuery``, ...) and returns a ``str``, or ``None``
when the update has no session (a poll update carries no chat and no user).
Any callable of that shape works as ``Sessions(key=...)``.

A key strategy decides who can see what: two updates share a session exactly
when their keys are equal, so a key must never let one user's update map to
another user's private session.

Key formats (``CHAT``, ``USER``, ``THREAD`` are Telegram's numeric ids)::

    strategy          normal update      through a business connection BC
    by_chat           CHAT               b:BC:CHAT
    by_user           USER               b:BC:USER
    by_user_in_chat   CHAT:USER          b:BC:CHAT:USER
    by_chat_topic     CHAT or CHAT:THREAD  b:BC:CHAT or b:BC:CHAT:THREAD

An update arrives through a business connection when it carries a
``business_connection_id`` (``business_message``, ``edited_business_message``,
``deleted_business_messages``, a callback query on such a message): the customer
writing to business account A, to business account B and to the bot directly
gets three sessions.  Normal keys start with a digit or ``-``, so ``b:`` keys
never equal them.
"""
import sys
from typing import Any, Callable, Optional

__all__ = ["KeyFunc", "by_chat", "by_user", "by_user_in_chat", "by_chat_topic", "prefixed", "chat_id_of",
           "user_id_of", "business_connection_of", "BUSINESS_PREFIX"]

#: What a key of an update that arrived through a business connection starts with: ``b:BC:``.
BUSINESS_PREFIX = "b:"

KeyFunc = Callable[[Any], Optional[str]]

# telebot.types.Message, once telebot is loaded (looked up, not imported: importing
# telesession does not import telebot): by_chat's one-step path for a plain message.
_message_type: Any = None
_NO_SHORTCUT = object()  # _message_type when this telebot's Message cannot take the shortcut


def chat_id_of(update: Any) -> Optional[int]:
    """The chat an update happened in: its ``chat``, its message's chat, or a poll voter's chat."""
    chat = getattr(update, "chat", None)
    if chat is None:
        message = getattr(update, "message", None)  # CallbackQuery (also InaccessibleMessage)
        chat = getattr(message, "chat", None) if message is not None else None
        if chat is None:
            chat = getattr(update, "voter_chat", None)  # PollAnswer of an anonymous admin
    return None if chat is None else chat.id


def user_id_of(update: Any) -> Optional[int]:
    """The user who caused an update: ``from_user``, or ``user`` (PollAnswer, reactions, business)."""
    user = getattr(update, "from_user", None)
    if user is None:
        user = getattr(update, "user", None)
    return None if user is None else user.id


def business_connection_of(update: Any) -> Optional[str]:
    """The business connection an update arrived through (``None``: it did not)."""
    connection = getattr(update, "business_connection_id", None)
    if connection is None:
        message = getattr(update, "message", None)  # a CallbackQuery on a business message
        connection = getattr(message, "business_connection_id", None) if message is not None else None
    return connection or None


def _scoped(update: Any, key: str) -> str:
    """``key``, or ``b:BC:key`` for an update that arrived through business connection ``BC``."""
    connection = business_connection_of(update)
    return key if connection is None else f"{BUSINESS_PREFIX}{connection}:{key}"


def by_chat(update: Any) -> Optional[str]:
    """One session per chat (the default); updates without a chat fall back to their user."""
    global _message_type
    if type(update) is _message_type:  # the usual message, in one step
        chat = update.chat
        if chat is not None and update.business_connection_id is None:
            chat_id = chat.id
            if chat_id is not None:
                return str(chat_id)
    elif _message_type is None:
        message_type = getattr(sys.modules.get("telebot.types"), "Message", None)
        if message_type is not None and type(update) is message_type:  # decided on the first message:
            # a telebot older than Bot API 7.2 has no business_connection_id: no shortcut then
            _message_type = message_type if hasattr(update, "business_connection_id") else _NO_SHORTCUT
    chat_id = chat_id_of(update)
    if chat_id is None:
        chat_id = user_id_of(update)
        if chat_id is None:
            return None
    return _scoped(update, str(chat_id))


def by_user(update: Any) -> Optional[str]:
    """One session per user, shared by every chat the user writes in (e.g. a language preference)."""
    user_id = user_id_of(update)
    return None if user_id is None else _scoped(update, str(user_id))


def by_user_in_chat(update: Any) -> Optional[str]:
    """One session per user per chat, ``"CHAT:USER"``; ``None`` unless both are known."""
    chat_id, user_id = chat_id_of(update), user_id_of(update)
    if chat_id is None or user_id is None:
        return None
    return _scoped(update, f"{chat_id}:{user_id}")


def by_chat_topic(update: Any) -> Optional[str]:
    """One session per forum topic, ``"CHAT:THREAD"``; messages outside a topic use the chat."""
    chat_id = chat_id_of(update)
    if chat_id is None:
        return by_chat(update)
    message = update if hasattr(update, "message_thread_id") else getattr(update, "message", None)
    thread_id = getattr(message, "message_thread_id", None) if message is not None else None
    if thread_id is None or not getattr(message, "is_topic_message", False):
        return _scoped(update, str(chat_id))
    return _scoped(update, f"{chat_id}:{thread_id}")


# How each strategy's key holds the chat id, for moving sessions when a group becomes a
# supergroup (telesession.chat_moves): "chat" = the key is the chat id, "chat-prefix" = the
# chat id or the chat id followed by ":...".
by_chat._telesession_chat_layout = "chat"  # type: ignore[attr-defined]
by_user_in_chat._telesession_chat_layout = "chat-prefix"  # type: ignore[attr-defined]
by_chat_topic._telesession_chat_layout = "chat-prefix"  # type: ignore[attr-defined]


def prefixed(prefix: str, key: KeyFunc) -> KeyFunc:
    """``key`` with ``prefix`` in front, so that two managers can share one store.

    Managers over one store share its keys: a private chat's ``by_chat`` key equals its
    user's ``by_user`` key.  ``Sessions(store, key=keys.prefixed("user:", keys.by_user))``
    keeps a user-level session apart from the chat-level one.
    """
    def prefixed_key(update: Any) -> Optional[str]:
        value = key(update)
        return None if value is None else prefix + value

    prefixed_key.__name__ = f"prefixed({prefix!r}, {getattr(key, '__name__', key)!r})"
    layout = getattr(key, "_telesession_chat_layout", None)
    if layout is not None:
        prefixed_key._telesession_chat_layout = layout  # type: ignore[attr-defined]
        prefixed_key._telesession_key_prefix = (  # type: ignore[attr-defined]
            prefix + getattr(key, "_telesession_key_prefix", ""))
    return prefixed_key
