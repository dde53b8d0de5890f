"""The active sessions of this thread, and the ``session`` proxy that reaches them.

A ``ContextVar`` holds a tuple of frames, innermost last.  A frame is pushed when
a handler's session is opened and removed in ``finally`` when it closes; pool
threads are reused, so nothing may stay behind.  Frames are removed by identity,
not by ``ContextVar.reset``, because telebot runs middleware ``post_process``
hooks in registration order, not in reverse.  A frame is the session's handle
itself for the scope that opened it, and a small re-entry frame for a scope that
re-entered a session an outer one holds; both read as the handle (``state``,
``data``, ``value()``), so the proxy reaches the session in one step.
"""
import dataclasses
import os
from contextvars import ContextVar
from typing import Any, Callable, Iterator, MutableMapping, Optional, Tuple

from .errors import NoActiveSession

__all__ = ["SessionProxy", "HandleProxy", "session", "active_frames", "push", "remove", "unbind_only"]

_stack: ContextVar[Tuple[Any, ...]] = ContextVar("telesession_stack", default=())

#: ``_Handle.state`` of a session that is loaded: its ``data`` can be used as it is.
LOADED = 1

UNBOUND = ("no session is active: decorate the handler with @with_session (or "
           "@sessions.with_session), call sessions.setup(bot), or use `with sessions.open(key):`")


def active_frames() -> Tuple[Any, ...]:
    """The frames bound in this thread, innermost last."""
    return _stack.get()


def push(frame: Any) -> None:
    _stack.set(_stack.get() + (frame,))


def remove(frame: Any) -> None:
    stack = _stack.get()
    if stack and stack[-1] is frame:
        _stack.set(stack[:-1])
    else:
        _stack.set(tuple(f for f in stack if f is not frame))


def unbind_only(frame: Any, stack: Tuple[Any, ...]) -> None:
    """``remove`` of the only frame, bound as ``stack`` (cheap when the handler left the stack as it was)."""
    if _stack.get() is stack:
        _stack.set(())
    else:
        remove(frame)


def _innermost() -> Any:
    stack = _stack.get()
    if not stack:
        raise NoActiveSession(UNBOUND)
    frame = stack[-1]  # (a frame reads as its handle: state, data, value())
    return frame.data if frame.state == LOADED else frame.value()


class _Forwarded:
    """A mapping method of the proxy that is the session's own attribute.

    ``session.get`` is the dict's bound ``get`` for a dict session and the field named
    ``get`` for a dataclass session that has one, so field names are never shadowed by
    the proxy (looked up on the class, without a ``__getattribute__`` on every access).
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, proxy: Any, owner: Any = None) -> Any:
        if proxy is None:
            return self
        return getattr(proxy._resolve(), self.name)


class _Delete:
    """``session.delete``: the field of a dataclass session that has one, else the proxy's ``delete()``."""

    def __get__(self, proxy: Any, owner: Any = None) -> Any:
        if proxy is None:
            return self
        try:
            value = proxy._resolve()
        except NoActiveSession:
            value = None
        if value is not None and "delete" in getattr(type(value), "__dataclass_fields__", ()):
            return value.delete
        return proxy._delete_session


