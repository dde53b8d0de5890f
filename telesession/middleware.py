"""The telebot integration: ``SessionMiddleware`` and what ``sessions.setup(bot)`` installs around it.

``pre_process`` enters the manager's scope (lock, load, bind) and
``post_process`` leaves it (save if changed, unbind, unlock): the decorator's
code path as a class middleware.  ``install`` also wraps, on the bot instance:

- ``process_new_updates``: before telebot dispatches a batch (grouped by update
  type), every update takes its place on its keys' queues in ``update_id`` order;
- ``_exec_task``, through which telebot hands every update's task to its workers:
  a task whose key is busy is parked (``telesession.scheduling``) instead of
  taking a worker, and scopes a middleware opened but never closed (a later
  middleware cancelled the update) are released when the task ends;
  next-step steps and reply callbacks (which telebot runs without middlewares)
  get the chat's session there and queue like any other update;
- ``_handle_exception``: a session-layer failure inside a handler (a lazy load
  that timed out) goes to ``on_error``, not to telebot's ``exception_handler``.

When the session layer cannot serve an update, ``on_error(update, exc)`` is
called and the handler is not run (or its result is not saved); nothing of it
reaches telebot's polling loop.
"""
import logging
import threading
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from . import context
from .chat_moves import follow_migration
from .context import HandleProxy
from .errors import BacklogFull, LockTimeout, SerializationError, SessionError, StoreError
from .manager import open_for
from .scheduling import DEFAULT_MAX_PENDING, Job, KeyScheduler

__all__ = ["SessionMiddleware", "install", "log_error", "SESSION_FAILURES", "UPDATE_TYPES"]

logger = logging.getLogger("telesession")

try:
    from telebot.handler_backends import BaseMiddleware, CancelUpdate
    from telebot.util import update_types as _TELEBOT_UPDATE_TYPES
except ImportError:  # pragma: no cover - telebot is a dependency; keep import errors readable
    BaseMiddleware = object  # type: ignore[assignment,misc]
    CancelUpdate = None  # type: ignore[assignment,misc]
    _TELEBOT_UPDATE_TYPES = []

#: telebot names some update types differently when it hands them to middlewares and handlers
#: than in ``Update`` (``process_new_chosen_inline_query`` dispatches ``'chosen_inline_query'``).
_DISPATCH_NAMES = {"chosen_inline_result": "chosen_inline_query"}

#: Every update type a ``SessionMiddleware`` handles by default: ``Update`` fields and dispatch names.
UPDATE_TYPES: List[str] = list(dict.fromkeys(
    list(_TELEBOT_UPDATE_TYPES) + [_DISPATCH_NAMES.get(t, t) for t in _TELEBOT_UPDATE_TYPES]))

#: What ``on_error`` receives: the session layer could not serve an update.
SESSION_FAILURES: Tuple[Type[BaseException], ...] = (StoreError, SerializationError, LockTimeout, BacklogFull)

_REPORTED = "_telesession_reported"


def log_error(update: Any, exc: BaseException) -> None:
    """The default ``on_error``: one ERROR line on the ``telesession`` logger with the key and the place."""
    key = getattr(exc, "key", None)
    where = getattr(exc, "where", None)
    text = (getattr(exc, "message", None) or str(exc)).replace("\n", " ")
    context_ = "" if key is not None and repr(key) in text else f"session {key!r}: " if key is not None else ""
    if where and where not in text:
        text += f" ({where})"
    if not isinstance(exc, SessionError):
        context_ = "the key function failed: "
    logger.error("%s%s: %s; the update was not handled", context_, type(exc).__name__, text)


