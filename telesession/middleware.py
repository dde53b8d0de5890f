"""``SessionMiddleware``: the decorator's code path as a telebot class middleware.

``pre_process`` enters the manager's scope (lock, load, bind) and
``post_process`` leaves it (save if changed, unbind, unlock).  telebot skips
every ``post_process`` when a middleware cancels the update or raises in
``pre_process``, or when a handler's signature is rejected; so ``install``
also wraps the bot's per-update task, and whatever a middleware scope left
open when the task ends is released there without saving.
"""
import logging
import threading
from typing import Any, List, Optional, Set

from . import context
from .chat_moves import follow_migration
from .manager import Sessions, _Scope
from .ordering import Sequencer

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

    def __init__(self, sessions: Sessions[Any], update_types: Optional[list] = None,
                 ordered: bool = False) -> None:
        super().__init__()
        self.sessions = sessions
        self.update_types = list(update_types or _UPDATE_TYPES)
        #: With ordering, the tickets that keep each key's updates in arrival order.
        self.sequencer: Optional[Sequencer] = Sequencer() if ordered else None
        self._ticket_attr = f"_telesession_ticket_{id(self):x}"

    def pre_process(self, message: Any, data: dict) -> None:
        if context.active_frames():
            _release_leftovers(self)  # a previous update whose post_process never ran
        if getattr(message, "migrate_to_chat_id", None) or getattr(message, "migrate_from_chat_id", None):
            follow_migration(self.sessions, message)  # a group became a supergroup: move its sessions
        key = self.sessions.key_of(message)
        if self.sequencer is not None:
            ticket = getattr(message, self._ticket_attr, None)
            if ticket is not None:
                self.sequencer.wait_turn(ticket, self.sessions.lock_timeout)
        scope = _Scope(self.sessions, key, origin=self)
        data[self.sessions.name] = scope.__enter__()

    def issue_ticket(self, update: Any) -> Any:
        """Give the update's content a ticket for its key, before it is queued; the content, if so."""
        assert self.sequencer is not None
        content = next((c for c in (getattr(update, t, None) for t in self.update_types)
                        if c is not None), None)
        if content is None:
            return None
        try:
            key = self.sessions.key_of(content)
        except Exception:  # the key function fails again, loudly, in pre_process
            return None
        if key is None:
            return None
        setattr(content, self._ticket_attr, self.sequencer.issue(key))
        return content

    def finish_ticket(self, message: Any) -> None:
        """Mark the update's ticket done, whatever happened to it (called when its task ends)."""
        ticket = getattr(message, self._ticket_attr, None)
        if ticket is not None and self.sequencer is not None:
            delattr(message, self._ticket_attr)
            self.sequencer.finish(ticket)

    def post_process(self, message: Any, data: dict, exception: Optional[BaseException]) -> None:
        for frame in reversed(context.active_frames()):
            if frame.origin is self:
                frame.close(exception is None)
                return


def _release_leftovers(origin: Any = None) -> None:
    """Release scopes opened by middlewares (``origin``, or any) whose ``post_process`` never ran."""
    for frame in reversed(context.active_frames()):
        if frame.origin is not None and (origin is None or frame.origin is origin):
            logger.warning("session %r: post_process did not run (another middleware cancelled the "
                           "update or raised); released without saving", frame.handle.key)
            try:
                if frame.owner:
                    frame.handle.abandon()
            finally:
                context.remove(frame)


def install(sessions: Sessions[Any], bot: Any, *, ordered: bool = False) -> SessionMiddleware:
    """``Sessions.setup``: register the middleware and the end-of-task safety net on ``bot``.

    ``ordered=True`` also runs the updates of one key strictly in arrival order
    (``update_id`` order within a batch); other keys still run in parallel.
    """
    if not getattr(bot, "use_class_middlewares", False):
        raise ValueError("sessions.setup(bot) needs a bot made with use_class_middlewares=True "
                         "(telebot.TeleBot(TOKEN, use_class_middlewares=True)); or decorate each "
                         "handler with @sessions.with_session instead")
    run = getattr(bot, "_run_middlewares_and_handler", None)
    if run is None:
        if ordered:
            raise ValueError("ordered=True needs telebot's _run_middlewares_and_handler, which this "
                             "telebot version lacks")
        logger.warning("telebot has no _run_middlewares_and_handler: a cancelled update keeps its "
                       "session lock until the same worker thread handles another update")
    middleware = SessionMiddleware(sessions, ordered=ordered)
    bot.setup_middleware(middleware)
    ours: List[SessionMiddleware] = bot.__dict__.setdefault("_telesession_middlewares", [])
    ours.append(middleware)
    if run is not None and not getattr(run, "_telesession_guard", False):
        def guarded(message: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return run(message, *args, **kwargs)
            finally:
                try:
                    if context.active_frames():
                        _release_leftovers()
                finally:
                    for mw in ours:
                        mw.finish_ticket(message)

        guarded._telesession_guard = True  # type: ignore[attr-defined]
        bot._run_middlewares_and_handler = guarded
    if ordered:
        _sequence_dispatch(bot, ours)
    return middleware


def _sequence_dispatch(bot: Any, ours: List[SessionMiddleware]) -> None:
    """Dispatch updates one by one in ``update_id`` order, issuing tickets as they are queued.

    telebot queues a batch grouped by update type; dispatching one update at a time
    makes the worker queue's order the tickets' order, so the earliest waiting
    ticket is always taken by a worker first and no worker waits on an update
    queued behind it.  One dispatcher at a time keeps that true across threads.
    An update telebot does not queue through the middlewares (a next-step handler
    takes it) has its ticket finished as soon as it is dispatched.
    """
    dispatch = bot.process_new_updates
    if getattr(dispatch, "_telesession_guard", False):
        return
    mutex = threading.RLock()
    queued: Set[int] = set()  # ids of contents queued through the middleware chain, per update
    exec_task = bot._exec_task

    def watch_exec_task(task: Any, *args: Any, **kwargs: Any) -> Any:
        if args and getattr(task, "_telesession_guard", False):
            queued.add(id(args[0]))
        return exec_task(task, *args, **kwargs)

    def process_new_updates(updates: List[Any]) -> None:
        with mutex:
            for update in sorted(updates, key=lambda u: getattr(u, "update_id", 0) or 0):
                ticketed = [(mw, c) for mw in ours if mw.sequencer is not None
                            for c in (mw.issue_ticket(update),) if c is not None]
                queued.clear()
                try:
                    dispatch([update])
                finally:
                    # telebot handed it past the middlewares (a next-step handler took it),
                    # dropped it, or raised before queueing it: its task will never finish
                    # the ticket, and later updates of the key would wait for lock_timeout.
                    for mw, content in ticketed:
                        if id(content) not in queued:
                            mw.finish_ticket(content)

    process_new_updates._telesession_guard = True  # type: ignore[attr-defined]
    bot._exec_task = watch_exec_task
    bot.process_new_updates = process_new_updates
