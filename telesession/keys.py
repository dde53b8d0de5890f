"""Session key strategies: which session an update belongs to.

A key function takes the handler's first argument (a ``Message``, a
``CallbackQuery``, an ``InlineQuery``, ...) and returns a ``str``, or ``None``
when the update has no session (a poll update carries no chat and no user).
Any callable of that shape works as ``Sessions(key=...)``.

A key strategy decides who can see what: two updates share a session exactly
when their keys are equal, so a key must never let one user's update map to
another user's private session.
"""
from typing import Any, Callable, Optional

__all__ = ["KeyFunc", "by_chat", "by_user", "by_user_in_chat", "by_chat_topic", "prefixed", "chat_id_of",
           "user_id_of"]

KeyFunc = Callable[[Any], Optional[str]]


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


def by_chat(update: Any) -> Optional[str]:
    """One session per chat (the default); updates without a chat fall back to their user."""
    chat_id = chat_id_of(update)
    if chat_id is not None:
        return str(chat_id)
    user_id = user_id_of(update)
    return None if user_id is None else str(user_id)


def by_user(update: Any) -> Optional[str]:
    """One session per user, shared by every chat the user writes in (e.g. a language preference)."""
    user_id = user_id_of(update)
    return None if user_id is None else str(user_id)


def by_user_in_chat(update: Any) -> Optional[str]:
    """One session per user per chat, ``"CHAT:USER"``; ``None`` unless both are known."""
    chat_id, user_id = chat_id_of(update), user_id_of(update)
    if chat_id is None or user_id is None:
        return None
    return f"{chat_id}:{user_id}"


def by_chat_topic(update: Any) -> Optional[str]:
    """One session per forum topic, ``"CHAT:THREAD"``; messages outside a topic use the chat."""
    chat_id = chat_id_of(update)
    if chat_id is None:
        return by_chat(update)
    message = update if hasattr(update, "message_thread_id") else getattr(update, "message", None)
    thread_id = getattr(message, "message_thread_id", None) if message is not None else None
    if thread_id is None or not getattr(message, "is_topic_message", False):
        return str(chat_id)
    return f"{chat_id}:{thread_id}"


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
    return prefixed_key