class SessionMiddleware(BaseMiddleware):  # type: ignore[misc,valid-type]
    """Opens the session of every update's key around its handlers; ``data[name]`` is the session.

    ``bypass(update)`` returning true gives that update a lazy session (loaded on first
    use) and, under ``setup(bot)``, lets it skip its key's queue.
    """

    update_sensitive = False

    def __init__(self, sessions: Any, update_types: Optional[list] = None,
                 bypass: Optional[Callable[[Any], bool]] = None) -> None:
        super().__init__()
        self.sessions = sessions
        self.update_types = list(update_types or UPDATE_TYPES)
        for field, name in _DISPATCH_NAMES.items():
            if field in self.update_types and name not in self.update_types:
                self.update_types.append(name)
        self.bypass = bypass
        self.installed = False  # set by install(): the bot's task wrapper releases leftovers
        self.scheduler: Optional[KeyScheduler] = None  # set by install(): the job running knows our key
        self.alone = (self,)  # the owners of an update only this middleware queues

    # -- telebot's hooks ----------------------------------------------------------------

    def pre_process(self, message: Any, data: dict) -> Any:
        if not self.installed and context.active_frames():
            _release_leftovers((), (self,), quiet=False)
        handle = self.enter(message)
        if handle is None:
            return CancelUpdate()
        sessions = self.sessions
        data[sessions.name] = HandleProxy(handle) if sessions.dataclass is None else sessions._proxy_for(handle)
        return None

    def post_process(self, message: Any, data: dict, exception: Optional[BaseException]) -> None:
        self.leave(message, exception)

    # -- the scope, for middleware tasks and next-step steps -------------------------------

    def enter(self, update: Any) -> Any:
        """Open the update's scope (lock, load, bind); its handle, or ``None`` after ``on_error``."""
        try:
            if getattr(update, "migrate_to_chat_id", None) or getattr(update, "migrate_from_chat_id", None):
                follow_migration(self.sessions, update)  # a group became a supergroup: move its sessions
            key = self._queued_key(update)
            lazy = True if self.bypass is not None and self.bypass(update) else None
            return open_for(self.sessions, key, self, lazy)
        except Exception as exc:  # the session layer (or the key function) cannot serve this update
            self.report(update, exc)
            return None

    def _queued_key(self, update: Any) -> Optional[str]:
        """The key this update was queued under (computed once, when it was dispatched), else ``key_of``."""
        scheduler = self.scheduler
        if scheduler is not None:
            job = scheduler.current()
            if job is not None and job.content is update:
                if job.owners is self.alone:
                    return job.keys[0]
                for key, mw in zip(job.keys, job.owners):
                    if mw is self:
                        return key
        return self.sessions.key_of(update)

    def leave(self, update: Any, exception: Optional[BaseException]) -> None:
        """Close the scope ``enter`` opened: save if the handler succeeded, unbind, unlock."""
        bound = context._stack
        stack = bound.get()
        if len(stack) == 1 and stack[0].origin is self and stack[0].owner:  # the usual case, in fewer calls
            try:
                stack[0].close(exception is None)  # (the owner's frame is its handle)
            except Exception as exc:  # the save failed: nothing was written
                self.report(update, exc)
            finally:
                if bound.get() is stack:
                    bound.set(())
                else:
                    context.remove(stack[0])
        else:
            for frame in reversed(stack):
                if frame.origin is self:
                    try:
                        frame.leave(exception is None)
                    except Exception as exc:  # the save failed: nothing was written
                        self.report(update, exc)
                    break
        if exception is not None and isinstance(exception, SESSION_FAILURES):  # a lazy load inside the handler failed
            self.report(update, exception)

    def report(self, update: Any, exc: BaseException) -> None:
        """Hand a failure to ``on_error`` once; an ``on_error`` that raises is logged, never propagated."""
        if getattr(exc, _REPORTED, False):
            return
        try:
            setattr(exc, _REPORTED, True)
        except Exception:  # pragma: no cover - exceptions normally take attributes
            pass
        handler = self.sessions.on_error or log_error
        try:
            handler(update, exc)
        except Exception:
            logger.exception("on_error of the manager %r raised", self.sessions.name)


