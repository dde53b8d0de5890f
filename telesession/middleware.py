"""``SessionMiddleware``: the decorator's code path as a telebot class middleware.

``pre_process`` enters the manager's scope (lock, load, bind) and
``post_process`` leaves it (save if changed, unbind, unlock).  telebot skips
every ``post_process`` when a middleware cancels the update or raises in
``pre_process``, or when a handler's signature is rejected; so ``install``
also wraps the bot's per-update task, and whatever a middleware scope left
open when the task ends is released there without saving.
"""
import logging
from typing import Any, Optional

from . import context
from .manager import Sessions, _Scope

__all__ = ["SessionMiddleware", "install"]

logger = logging.getLogger("telesession")

try:
    from telebot.handler_backends import BaseMiddleware
    from telebot.util import update_types as _UPDATE_TYPES
except ImportError:  # pragma: no cover - telebot is a dependency; keep import errors readable
    BaseMiddleware = object  # type: ignore[assignment,misc]
    _UPDATE_TYPES = []


class SessionMiddleware(BaseMiddleware):  # type: ignore[misc,valid-type]
    """Opens the session of every update's key around its handlers; ``data[name]`` is the session."""

    update_sensitive = False

    def __init__(self, sessions: Sessions[Any], update_types: Optional[list] = None) -> None:
        super().__init__()
        self.sessions = sessions
        self.update_types = list(update_types or _UPDATE_TYPES)

    def pre_process(self, message: Any, data: dict) -> None:
        _release_leftovers(self)  # a previous update whose post_process never ran
        scope = _Scope(self.sessions, self.sessions.key_of(message), origin=self)
        data[self.sessions.name] = scope.__enter__()

    def post_process(self, message: Any, data: dict, exception: Optional[BaseException]) -> None:
        for frame in reversed(context.active_frames()):
            if frame.origin is self:
                scope = _Scope(self.sessions, frame.handle.key, origin=self)
                scope.frame, scope.owner = frame, True
                if exception is None:
                    scope.__exit__(None, None, None)
                else:
                    scope.__exit__(type(exception), exception, exception.__traceback__)
                return


def _release_leftovers(origin: Any = None) -> None:
    """Release scopes opened by middlewares (``origin``, or any) whose ``post_process`` never ran."""
    for frame in reversed(context.active_frames()):
        if frame.origin is not None and (origin is None or frame.origin is origin):
            logger.warning("session %r: post_process did not run (another middleware cancelled the "
                           "update or raised); released without saving", frame.handle.key)
            try:
                frame.handle.abandon()
            finally:
                context.remove(frame)


def install(sessions: Sessions[Any], bot: Any) -> SessionMiddleware:
    """``Sessions.setup``: register the middleware and the end-of-task safety net on ``bot``."""
    if not getattr(bot, "use_class_middlewares", False):
        raise ValueError("sessions.setup(bot) needs a bot made with use_class_middlewares=True "
                         "(telebot.TeleBot(TOKEN, use_class_middlewares=True)); or decorate each "
                         "handler with @sessions.with_session instead")
    middleware = SessionMiddleware(sessions)
    bot.setup_middleware(middleware)
    run = getattr(bot, "_run_middlewares_and_handler", None)
    if run is not None and not getattr(run, "_telesession_guard", False):
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return run(*args, **kwargs)
            finally:
                _release_leftovers()

        guarded._telesession_guard = True  # type: ignore[attr-defined]
        bot._run_middlewares_and_handler = guarded
    elif run is None:  # pragma: no cover - a telebot without this method: leftovers wait for the next update
        logger.warning("telebot has no _run_middlewares_and_handler: a cancelled update keeps its "
                       "session lock until the same worker thread handles another update")
    return middleware
