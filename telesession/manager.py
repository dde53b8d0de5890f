"""``Sessions``: load a key's session under its lock, bind it, save it if changed, unlock.

Everything that happens around a handler is one ``with`` block (``_Scope``):
the decorator, ``Sessions.open`` and the telebot middleware all go through it.

Concurrency contract: while a scope holds a key, no other thread, process or
machine (as far as the store reaches) holds that key; the same thread taking the
same key again re-enters the held session.  A session is written only when its
serialized form changed, never when the handler raised (unless
``save_on_error``), and the lock is released in every case.
"""
import dataclasses
import functools
import inspect
import logging
import time
from typing import Any, Callable, Dict, Generic, Mapping, Optional, TypeVar, Union, cast, overload

from . import context, keys
from .errors import CorruptSessionError, NoActiveSession
from .locking import current_pid
from .records import build_record, check_round_trip, encode_data, from_plain, read_record, to_plain
from .stores.base import Store

__all__ = ["Sessions", "configure", "default_sessions", "with_session"]

logger = logging.getLogger("telesession")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
ErrorHandler = Callable[[Any, BaseException], Any]

_UNLOADED, _LOADED, _CLOSED = 0, 1, 2


def _checked(key: str) -> str:
    """A key must be valid UTF-8 (no lone surrogates): every store can then hold it."""
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"session key {key!r} is not valid Unicode text (a lone surrogate)") from None
    return key


class _Handle:
    """The state of one opened session: its lock, the record it was loaded from, its value."""

    __slots__ = ("manager", "key", "store", "state", "token", "raw", "data", "baseline", "deleted", "pid")

    def __init__(self, manager: "Sessions[Any]", key: Optional[str]) -> None:
        self.manager = manager
        self.key = key
        self.store = manager.store
        self.state = _UNLOADED
        self.token: Any = None
        self.raw: Optional[bytes] = None
        self.data: Any = None
        self.baseline: Optional[str] = None
        self.deleted = False
        self.pid = current_pid()  # a forked child must not save or unlock its parent's session

    def value(self) -> Any:
        """The session object, loading it (under the lock) on first use."""
        if self.state == _LOADED:
            return self.data
        if self.state == _UNLOADED:
            if self.key is None:
                raise NoActiveSession(
                    f"this update has no session: {getattr(self.manager.key, '__name__', 'the key function')} "
                    f"found no chat or user in it; check for it before touching the session",
                    None)
            self.load()
            return self.data
        raise NoActiveSession(f"the session {self.key!r} was already closed", self.key)

    def where(self) -> str:
        return self.store.describe(cast(str, self.key))

    def load(self) -> None:
        """Lock the key and read its session (or start one from ``initial()``)."""
        m, key, store = self.manager, cast(str, self.key), self.store
        self.token = store.acquire(key, m.lock_timeout)
        try:
            raw = store.load_locked(key, self.token)
            self.raw = raw
            data = data_json = None
            if raw is not None:
                data, version, written, data_json = read_record(raw, key, self.where)
                if m.ttl is not None and written is not None and time.time() - written > m.ttl:
                    logger.debug("session %r expired (written %.0f s ago)", key, time.time() - written)
                    raw = None
            if raw is None:
                self.data = m.initial()
                self.baseline = encode_data(to_plain(self.data), key, self.where)
            elif version == m.version:
                self.data = data if m.dataclass is None else from_plain(m.dataclass, data, key, self.where)
                # Our own records carry the data's JSON verbatim: no need to encode it again.
                self.baseline = data_json or encode_data(to_plain(self.data), key, self.where)
            else:  # a migrated record is written back even if the handler changes nothing
                data = m._migrate(data, version, key, self.where)
                self.data = from_plain(m.dataclass, data, key, self.where)
                self.baseline = None
        except BaseException:
            store.release(key, self.token)
            self.state = _CLOSED
            raise
        self.state = _LOADED

    def delete(self) -> None:
        """Replace the session by a fresh one; the record is deleted when the scope closes."""
        self.value()
        m = self.manager
        self.data = m.initial()
        self.baseline = encode_data(to_plain(self.data), cast(str, self.key), self.where)
        self.deleted = True

    def close(self, success: bool) -> None:
        """Save if changed (and allowed), then release the lock, whatever happens."""
        if self.state != _LOADED or self.pid != current_pid():
            self.state = _CLOSED
            return
        key = cast(str, self.key)
        try:
            record = self._commit() if success or self.manager.save_on_error else None
        except BaseException:
            self.state = _CLOSED
            self.store.release(key, self.token)
            raise
        self.state = _CLOSED
        if record is None:
            self.store.release(key, self.token)
        else:  # one call: a store may write and unlock in one round trip
            self.store.save_and_release(key, record, previous=self.raw, ttl=self.manager.ttl, token=self.token)

    def abandon(self) -> None:
        """Release the lock without saving (the handler's outcome is unknown)."""
        if self.state == _LOADED and self.pid == current_pid():
            self.state = _CLOSED
            self.store.release(cast(str, self.key), self.token)
        self.state = _CLOSED

    def _commit(self) -> Optional[bytes]:
        """The record to save, or ``None`` when nothing changed (a dropped session is deleted here)."""
        m, key = self.manager, cast(str, self.key)
        plain = self.data if m.dataclass is None else to_plain(self.data)
        text = encode_data(plain, key, self.where)
        if text == self.baseline:
            if self.deleted and self.raw is not None:
                self.store.delete(key, previous=self.raw)
            return None
        check_round_trip(plain, text, key, self.where)
        return build_record(key, text, m.version, time.time())


