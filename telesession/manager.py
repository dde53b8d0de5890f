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
import threading
import time
import weakref
from typing import (Any, Callable, Dict, Generic, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union,
                    cast, overload)

from msgspec import DecodeError

from . import context, keys, locking
from .errors import CorruptSessionError, NoActiveSession
from .locking import current_pid
from .records import (NOT_READ, RECORD_ENCODED, _decode_record, _msgspec_decode as _decode,
                      _msgspec_encode as _encode, build_record, encode_json, read_record)
from .stores.base import Store
from .typed import adopt, check_typed, encode_typed, from_plain, reset_in_place

__all__ = ["Sessions", "configure", "default_sessions", "with_session"]

logger = logging.getLogger("telesession")

T = TypeVar("T")
D = TypeVar("D")
F = TypeVar("F", bound=Callable[..., Any])
ErrorHandler = Callable[[Any, BaseException], Any]

_UNLOADED, _LOADED, _CLOSED = 0, context.LOADED, 2


def _checked(key: str) -> str:
    """A key must be valid UTF-8 (no lone surrogates): every store can then hold it."""
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"session key {key!r} is not valid Unicode text (a lone surrogate)") from None
    return key


class _Handle:
    """The state of one opened session: its lock, the record it was loaded from, its value.

    It is also the session's frame on the thread's stack (``context``): the scope that
    opened it owns it.  A scope that re-enters it pushes a ``_Frame`` instead.
    """

    __slots__ = ("manager", "key", "store", "state", "token", "raw", "data", "baseline", "deleted", "pid",
                 "dropped", "origin")

    owner = True  # (as a frame) this scope saves and unlocks the session

    # Set by load(), and read only once state is _LOADED (not set here: one step less per update).
    token: Any
    raw: Optional[bytes]
    data: Any
    baseline: Optional[bytes]  # the session's JSON as loaded: change detection

    def __init__(self, manager: "Sessions[Any]", key: Optional[str], origin: Any = None) -> None:
        self.manager = manager
        self.key = key
        self.origin = origin  # (as a frame) the middleware that opened it, or None
        self.store = manager.store
        self.state = _UNLOADED
        self.deleted = False
        self.dropped: Sequence[str] = ()  # stored fields the dataclass no longer has
        # (current_pid() without the call) a forked child must not save or unlock its parent's session
        self.pid = locking._pid

    @property
    def handle(self) -> "_Handle":
        """(As a frame) the session it stands for: itself."""
        return self

    def leave(self, success: bool) -> None:
        """(As a frame) leave the scope: save if changed (and allowed), unlock, unbind."""
        try:
            self.close(success)
        finally:
            context.remove(self)

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
        m, key, store = self.manager, self.key, self.store
        assert key is not None
        self.token, raw = store.acquire_and_load(key, m.lock_timeout)
        self.raw = raw
        try:
            data = None
            if raw is not None:
                try:  # read_record's fast path, inlined: one msgspec decode of the whole record
                    record = _decode_record(raw)
                    data, version, written = record.data, record.version, record.written
                except (*NOT_READ, RecursionError):
                    data, version, written, _ = read_record(raw, key, self.where)
                if m.ttl is not None and written is not None and time.time() - written > m.ttl:
                    logger.debug("session %r expired (written %.0f s ago)", key, time.time() - written)
                    raw = None
            if raw is None:
                self.data = m._fresh()
                self.baseline = m._encode(self.data, key, self.where)
            elif m.dataclass is None:
                if version == m.version:
                    self.data = data
                    try:  # the baseline for change detection: the data as it was read, encoded again
                        self.baseline = _encode(data)
                    except UnicodeEncodeError:  # a lone surrogate: as the json module wrote it
                        self.baseline = encode_json(data, key, self.where)
                else:  # a migrated record is written back even if the handler changes nothing
                    self.data = m._migrate(data, version, key, self.where)
                    self.baseline = None
            else:
                migrated = version != m.version
                if migrated:
                    data = m._migrate(data, version, key, self.where)
                self.data, self.dropped = from_plain(m.dataclass, data, key, self.where)
                self.baseline = None if migrated else encode_typed(self.data, key, self.where)
        except BaseException:
            store.release(key, self.token)
            self.state = _CLOSED
            raise
        self.state = _LOADED

    def delete(self) -> None:
        """Replace the session by a fresh one; the record is deleted when the scope closes.

        A typed session is reset in place, so the instance a handler holds stays the session.
        """
        self.value()
        m = self.manager
        fresh = m._fresh()
        if m.dataclass is None:
            self.data = fresh
        else:
            reset_in_place(self.data, fresh)
        self.baseline = m._encode(fresh, cast(str, self.key), self.where)
        self.deleted = True
        self.dropped = ()

    def close(self, success: bool) -> None:
        """Save if changed (and allowed), then release the lock, whatever happens.

        The record is made here, in the one call the hot path pays for it: the session
        encoded, checked to read back equal (changed or not), compared with what was
        loaded; a dropped session's record is deleted instead.
        """
        if self.state != _LOADED or self.pid != locking._pid:
            self.state = _CLOSED
            return
        m = self.manager
        key: str = self.key  # type: ignore[assignment]  # (a loaded handle has a key; no cast() call here)
        record = None
        try:
            if success or m.save_on_error:
                if m.dataclass is None:  # encode_json and build_record, inlined for the usual case
                    plain = self.data
                    try:
                        text: bytes = _encode(plain)
                        if _decode(text) != plain:
                            raise ValueError
                    except (TypeError, ValueError, OverflowError, RecursionError, DecodeError):
                        text = encode_json(plain, key, self.where)  # raises SerializationError naming the path
                else:
                    text = encode_typed(self.data, key, self.where)
                    if text != self.baseline:
                        check_typed(self.data, text, m.dataclass, key, self.where)  # type: ignore[arg-type]
                        if self.dropped:
                            logger.info("session %r: dropped the stored fields %s, which %s no longer has",
                                        key, ", ".join(self.dropped), m.dataclass.__name__)
                if text != self.baseline:
                    try:
                        record = RECORD_ENCODED % (m.version, _encode(time.time()), _encode(key), text)
                    except UnicodeEncodeError:  # a key with a lone surrogate: as the json module writes it
                        record = build_record(key, text, m.version, time.time())
                elif self.deleted and self.raw is not None:
                    self.store.delete(key, previous=self.raw)
        except BaseException:
            self.state = _CLOSED
            self.store.release(key, self.token)
            raise
        self.state = _CLOSED
        if record is None:
            self.store.release(key, self.token)
        else:  # one call: a store may write and unlock in one round trip
            self.store.save_and_release(key, record, previous=self.raw, ttl=m.ttl, token=self.token)

    def abandon(self) -> None:
        """Release the lock without saving (the handler's outcome is unknown)."""
        if self.state == _LOADED and self.pid == current_pid():
            self.state = _CLOSED
            self.store.release(cast(str, self.key), self.token)
        self.state = _CLOSED


