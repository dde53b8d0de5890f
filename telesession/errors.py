"""The exceptions of telesession: one base class, each subclassing the builtin it means.

Every exception carries the session ``key`` (or ``None``) and, where it applies,
``where``: the file, row or Redis key involved.  They pickle, so they cross
process boundaries intact.
"""
from typing import Any, Optional, Tuple

__all__ = [
    "SessionError",
    "NoActiveSession",
    "LockTimeout",
    "StoreError",
    "CorruptSessionError",
    "SerializationError",
    "ConflictError",
    "BacklogFull",
]


class SessionError(Exception):
    """Base class of every telesession error."""

    def __init__(self, message: str, key: Optional[str] = None, where: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.where = where

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Tuple[Any, ...]:
        return (self.__class__, (self.message, self.key, self.where))


class NoActiveSession(SessionError, LookupError):
    """``session`` was used where no session is bound (outside a handler, or an update without a key)."""


class LockTimeout(SessionError, TimeoutError):
    """Waiting for the lock of a key took longer than ``lock_timeout``."""


class StoreError(SessionError, OSError):
    """The store could not be read or written (disk, database or Redis failure)."""

    def __init__(self, message: str, key: Optional[str] = None, where: Optional[str] = None) -> None:
        # Bypass OSError's (errno, strerror) argument parsing: our message is the whole story.
        SessionError.__init__(self, message, key, where)


class CorruptSessionError(StoreError, ValueError):
    """A stored record cannot be decoded; it is left untouched for a human to inspect."""


class SerializationError(SessionError, TypeError):
    """A session value cannot be stored faithfully; ``path`` says where inside the session."""

    def __init__(self, message: str, key: Optional[str] = None, where: Optional[str] = None,
                 path: Optional[str] = None) -> None:
        super().__init__(message, key, where)
        self.path = path

    def __reduce__(self) -> Tuple[Any, ...]:
        return (self.__class__, (self.message, self.key, self.where, self.path))


class ConflictError(StoreError):
    """The stored session changed since it was loaded (a lost race); nothing was overwritten."""


class BacklogFull(SessionError, OverflowError):
    """A key already has ``max_pending`` updates parked behind its running one; this update was dropped."""