class _Frame:
    """One entry of the thread's session stack: a handle seen through one manager."""

    __slots__ = ("manager", "handle", "origin", "owner")

    def __init__(self, manager: "Sessions[Any]", handle: _Handle, origin: Any, owner: bool) -> None:
        self.manager = manager
        self.handle = handle
        self.origin = origin  # the middleware that opened it, or None
        self.owner = owner  # False when it re-entered a session an outer scope holds

    def close(self, success: bool) -> None:
        """Leave the scope: save (if it owns the session and may), unlock, unbind."""
        try:
            if self.owner:
                self.handle.close(success)
        finally:
            context.remove(self)


class _Scope:
    """The one code path: lock, load, bind, run the body, save if changed, unbind, unlock."""

    __slots__ = ("manager", "key", "origin", "frame", "owner", "lazy")

    def __init__(self, manager: "Sessions[Any]", key: Optional[str], origin: Any = None,
                 lazy: Optional[bool] = None) -> None:
        self.manager = manager
        self.key = key
        self.origin = origin
        self.frame: Optional[_Frame] = None
        self.owner = False
        self.lazy = manager.lazy if lazy is None else lazy  # the middleware's bypass makes a scope lazy

    def __enter__(self) -> Any:
        return self.manager._proxy_for(self.enter())

    def enter(self) -> _Handle:
        """Lock, load and bind; the handle of the (possibly re-entered) session."""
        m, key = self.manager, self.key
        handle = None
        if key is not None:
            location = m.store.location
            for frame in reversed(context.active_frames()):
                other = frame.handle
                if other.key == key and other.state != _CLOSED and (
                        other.store is m.store or other.store.location == location):
                    handle = other  # re-entered: same session object, the outer scope saves it
                    break
        self.owner = handle is None
        if handle is None:
            handle = _Handle(m, key)
            if key is not None and not self.lazy:
                handle.load()
        self.frame = _Frame(m, handle, self.origin, self.owner)
        context.push(self.frame)
        return handle

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        cast(_Frame, self.frame).close(exc_type is None)


def _refuse_coroutine(func: Any) -> None:
    """Async handlers would run after the scope closed: refuse them at decoration time."""
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):
        raise TypeError(f"with_session cannot decorate the coroutine function {getattr(func, '__qualname__', func)!r}: "
                        "telesession supports the blocking telebot.TeleBot, not AsyncTeleBot or async handlers")


def _run(manager: "Sessions[Any]", func: Callable[..., Any], update: Any, args: Any, kwargs: Any) -> Any:
    """The decorators' body: ``with scope: return func(...)`` without building a proxy nobody uses."""
    scope = _Scope(manager, manager.key_of(update))
    scope.enter()
    try:
        result = func(update, *args, **kwargs)
    except BaseException as exc:
        scope.__exit__(type(exc), exc, exc.__traceback__)
        raise
    scope.__exit__(None, None, None)
    return result