class _Frame:
    """A stack entry of a scope that re-entered a session an outer scope holds (and saves),
    seen through ``manager``; it reads as the handle does (``state``, ``data``, ``value()``)."""

    __slots__ = ("manager", "handle", "origin")

    owner = False

    def __init__(self, manager: "Sessions[Any]", handle: _Handle, origin: Any) -> None:
        self.manager = manager
        self.handle = handle
        self.origin = origin  # the middleware that opened it, or None

    @property
    def state(self) -> int:
        return self.handle.state

    @property
    def data(self) -> Any:
        return self.handle.data

    def value(self) -> Any:
        return self.handle.value()

    def leave(self, success: bool) -> None:
        """Leave the scope: unbind only (the outer scope saves and unlocks)."""
        context.remove(self)


class _Scope(Generic[T]):
    """The one code path: lock, load, bind, run the body, save if changed, unbind, unlock.

    ``key`` is the manager's key (``"123"``); the scope works on its stored key
    (``manager._stored_key(key)``, e.g. ``"session:123"``).
    """

    __slots__ = ("manager", "key", "origin", "frame", "lazy")

    def __init__(self, manager: "Sessions[T]", key: Optional[str], origin: Any = None,
                 lazy: Optional[bool] = None) -> None:
        self.manager = manager
        self.key = None if key is None else manager._stored_key(key)
        self.origin = origin
        self.frame: Union[_Handle, _Frame, None] = None
        self.lazy = manager.lazy if lazy is None else lazy  # the middleware's bypass makes a scope lazy

    def __enter__(self) -> T:
        return cast(T, self.manager._proxy_for(self.enter()))

    def enter(self) -> _Handle:
        """Lock, load and bind; the handle of the (possibly re-entered) session."""
        m, key = self.manager, self.key
        handle = None
        frames = context._stack.get()
        if key is not None and frames:  # (nothing to re-enter when no session is bound)
            location = m.store.location
            for frame in reversed(frames):
                other = frame.handle
                if other.key == key and other.state != _CLOSED and (
                        other.store is m.store or other.store.location == location):
                    handle = other  # re-entered: same session object, the outer scope saves it
                    break
        if handle is None:
            handle = frame = _Handle(m, key, self.origin)
            if key is not None and not self.lazy:
                handle.load()
        else:
            frame = _Frame(m, handle, self.origin)
        self.frame = frame
        if frames:
            context.push(frame)
        else:
            context._stack.set((frame,))
        return handle

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        cast(_Handle, self.frame).leave(exc_type is None)