class SessionProxy(MutableMapping):  # type: ignore[type-arg]
    """Stands for a session that is looked up on every use.

    Item access works for dict sessions, attribute access for dataclass sessions;
    ``delete()`` drops the whole session (removed from the store when the handler
    returns).  ``proxy.__wrapped__`` is the session object itself.

    Every attribute is the session's own: ``session.get`` is the dict's ``get``, and a
    dataclass field named ``items``, ``get`` or ``keys`` is the field, not a mapping
    method; ``delete`` is the field when the dataclass has one (then use
    ``sessions.delete_current()``); ``isinstance(proxy, YourClass)`` holds.
    """

    __slots__ = ("_resolve", "_delete")

    get = _Forwarded("get")
    setdefault = _Forwarded("setdefault")
    keys = _Forwarded("keys")
    items = _Forwarded("items")
    values = _Forwarded("values")
    pop = _Forwarded("pop")
    popitem = _Forwarded("popitem")
    update = _Forwarded("update")
    clear = _Forwarded("clear")
    delete = _Delete()

    @property  # type: ignore[misc]
    def __class__(self) -> Any:  # what isinstance() consults after the real type
        try:
            value = self._resolve()
        except NoActiveSession:
            return SessionProxy
        return type(value) if dataclasses.is_dataclass(value) else SessionProxy

    def __init__(self, resolve: Callable[[], Any], delete: Optional[Callable[[], None]] = None) -> None:
        object.__setattr__(self, "_resolve", resolve)
        object.__setattr__(self, "_delete", delete)

    @property
    def __wrapped__(self) -> Any:
        return self._resolve()

    def _delete_session(self) -> None:
        """Drop this session: it is deleted from the store after the handler returns."""
        if self._delete is None:
            stack = _stack.get()
            if not stack:
                raise NoActiveSession(UNBOUND)
            stack[-1].handle.delete()
        else:
            self._delete()

    def __getitem__(self, item: Any) -> Any:
        return self._resolve()[item]

    def __setitem__(self, item: Any, value: Any) -> None:
        self._resolve()[item] = value

    def __delitem__(self, item: Any) -> None:
        del self._resolve()[item]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._resolve())

    def __len__(self) -> int:
        return len(self._resolve())

    def __contains__(self, item: Any) -> bool:
        return item in self._resolve()

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, SessionProxy):
            other = other._resolve()
        return bool(self._resolve() == other)

    __hash__ = None  # type: ignore[assignment]

    def __bool__(self) -> bool:
        return bool(self._resolve())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resolve(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._resolve(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._resolve(), name)

    def __repr__(self) -> str:
        try:
            return f"<session {self._resolve()!r}>"
        except NoActiveSession:
            return "<session (none active)>"


def _after_fork_in_child() -> None:
    # A forked child inherits the forking thread's bound sessions, but not their locks: it
    # must not see them as its own (the parent still holds them and will save them).
    _stack.set(())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class HandleProxy(SessionProxy):
    """The proxy of one opened session (``with sessions.open(key) as s``, the middleware's
    ``data["session"]``): made on every update, so one slot instead of two bound methods."""

    __slots__ = ("_handle",)

    def __init__(self, handle: Any) -> None:  # pylint: disable=super-init-not-called
        object.__setattr__(self, "_handle", handle)

    def _resolve(self) -> Any:  # type: ignore[override]
        handle = self._handle
        return handle.data if handle.state == LOADED else handle.value()

    def _delete_session(self) -> None:
        """Drop this session: it is deleted from the store after the handler returns."""
        self._handle.delete()

    def __getitem__(self, item: Any) -> Any:
        handle = self._handle
        return (handle.data if handle.state == LOADED else handle.value())[item]

    def __setitem__(self, item: Any, value: Any) -> None:
        handle = self._handle
        (handle.data if handle.state == LOADED else handle.value())[item] = value


class _InnermostProxy(SessionProxy):
    """``session``: item and field access inlined (it runs on every ``session["x"]`` and
    ``session.x`` of every handler)."""

    __slots__ = ()

    def __getitem__(self, item: Any) -> Any:
        stack = _stack.get()
        if stack:
            frame = stack[-1]
            if frame.state == LOADED:
                return frame.data[item]
        return _innermost()[item]

    def __setitem__(self, item: Any, value: Any) -> None:
        stack = _stack.get()
        if stack:
            frame = stack[-1]
            if frame.state == LOADED:
                frame.data[item] = value
                return
        _innermost()[item] = value

    def __getattr__(self, name: str) -> Any:
        stack = _stack.get()
        if stack:
            frame = stack[-1]
            if frame.state == LOADED:
                return getattr(frame.data, name)
        return getattr(_innermost(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        stack = _stack.get()
        if stack:
            frame = stack[-1]
            if frame.state == LOADED:
                setattr(frame.data, name, value)
                return
        setattr(_innermost(), name, value)


#: The innermost active session of this thread.
session: Any = _InnermostProxy(_innermost)