def _release_leftovers(before: Tuple[Any, ...], origins: Sequence[Any], quiet: bool = True,
                       update: Any = None) -> None:
    """Release scopes opened by our middlewares since ``before`` whose ``post_process`` never ran."""
    for frame in reversed(context.active_frames()):
        if frame.origin is None or frame.origin not in origins or any(frame is f for f in before):
            continue
        (logger.debug if quiet else logger.warning)(
            "session %r: the update was cancelled or failed before post_process; released without saving",
            frame.handle.key)
        try:
            if frame.owner:
                frame.handle.abandon()
        except Exception as exc:  # e.g. the store is down: report it, and release the other frames too
            report = getattr(frame.origin, "report", None)
            if report is not None:
                report(update, exc)
            else:
                logger.error("session %r could not be released: %s", frame.handle.key, exc)
        finally:
            context.remove(frame)


class _Entry:
    """An update's reservation during one ``process_new_updates`` call."""

    __slots__ = ("content", "keys", "job", "owners")

    def __init__(self, content: Any, keys: Tuple[str, ...], job: Optional[Job],
                 owners: Tuple[SessionMiddleware, ...]) -> None:
        self.content = content
        self.keys = keys
        self.job = job  # None: a backlog was full, the update is dropped
        self.owners = owners  # the middleware of each key