def open_for(manager: "Sessions[Any]", key: Optional[str], origin: Any, lazy: Optional[bool]) -> _Handle:
    """``_Scope(manager, key, origin, lazy).enter()`` for a middleware, which closes the frame itself.

    With no session bound in this thread and an eager session, the same steps without
    the scope object and the search for an outer holder.
    """
    if key is None or lazy or manager.lazy or context._stack.get():
        return _Scope(manager, key, origin, lazy).enter()
    handle = _Handle(manager, manager._stored_key(key), origin)
    handle.load()
    context._stack.set((handle,))
    return handle


def _refuse_coroutine(func: Any) -> None:
    """Async handlers would run after the scope closed: refuse them at decoration time."""
    if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None)):
        raise TypeError(f"with_session cannot decorate the coroutine function {getattr(func, '__qualname__', func)!r}: "
                        "telesession supports the blocking telebot.TeleBot, not AsyncTeleBot or async handlers")


def _run(manager: "Sessions[Any]", func: Callable[..., Any], update: Any, *args: Any, **kwargs: Any) -> Any:
    """The decorators' body: ``with scope: return func(...)`` without building a proxy nobody uses.

    With no session active in this thread (nothing to re-enter), an eagerly loaded session
    skips the ``_Scope`` object and the search for an outer holder: the same steps, fewer calls.
    """
    key = manager.key(update)
    if type(key) is not str or not key.isascii():  # (key_of's checks, the usual case inlined)
        key = manager._checked_key(key)
    bound = context._stack
    if key is None or manager.lazy or bound.get():
        scope: _Scope[Any] = _Scope(manager, key)
        scope.enter()
        try:
            result = func(update, *args, **kwargs)
        except BaseException as exc:
            scope.__exit__(type(exc), exc, exc.__traceback__)
            raise
        scope.__exit__(None, None, None)
        return result
    handle = _Handle(manager, manager._namespace + key)  # (_stored_key, inlined)
    handle.load()
    stack = (handle,)
    bound.set(stack)
    try:
        result = func(update, *args, **kwargs) if args or kwargs else func(update)
    except BaseException:
        try:
            handle.close(False)
        finally:
            context.unbind_only(handle, stack)
        raise
    try:
        handle.close(True)
    finally:
        if bound.get() is stack:  # the handler left the stack as it found it (the usual case)
            bound.set(())
        else:
            context.remove(handle)
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
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, not {version!r}")
        # Only the migrations stored records still need: a record needing a missing one is refused on load.
        migrations = dict(migrations or {})
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name={name!r}: a manager's name is part of its stored keys "
                             f"(\"{{name}}:{{key}}\") and names the handler parameter that receives the "
                             f"session; use a Python identifier, such as 'session' or 'profile'")
        self.store: Store = store
        self.initial: Callable[[], T] = initial
        #: The session's dataclass (typed sessions), or ``None`` for dict sessions.
        self.dataclass: Optional[type] = _session_dataclass(initial)
        self.key = key
        self.name = name
        self.lock_timeout = float(lock_timeout)
        self.save_on_error = save_on_error
        self.ttl = ttl
        self.version = version
        self.migrations: Dict[int, Callable[[Any], Any]] = migrations
        self.lazy = lazy
        #: The bot this manager is bound to by ``setup``/``bind`` (its id), or ``None``.
        self.bot_id: Optional[int] = None
        self._namespace = f"{name}:"
        _watch_namespace(self)
        #: Called by the middleware as ``on_error(update, exc)`` when the session layer cannot serve
        #: an update; ``None`` logs one ERROR line on the ``telesession`` logger.
        self.on_error: Optional[ErrorHandler] = on_error
        self._current = context.SessionProxy(self._current_value, self._delete_current)

    # -- the public surface ---------------------------------------------------------

    @property
    def current(self) -> T:
        """This manager's innermost active session; ``NoActiveSession`` outside one.

        A dict session is a proxy (looked up on every use); a typed (dataclass) session
        is the instance itself, so read ``sessions.current`` inside the handler.
        """
        if self.dataclass is None:
            return cast(T, self._current)
        return cast(T, self._current_value())

    def delete_current(self) -> None:
        """Drop this manager's active session: its record is deleted when the handler returns,
        and the next update starts from ``initial()`` (a typed session is reset in place)."""
        self._delete_current()

    def with_session(self, func: F) -> F:
        """Decorate a handler: its first argument's session is loaded, bound and saved around it."""
        _refuse_coroutine(func)

        # A partial, not a nested function: calling it costs no Python frame of its own.
        # update_wrapper sets __wrapped__, so inspect.signature (telebot uses it) sees func's.
        wrapper = functools.update_wrapper(functools.partial(_run, self, func), func)
        return cast(F, wrapper)

    def open(self, key: str) -> "_Scope[T]":
        """``with sessions.open("123") as s:`` — a session outside handlers, same locking and saving."""
        if not isinstance(key, str):
            raise TypeError(f"a session key is a str, not {type(key).__name__} ({key!r})")
        return _Scope(self, _checked(key))

    def setup(self, bot: Any, **options: Any) -> Any:
        """Install a ``SessionMiddleware`` and per-key scheduling on ``bot`` (a
        ``TeleBot(use_class_middlewares=True)``), and bind this manager to the bot (``bind``):
        its keys are then stored per bot.

        Options: ``bypass`` (a predicate: updates that skip their key's queue, with a lazy
        session), ``max_pending`` (updates one key may have parked, default 1000);
        ``ordered`` is accepted for compatibility (per-key order is always on).
        See docs/scheduling.md.
        """
        from .middleware import install

        bot_id = bot_id_of(bot)
        self._check_bot(bot_id)
        middleware = install(self, bot, **options)
        self.bind(bot_id)
        return middleware

    def bind(self, bot: Any) -> None:
        """Store this manager's sessions under the bot's id: ``"{bot_id}:{name}:{key}"``.

        ``bot`` is a ``TeleBot``, its token, or its numeric id.  ``setup(bot)`` does it;
        call it yourself where a script reads or opens a bot's sessions without the bot
        running (``sessions.bind(123456)``).  The id is the number before ``:`` in the
        token, so it survives a token change.  A manager serves one bot.
        """
        bot_id = bot_id_of(bot)
        self._check_bot(bot_id)
        self.bot_id = bot_id
        self._namespace = f"{bot_id}:{self.name}:"
        _watch_namespace(self)

    def keys(self) -> Iterator[str]:
        """This manager's session keys (``"123"``, not the stored ``"session:123"``), streamed.

        No lock is taken; with ``ttl``, expired sessions are left out (their records are read).
        """
        ns = self._namespace
        n = len(ns)
        if self.ttl is None:
            for stored in self.store.keys(ns):
                if stored.startswith(ns):
                    yield stored[n:]
        else:
            for key, _ in self.items():
                yield key

    @overload
    def get(self, key: str) -> Optional[T]: ...

    @overload
    def get(self, key: str, default: D) -> Union[T, D]: ...

    def get(self, key: str, default: Any = None) -> Any:
        """A snapshot of ``key``'s session (a copy: changing it changes nothing), or ``default``.

        Read without the key's lock, as a handler would see it (migrated, decoded) but never
        written back; an absent or expired session gives ``default``.  A record that cannot be
        read raises ``CorruptSessionError``.
        """
        if not isinstance(key, str):
            raise TypeError(f"a session key is a str, not {type(key).__name__} ({key!r})")
        stored = self._stored_key(_checked(key))
        raw = self.store.load(stored)
        if raw is None:
            return default
        value = self._snapshot(stored, raw)
        return default if value is _EXPIRED else value

    def items(self, *, skip_corrupt: bool = False) -> Iterator[Tuple[str, T]]:
        """``(key, snapshot)`` of every session of this manager, streamed; see ``get``.

        ``skip_corrupt=True`` logs a WARNING for a record that cannot be read and goes on
        (for broadcasts); by default it raises ``CorruptSessionError``.
        """
        ns = self._namespace
        n = len(ns)
        for stored, raw in self.store.records(ns):
            if not stored.startswith(ns):
                continue
            try:
                value = self._snapshot(stored, raw)
            except CorruptSessionError as exc:
                if not skip_corrupt:
                    raise
                logger.warning("skipped session %r: %s", stored, exc)
                continue
            if value is not _EXPIRED:
                yield stored[n:], value

    def key_of(self, update: Any) -> Optional[str]:
        """The session key of an update, checked to be a ``str`` or ``None``."""
        return self._checked_key(self.key(update))

    def _checked_key(self, key: Any) -> Optional[str]:
        """What the key function returned, checked: a valid ``str``, or ``None``."""
        if key is None:
            return key
        if type(key) is str:
            return key if key.isascii() else _checked(key)
        if isinstance(key, str):
            return _checked(str(key))
        raise TypeError(f"the key function {getattr(self.key, '__name__', self.key)!r} returned "
                        f"{key!r} ({type(key).__name__}); it must return a str or None")

    # -- internals ------------------------------------------------------------------

    def _stored_key(self, key: str) -> str:
        """Where the session of ``key`` is stored: ``"{name}:{key}"``, or ``"{bot_id}:{name}:{key}"``
        once bound to a bot.  The one mapping from a manager's keys to a store's keys."""
        return self._namespace + key

    def _check_bot(self, bot_id: int) -> None:
        if self.bot_id is not None and self.bot_id != bot_id:
            raise ValueError(
                f"the manager {self.name!r} already serves the bot {self.bot_id}; make a second "
                f"Sessions(...) for the bot {bot_id} (their sessions are kept apart by bot id)")

    def _fresh(self) -> Any:
        """A new session from ``initial()`` (a typed one as its guarded class)."""
        value = self.initial()
        return value if self.dataclass is None else adopt(value, self.dataclass)

    def _encode(self, value: Any, key: str, where: Any) -> bytes:
        """The baseline/text of change detection: the session's JSON."""
        if self.dataclass is None:
            return encode_json(value, key, where)
        return encode_typed(value, key, where)

    def _snapshot(self, stored: str, raw: bytes) -> Any:
        """The session a record holds, decoded and migrated but never written back; ``_EXPIRED`` if so."""
        def where() -> str:
            return self.store.describe(stored)

        data, version, written, _ = read_record(raw, stored, where)
        if self.ttl is not None and written is not None and time.time() - written > self.ttl:
            return _EXPIRED
        if version != self.version:
            data = self._migrate(data, version, stored, where)
        if self.dataclass is None:
            return data
        return from_plain(self.dataclass, data, stored, where)[0]

    def _frame(self) -> Union[_Handle, _Frame]:
        for frame in reversed(context.active_frames()):
            if frame.manager is self:
                return cast(_Handle, frame)
        raise NoActiveSession(f"no session of the manager {self.name!r} is active: " + context.UNBOUND)

    def _current_value(self) -> Any:
        return self._frame().handle.value()

    def _delete_current(self) -> None:
        self._frame().handle.delete()

    def _proxy_for(self, handle: _Handle) -> Any:
        """What ``open()`` and the handler parameter get: a typed session itself (loaded now),
        a dict session (or a lazy one) as a proxy."""
        if self.dataclass is not None and not self.lazy and handle.key is not None:
            return handle.value()
        return context.HandleProxy(handle)

    def _migrate(self, data: Any, version: int, key: str, where: Callable[[], str]) -> Any:
        if version > self.version:
            raise CorruptSessionError(
                f"session {key!r} ({where()}) has version {version}, newer than this bot's "
                f"version {self.version}; it was left untouched", key, where())
        for v in range(version + 1, self.version + 1):
            migration = self.migrations.get(v)
            if migration is None:
                raise CorruptSessionError(
                    f"session {key!r} ({where()}) has version {version} and needs migrations[{v}] "
                    f"(to version {v}), which is missing; it was left untouched: add "
                    f"migrations={{{v}: ...}} to Sessions(...)", key, where())
            try:
                data = migration(data)
            except Exception as exc:
                raise CorruptSessionError(
                    f"session {key!r} ({where()}): migrations[{v}] failed: {type(exc).__name__}: {exc}",
                    key, where()) from exc
        return data

    def __repr__(self) -> str:
        return f"Sessions(store={self.store!r}, name={self.name!r})"


