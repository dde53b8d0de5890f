"""telesession: persistent per-chat sessions for blocking Telegram bots, safe under threads and processes.

    sessions = Sessions(store=JSONFileStore("data/sessions"), initial=lambda: {"count": 0})
    sessions.setup(bot)   # or @sessions.with_session on each handler

    @bot.message_handler(commands=["count"])
    def count(message):
        session["count"] += 1
"""
from typing import TYPE_CHECKING, Any

from . import errors, keys, stores
from .context import session
from .errors import (BacklogFull, ConflictError, CorruptSessionError, LockTimeout, NoActiveSession, SerializationError,
                     SessionError, StoreError)
from .manager import Sessions, configure, with_session

if TYPE_CHECKING:  # pragma: no cover
    from .middleware import SessionMiddleware
    from .states import StateStorage

__all__ = [
    "Sessions",
    "session",
    "with_session",
    "configure",
    "SessionMiddleware",
    "StateStorage",
    "keys",
    "stores",
    "errors",
    "SessionError",
    "NoActiveSession",
    "LockTimeout",
    "StoreError",
    "CorruptSessionError",
    "SerializationError",
    "ConflictError",
    "BacklogFull",
]

__version__ = "0.2.0.dev0"


def __getattr__(name: str) -> Any:
    # SessionMiddleware subclasses telebot's BaseMiddleware; importing telebot (which imports
    # redis when installed) is deferred so `import telesession` stays cheap.
    if name == "SessionMiddleware":
        from .middleware import SessionMiddleware

        return SessionMiddleware
    if name == "StateStorage":  # a telebot StateStorageBase: imports telebot too
        from .states import StateStorage

        return StateStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