class BotScheduling:
    """What ``install`` puts on one bot: its middlewares, its scheduler and the wrapped dispatch."""

    def __init__(self, bot: Any, max_pending: int) -> None:
        self.bot = bot
        self.middlewares: List[SessionMiddleware] = []
        self._exec_task = bot._exec_task
        pool = getattr(bot, "worker_pool", None)
        self.scheduler = KeyScheduler(self._exec_task, lambda: not bot.threaded, max_pending,
                                      workers=max(len(getattr(pool, "workers", ())), 1))
        self._entries: Dict[int, _Entry] = {}
        self._pending = threading.local()  # threaded bots: the tasks of the batch being dispatched
        self._process_new_updates = bot.process_new_updates
        self._handle_exception = bot._handle_exception
        self._run_func = getattr(type(bot)._run_middlewares_and_handler, "__func__",
                                 type(bot)._run_middlewares_and_handler)
        self._ours: Tuple[Any, List[SessionMiddleware]] = (None, [])
        #: ``partial(_guarded, task, kwargs)`` for the last (task, kwargs) telebot dispatched
        self._call: Tuple[Any, Any, Any] = (None, None, None)
        self._one_key: Dict[str, Tuple[str]] = {}
        bot.process_new_updates = self.process_new_updates
        bot._exec_task = self.exec_task
        bot._handle_exception = self.handle_exception

    # -- keys -------------------------------------------------------------------------

    def keys_of(self, content: Any, middlewares: Sequence[SessionMiddleware]
                ) -> Tuple[Tuple[str, ...], Tuple[SessionMiddleware, ...]]:
        """The queue keys of an update for these middlewares (none for bypassed updates), and
        the middleware of each key."""
        if len(middlewares) == 1 and middlewares[0].bypass is None:
            mw = middlewares[0]
            try:
                key = mw.sessions.key_of(content)
            except Exception:  # pre_process meets it again and reports it to on_error
                return (), ()
            return ((key,), mw.alone) if key is not None else ((), ())
        owners: Dict[str, SessionMiddleware] = {}
        for mw in middlewares:
            try:
                if mw.bypass is not None and mw.bypass(content):
                    continue
                key = mw.sessions.key_of(content)
            except Exception:  # pre_process meets it again and reports it to on_error
                continue
            if key is not None and key not in owners:
                owners[key] = mw
        return tuple(owners), tuple(owners.values())

    def _for_type(self, update_type: str) -> List[SessionMiddleware]:
        return [mw for mw in self.middlewares if update_type in mw.update_types]

    # -- telebot's entry points ----------------------------------------------------------

    def process_new_updates(self, updates: List[Any]) -> None:
        """telebot's ``process_new_updates``, after every update took its place in its keys' queues."""
        mine: List[int] = []
        try:
            if self._plain_messages(updates):
                batch = []  # telebot dispatches it in arrival order anyway
            else:
                batch = [(u, *_content_of(u)) for u in updates]
                if not self._needs_reservations(batch):
                    batch = []
            for update, content, update_type in sorted(batch, key=lambda b: getattr(b[0], "update_id", 0) or 0):
                if content is None:
                    continue
                keys, owners = self.keys_of(content, self._for_type(update_type))
                if not keys:
                    continue
                job = self.scheduler.reserve(keys, content, owners)
                entry = _Entry(content, keys, job, owners)
                self._entries[id(content)] = entry
                mine.append(id(content))
                if job is None:
                    self._backlog_full(entry)
            collect = self.bot.threaded and self._pending.__dict__.get("items") is None
            if collect:
                self._pending.items = []
            try:
                self._process_new_updates(updates)
            finally:
                if collect:
                    items, self._pending.items = self._pending.items, None
                    if items:
                        self._submit_batch(items)
        finally:
            for ident in mine:
                left = self._entries.get(ident)
                if left is None:
                    continue
                del self._entries[ident]
                if left.job is not None:
                    self.scheduler.cancel(left.job)  # telebot never ran it: later updates move up

    def _submit_batch(self, jobs: List[Job]) -> None:
        """Hand a dispatched batch's jobs to the scheduler; all are queued before any starts."""
        for job in self.scheduler.submit_jobs(jobs):
            self._backlog_full(_Entry(job.content, job.keys, None, job.owners))

    def _plain_messages(self, updates: List[Any]) -> bool:
        """The common batch, checked cheaply: only messages, no next-step or reply handler registered."""
        for backend in (getattr(self.bot, "next_step_backend", None), getattr(self.bot, "reply_backend", None)):
            if backend is not None and getattr(backend, "handlers", True):
                return False
        for update in updates:
            if update.message is None:
                return False
        return True

    def _needs_reservations(self, batch: List[Tuple[Any, Any, str]]) -> bool:
        """Whether telebot could run this batch's tasks out of arrival order.

        It groups a batch by update type, and hands messages to next-step and reply
        handlers before the others; a batch of one type with neither registered is
        dispatched in order, and needs no reservations.
        """
        types = {update_type for _, content, update_type in batch if content is not None}
        if len(types) > 1:
            return True
        if types == {"message"}:
            for backend in (getattr(self.bot, "next_step_backend", None), getattr(self.bot, "reply_backend", None)):
                if backend is not None and getattr(backend, "handlers", True):
                    return True
        return False

    def exec_task(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        """telebot's ``_exec_task``: update tasks go through their keys' queues; others pass.

        telebot calls it for middleware tasks (``_run_middlewares_and_handler``), for
        next-step steps and reply callbacks (``callback(message, ...)``), and for update
        listeners (``listener(messages)``, passed through).
        """
        inner = getattr(task, "__wrapped__", task)  # (a wrapper such as the testing IdleTracker's)
        if getattr(inner, "__func__", None) is self._run_func and getattr(inner, "__self__", None) is self.bot:
            content = args[0]
            given = kwargs.get("middlewares")
            cached = self._ours
            if cached[0] is not given:  # telebot passes one list for a whole batch of a type
                cached = self._ours = (given, [mw for mw in (given or ()) if mw in self.middlewares])
            middlewares = cached[1]
            if not self._entries and len(middlewares) == 1 and middlewares[0].bypass is None:
                mw = middlewares[0]  # the common case, kept short
                try:
                    key = mw.sessions.key_of(content)
                except Exception:  # pre_process meets it again and reports it to on_error
                    key = None
                call = self._call
                if call[0] != task or call[1] != kwargs:  # one per batch of a type: telebot's kwargs repeat
                    call = self._call = (task, kwargs, partial(self._guarded, task, kwargs))
                if key is None:
                    return self._exec_task(call[2], *args)
                one = self._one_key
                key_tuple = one.get(key)
                if key_tuple is None:  # a job holds its keys while it waits: one tuple per recent key
                    if len(one) >= 4096:
                        one.clear()
                    key_tuple = one[key] = (key,)
                pending = self._pending.__dict__.get("items")
                if pending is not None:  # threaded, inside process_new_updates: submitted at its end
                    pending.append(Job(key_tuple, call[2], args, content, mw.alone))
                    if len(pending) >= 64:  # a big batch: let the workers start on its beginning
                        self._pending.items = []
                        self._submit_batch(pending)
                    return None
                if not getattr(self.bot, "threaded", True) and self.scheduler.run_inline(
                        key_tuple, call[2], args, content, mw.alone):
                    return None  # ran here: the key was free
            fn: Callable[..., Any] = self._guarded
            fargs: Tuple[Any, ...] = (task, kwargs, *args)
        elif args and hasattr(args[0], "chat") and hasattr(args[0], "message_id"):
            content = args[0]  # a next-step step or a reply callback: (message, *args)
            middlewares = self._for_type("message")
            fn, fargs = self._step, (middlewares, task, args, kwargs)
        else:
            return self._exec_task(task, *args, **kwargs)
        entry = self._entries.get(id(content)) if self._entries else None
        if entry is not None and entry.content is not content:
            entry = None
        if entry is not None:
            keys, job = entry.keys, entry.job
            if job is None:
                return None  # its backlog was full: on_error was told when it arrived
        else:
            keys, owners = self.keys_of(content, middlewares)
            job = None
        if not keys:
            return self._exec_task(fn, *fargs)
        if not self.bot.threaded and self.scheduler.held_here(keys):
            # a handler dispatching updates of its own key: run inline, re-entering its session
            if job is not None:
                self.scheduler.cancel(job)
            return self._exec_task(fn, *fargs)
        pending = self._pending.__dict__.get("items") if job is None else None
        if pending is not None:  # threaded, inside process_new_updates: submitted together at its end
            pending.append(Job(keys, fn, fargs, content, owners))
            if len(pending) >= 64:  # a big batch: let the workers start on its beginning
                self._pending.items = []
                self._submit_batch(pending)
            return None
        if not self.scheduler.submit(job, keys, fn, content, owners if entry is None else entry.owners, fargs):
            self._backlog_full(entry if entry is not None else _Entry(content, keys, None, owners))
        return None

    def handle_exception(self, exc: Exception) -> bool:
        """A session failure inside a handler goes to ``on_error`` (in ``post_process``), not to telebot."""
        if isinstance(exc, SESSION_FAILURES) and any(
                f.origin in self.middlewares for f in context.active_frames()):
            return True
        return bool(self._handle_exception(exc))

    # -- tasks ------------------------------------------------------------------------

    def _guarded(self, task: Any, kwargs: Any, *args: Any) -> Any:
        """Run a middleware task; release what a cancelled update's middlewares left open."""
        stack = context._stack
        before = stack.get()
        try:
            return task(*args, **kwargs)
        finally:
            if stack.get() != before:
                _release_leftovers(before, self.middlewares, update=args[0] if args else None)

    def _step(self, middlewares: Sequence[SessionMiddleware], callback: Any, args: Any, kwargs: Any) -> Any:
        """A next-step step or reply callback inside the message's sessions (no middleware runs for it)."""
        message = args[0]
        opened: List[SessionMiddleware] = []
        try:
            for mw in middlewares:
                if mw.enter(message) is None:
                    return None  # on_error was told; the step is not run
                opened.append(mw)
            try:
                result = callback(*args, **kwargs)
            except SESSION_FAILURES as exc:
                for mw in reversed(opened):
                    mw.leave(message, exc)
                opened = []
                return None
            except BaseException as exc:
                for mw in reversed(opened):
                    mw.leave(message, exc)
                opened = []
                raise
            for mw in reversed(opened):
                mw.leave(message, None)
            opened = []
            return result
        finally:
            for mw in reversed(opened):  # an enter() failed after others succeeded
                mw.leave(message, RuntimeError("not run"))

    def _backlog_full(self, entry: _Entry) -> None:
        scheduler = self.scheduler
        for key, mw in zip(entry.keys, entry.owners):
            if scheduler.backlog(key) > scheduler.max_pending:
                mw.report(entry.content, BacklogFull(
                    f"session {key!r}: {scheduler.max_pending} updates are already waiting for this key; "
                    "this one was dropped", key, None))
                return
        key, mw = entry.keys[0], entry.owners[0]
        mw.report(entry.content, BacklogFull(
            f"session {key!r}: too many updates waiting for this key; this one was dropped", key, None))


#: Update fields, the common ones first (an update has exactly one).
_FIELDS = list(dict.fromkeys(["message", "callback_query", "edited_message", "inline_query"]
                             + list(_TELEBOT_UPDATE_TYPES)))


def _content_of(update: Any) -> Tuple[Any, str]:
    """The update's payload and the update type telebot dispatches it under."""
    message = getattr(update, "message", None)
    if message is not None:
        return message, "message"
    for field in _FIELDS:
        content = getattr(update, field, None)
        if content is not None:
            return content, _DISPATCH_NAMES.get(field, field)
    return None, ""


def _is_async_bot(bot: Any) -> bool:
    return any(cls.__name__ == "AsyncTeleBot" for cls in type(bot).__mro__)


def install(sessions: Any, bot: Any, *, ordered: Optional[bool] = None,
            bypass: Optional[Callable[[Any], bool]] = None,
            max_pending: int = DEFAULT_MAX_PENDING) -> SessionMiddleware:
    """``Sessions.setup``: register the middleware and per-key scheduling on ``bot``.

    ``ordered`` is accepted for compatibility: every key's updates run in arrival order.
    """
    if _is_async_bot(bot):
        raise TypeError("sessions.setup() got an AsyncTeleBot: telesession supports the blocking "
                        "telebot.TeleBot only, not the async bot")
    if not getattr(bot, "use_class_middlewares", False):
        raise ValueError("sessions.setup(bot) needs a bot made with use_class_middlewares=True "
                         "(telebot.TeleBot(TOKEN, use_class_middlewares=True)); or decorate each "
                         "handler with @sessions.with_session instead")
    for name in ("_exec_task", "_run_middlewares_and_handler", "_notify_next_handlers",
                 "_notify_reply_handlers", "_handle_exception"):
        if not hasattr(bot, name):
            raise ValueError(f"sessions.setup(bot) needs telebot's TeleBot.{name}, which this telebot "
                             "version lacks; use @sessions.with_session on each handler instead")
    if ordered is False:
        import warnings

        warnings.warn("setup(bot, ordered=False) is ignored: updates of one key always run in arrival "
                      "order, and no worker waits for a busy key; use bypass= for updates that must not wait",
                      DeprecationWarning, stacklevel=3)
    glue: Optional[BotScheduling] = bot.__dict__.get("_telesession")
    if glue is not None:
        for mw in glue.middlewares:
            if mw.sessions is sessions:
                raise ValueError(f"this manager ({sessions.name!r}) is already set up on this bot")
            if mw.sessions.name == sessions.name:
                raise ValueError(f"another manager named {sessions.name!r} is already set up on this bot: "
                                 "give each manager its own name= (it is the handler parameter and the "
                                 "namespace of its sessions)")
    middleware = SessionMiddleware(sessions, bypass=bypass)
    middleware.installed = True
    if glue is None:
        glue = BotScheduling(bot, max_pending)
        bot.__dict__["_telesession"] = glue
    else:
        glue.scheduler.max_pending = min(glue.scheduler.max_pending, max_pending)
    middleware.scheduler = glue.scheduler
    bot.setup_middleware(middleware)
    glue.middlewares.append(middleware)
    return middleware