_EXPIRED = object()

# Live managers by (store location, namespace): two of them with different key functions
# share sessions wherever their keys are equal (a private chat's id is its user's id).
_namespaces: "weakref.WeakValueDictionary[Tuple[Any, str, int], Sessions[Any]]" = weakref.WeakValueDictionary()
_namespaces_mutex = threading.Lock()


def _watch_namespace(manager: "Sessions[Any]") -> None:
    """Warn once when another live manager stores under the same namespace with another key function."""
    try:
        location = manager.store.location
        hash(location)
    except Exception:  # a store without a usable location: nothing to compare
        return
    with _namespaces_mutex:
        others = [m for (loc, ns, _), m in list(_namespaces.items())
                  if loc == location and ns == manager._namespace and m is not manager]
        _namespaces[(location, manager._namespace, id(manager))] = manager
    for other in others:
        names = (getattr(other.key, "__name__", ""), getattr(manager.key, "__name__", ""))
        if other.key is not manager.key and not any(str(n).startswith("prefixed(") for n in names):
            # (keys.prefixed keys are kept apart by their prefix)
            logger.warning(
                "two managers store sessions under %r in %r with different key functions (%s, %s): "
                "they share a session wherever their keys are equal (in a private chat the chat id is "
                "the user id); give each its own name=", manager._namespace, manager.store,
                getattr(other.key, "__name__", other.key), getattr(manager.key, "__name__", manager.key))
            return


def _session_dataclass(initial: Callable[[], Any]) -> Optional[type]:
    """The dataclass of the sessions ``initial`` makes, or ``None``: a dataclass itself, or a
    factory returning instances of one (called once here to find out)."""
    if isinstance(initial, type):
        return initial if dataclasses.is_dataclass(initial) else None
    sample = initial()
    if dataclasses.is_dataclass(sample) and not isinstance(sample, type):
        return type(sample)
    return None


def bot_id_of(bot: Any) -> int:
    """A bot's id: ``bot`` is an ``int``, a token ``"123456:ABC..."`` or an object with ``.token``."""
    if isinstance(bot, int) and not isinstance(bot, bool):
        return bot
    token = bot if isinstance(bot, str) else getattr(bot, "token", None)
    head = token.partition(":")[0] if isinstance(token, str) else ""
    if not head.isdigit() or not head.isascii():
        raise ValueError(f"cannot tell the bot id of {bot!r}: a token starts with the bot's number "
                         f"and ':' (\"123456:ABC...\"); pass the bot, its token or its id")
    return int(head)


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
        return _run(default_sessions(), func, update, *args, **kwargs)

    return cast(F, wrapper)