class Sessions(Generic[T]):
    """A session manager: where sessions live, what a new one holds, and how updates map to keys.

    ``store`` is a ``Store`` or a store URL (``"sqlite:bot.db"``).  ``initial`` is a
    factory called for every new session (a dataclass makes typed sessions).
    ``key`` maps the handler's first argument to a session key (``None``: no
    session).  ``name`` is the parameter name under which the middleware hands the
    session to handlers.  ``on_error(update, exc)`` is what the middleware does when
    the session layer cannot serve an update (default: one ERROR log line; see
    docs/errors.md).  See the README for ``ttl``, ``version``/``migrations`` and ``lazy``.
    """

    @overload
    def __init__(self: "Sessions[Dict[str, Any]]", store: Union[Store, str, None] = None, *,
                 key: keys.KeyFunc = ..., name: str = ..., lock_timeout: float = ...,
                 save_on_error: bool = ..., ttl: Optional[float] = ..., version: int = ...,
                 migrations: Optional[Mapping[int, Callable[[Any], Any]]] = ..., lazy: bool = ...,
                 on_error: Optional[ErrorHandler] = ...) -> None: ...

    @overload
    def __init__(self, store: Union[Store, str, None] = None, *, initial: Callable[[], T],
                 key: keys.KeyFunc = ..., name: str = ..., lock_timeout: float = ...,
                 save_on_error: bool = ..., ttl: Optional[float] = ..., version: int = ...,
                 migrations: Optional[Mapping[int, Callable[[Any], Any]]] = ..., lazy: bool = ...,
                 on_error: Optional[ErrorHandler] = ...) -> None: ...

    def __init__(self, store: Union[Store, str, None] = None, *, initial: Callable[[], Any] = dict,
                 key: keys.KeyFunc = keys.by_chat, name: str = "session", lock_timeout: float = 30.0,
                 save_on_error: bool = False, ttl: Optional[float] = None, version: int = 0,
                 migrations: Optional[Mapping[int, Callable[[Any], Any]]] = None,
                 lazy: bool = False, on_error: Optional[ErrorHandler] = None) -> None:
        if store is None:
            from .stores.memory import MemoryStore

            store = MemoryStore()
        elif isinstance(store, str):
            from .stores.url import from_url

            store = from_url(store)
        if not isinstance(store, Store):
            raise TypeError(f"store must be a telesession Store or a store URL, not {type(store).__name__}")
        if not callable(initial):
            raise TypeError("initial must be a factory (a callable such as dict or a dataclass), "
                            f"not a {type(initial).__name__}: sessions must not share one object")
        if not callable(key):
            raise TypeError(f"key must be a callable from the update to a str, not {type(key).__name__}")
        if lock_timeout is None or lock_timeout < 0:
            raise ValueError("lock_timeout must be a number of seconds >= 0")
        if on_error is not None and not callable(on_error):
            raise TypeError(f"on_error must be a callable (update, exc) or None, not {type(on_error).__name__}")
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be a positive number of seconds, or None")
        migrations = dict(migrations or {})
        missing = [v for v in range(1, version + 1) if v not in migrations]
        if version < 0 or (version and missing):
            raise ValueError(f"version={version} needs migrations for versions {missing}: "
                             "migrations[v](data) returns the data of version v")
        self.store: Store = store
        self.initial: Callable[[], T] = initial
        self.dataclass: Optional[type] = (initial if isinstance(initial, type)
                                          and dataclasses.is_dataclass(initial) else None)
        self.key = key
        self.name = name
        self.lock_timeout = float(lock_timeout)
        self.save_on_error = save_on_error
        self.ttl = ttl
        self.version = version
        self.migrations: Dict[int, Callable[[Any], Any]] = migrations
        self.lazy = lazy
        #: Called by the middleware as ``on_error(update, exc)`` when the session layer cannot serve
        #: an update; ``None`` logs one ERROR line on the ``telesession`` logger.
        self.on_error: Optional[ErrorHandler] = on_error
        self._current = context.SessionProxy(self._current_value, self._delete_current)

    # -- the public surface ---------------------------------------------------------

    @property
    def current(self) -> T:
        """This manager's innermost active session (a proxy; ``NoActiveSession`` outside one)."""
        return cast(T, self._current)

    def with_session(self, func: F) -> F:
        """Decorate a handler: its first argument's session is loaded, bound and saved around it."""
        _refuse_coroutine(func)

        @functools.wraps(func)
        def wrapper(update: Any, *args: Any, **kwargs: Any) -> Any:
            return _run(self, func, update, args, kwargs)

        return cast(F, wrapper)

    def open(self, key: str) -> "_Scope":
        """``with sessions.open("123") as s:`` — a session outside handlers, same locking and saving."""
        if not isinstance(key, str):
            raise TypeError(f"a session key is a str, not {type(key).__name__} ({key!r})")
        return _Scope(self, _checked(key))

    def setup(self, bot: Any, **options: Any) -> Any:
        """Install a ``SessionMiddleware`` and per-key scheduling on ``bot`` (a ``TeleBot(use_class_middlewares=True)``).

        Options: ``bypass`` (a predicate: updates that skip their key's queue, with a lazy
        session), ``max_pending`` (updates one key may have parked, default 1000);
        ``ordered`` is accepted for compatibility (per-key order is always on).
        See docs/scheduling.md.
        """
        from .middleware import install

        return install(self, bot, **options)

    def _scope(self, key: Optional[str], origin: Any = None, lazy: Optional[bool] = None) -> "_Scope":
        """The scope of ``key`` (``None``: no session) opened by ``origin`` (a middleware)."""
        return _Scope(self, key, origin, lazy)

    def key_of(self, update: Any) -> Optional[str]:
        """The session key of an update, checked to be a ``str`` or ``None``."""
        key = self.key(update)
        if key is None:
            return key
        if type(key) is str:
            return key if key.isascii() else _checked(key)
        if isinstance(key, str):
            return _checked(str(key))
        raise TypeError(f"the key function {getattr(self.key, '__name__', self.key)!r} returned "
                        f"{key!r} ({type(key).__name__}); it must return a str or None")

    # -- internals ------------------------------------------------------------------

    def _frame(self) -> _Frame:
        for frame in reversed(context.active_frames()):
            if frame.manager is self:
                return cast(_Frame, frame)
        raise NoActiveSession(f"no session of the manager {self.name!r} is active: " + context.UNBOUND)

    def _current_value(self) -> Any:
        return self._frame().handle.value()

    def _delete_current(self) -> None:
        self._frame().handle.delete()

    def _proxy_for(self, handle: _Handle) -> Any:
        return context.SessionProxy(handle.value, handle.delete)

    def _migrate(self, data: Any, version: int, key: str, where: Callable[[], str]) -> Any:
        if version > self.version:
            raise CorruptSessionError(
                f"session {key!r} ({where()}) has version {version}, newer than this bot's "
                f"version {self.version}; it was left untouched", key, where())
        for v in range(version + 1, self.version + 1):
            try:
                data = self.migrations[v](data)
            except Exception as exc:
                raise CorruptSessionError(
                    f"session {key!r} ({where()}): migrations[{v}] failed: {type(exc).__name__}: {exc}",
                    key, where()) from exc
        return data

    def __repr__(self) -> str:
        return f"Sessions(store={self.store!r}, name={self.name!r})"


_default: Optional[Sessions[Any]] = None


def default_sessions() -> Sessions[Any]:
    """The manager behind the module-level ``with_session``: a ``MemoryStore`` until ``configure``."""
    global _default
    if _default is None:
        _default = Sessions()
    return _default


def configure(**options: Any) -> Sessions[Any]:
    """(Re)create the default manager with ``Sessions(**options)`` and return it."""
    global _default
    _default = Sessions(**options)
    return _default


def with_session(func: F) -> F:
    """``Sessions.with_session`` of the default manager, looked up at call time (after ``configure``)."""
    _refuse_coroutine(func)

    @functools.wraps(func)
    def wrapper(update: Any, *args: Any, **kwargs: Any) -> Any:
        return _run(default_sessions(), func, update, args, kwargs)

    return cast(F, wrapper)
