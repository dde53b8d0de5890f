"""``ShelveStore``: sessions in one ``shelve`` database, for small bots on one host.

``shelve`` (``dbm``) is not safe for concurrent writers, and a process that keeps
a shelf open never sees another's writes.  So every operation opens the shelf,
works and closes it under a store-wide lock (a thread mutex plus a record lock
on byte 0 of ``PATH.lock``), and sessions are held per key as in every store
(record locks on other bytes of the same file).  Opening costs time in
proportion to the number of stored keys when Python has no ``gdbm`` (it then
falls back to ``dbm.dumb``, as on this project's reference machine): prefer
``SQLiteStore`` beyond a few thousand sessions.

``dbm.dumb`` itself is not crash-safe: it overwrites values in place and
rewrites its index file non-atomically, so a process killed mid-save can leave
a torn value or no index at all.  ``ShelveStore`` opens ``dbm.dumb`` databases
through ``_AppendOnlyDumb``, which appends every new value instead of
overwriting the old one and replaces the index atomically (temp file, fsync,
rename) after the data is on disk: a crash leaves the old index pointing at old
values, or the new one at new values.  The price: the ``.dat`` file grows by at
least 512 bytes per save (``dbm.dumb`` never reclaims space).

``shelve`` pickles what it stores and loading a pickle runs code: never point a
``ShelveStore`` at a file that someone else can write.  The values kept here
are our own JSON records, pickled as ``bytes``.
"""
import dbm
import dbm.dumb
import glob
import logging
import os
import shelve
import threading
from typing import Any, Iterator, Optional

from ..atomic import atomic_file
from ..errors import CorruptSessionError, StoreError
from .base import Store

__all__ = ["ShelveStore"]

logger = logging.getLogger("telesession")


def _default_is_dumb() -> bool:
    """Whether ``dbm`` would create a new database with ``dbm.dumb`` (no gdbm/ndbm in this Python)."""
    for name in ("dbm.gnu", "dbm.ndbm"):
        try:
            __import__(name)
            return False
        except ImportError:
            pass
    return True


_Dumb: Any = getattr(dbm.dumb, "_Database", None)
_DUMB_HOOKS = _Dumb is not None and all(hasattr(_Dumb, n) for n in ("_setval", "_addval", "_commit"))


if _DUMB_HOOKS:
    class _AppendOnlyDumb(_Dumb):  # type: ignore[misc,valid-type]
        """``dbm.dumb`` made crash-safe: never overwrite a value, replace the index atomically."""

        def _setval(self, pos: int, val: bytes) -> Any:
            return self._addval(val)  # the old value stays intact for the old index

        fsync = True

        def _commit(self) -> None:
            if self._index is None or not self._modified:  # type: ignore[has-type]
                return
            try:
                if self.fsync:  # values first, then the index that points at them
                    with open(self._datfile, "rb+") as data:
                        os.fsync(data.fileno())
                with atomic_file(os.fsdecode(self._dirfile), fsync=self.fsync) as f:
                    for key, pos_and_siz in self._index.items():
                        f.write(("%r, %r\n" % (key.decode("Latin-1"), pos_and_siz)).encode("Latin-1"))
            finally:
                # Committed or not, never write this index again (e.g. from __del__, outside our locks).
                self._modified = False

        sync = _commit


class ShelveStore(Store):
    """Sessions in the ``shelve`` database at ``path`` (files ``path*``, all mode 0600).

    ``fsync=False`` skips flushing to the disk on each save (``dbm.dumb`` only): a
    killed process still loses nothing, a power cut may lose the latest saves.
    """

    def __init__(self, path: str, *, fsync: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.fsync = fsync
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {parent}: {exc.strerror}", None, self.path) from exc
        self.location = ("shelve", os.path.realpath(self.path))
        self.lock_path = self.path + ".lock"
        self._mutex = threading.Lock()
        with self._shelf("create", None):
            pass

    def describe(self, key: str) -> str:
        return f"record {key!r} of shelve database {self.path}"

    # -- records --------------------------------------------------------------------

    def load(self, key: str) -> Optional[bytes]:
        with self._shelf("read", key) as shelf:
            try:
                value = shelf.get(key)
            except Exception as exc:  # unpickling garbage raises anything
                raise CorruptSessionError(
                    f"session {key!r} is unreadable ({self.describe(key)}): {type(exc).__name__}: {exc}; "
                    "it was left untouched", key, self.describe(key)) from exc
        if value is not None and not isinstance(value, bytes):
            raise CorruptSessionError(f"session {key!r} ({self.describe(key)}) holds a "
                                      f"{type(value).__name__}, not a telesession record", key,
                                      self.describe(key))
        return value

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        with self._shelf("write", key) as shelf:
            shelf[key] = record

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        with self._shelf("delete", key) as shelf:
            try:
                del shelf[key]
            except KeyError:
                pass

    def keys(self) -> Iterator[str]:
        with self._shelf("list", None) as shelf:
            return iter(list(shelf.keys()))

    # -- the shelf ------------------------------------------------------------------

    def _shelf(self, verb: str, key: Optional[str]) -> "_OpenShelf":
        return _OpenShelf(self, verb, key)

    def _open_db(self) -> Any:
        kind = dbm.whichdb(self.path)
        if _DUMB_HOOKS and (kind == "dbm.dumb" or (kind is None and _default_is_dumb())):
            db = _AppendOnlyDumb(self.path, 0o600, "c")
            db.fsync = self.fsync
            return db
        return dbm.open(self.path, "c", 0o600)

    def _open(self, verb: str, key: Optional[str]) -> shelve.Shelf:  # type: ignore[type-arg]
        what = f"{verb} session {key!r}" if key is not None else f"{verb} the store"
        try:
            db = self._open_db()
        except (SyntaxError, ValueError, TypeError) as exc:  # dbm.dumb: an unreadable index
            backup = f"; {self.path}.bak may hold an older index" if os.path.exists(self.path + ".bak") else ""
            raise CorruptSessionError(
                f"cannot {what}: the shelve database {self.path} is damaged "
                f"({type(exc).__name__}: {exc}); it was left untouched{backup}", key, self.path) from exc
        except (OSError, dbm.error[0]) as exc:  # type: ignore[misc]
            raise StoreError(f"cannot {what}: cannot open the shelve database {self.path}: {exc}",
                             key, self.path) from exc
        for name in glob.glob(glob.escape(self.path) + "*"):
            if not name.endswith(".lock"):
                try:
                    if os.stat(name).st_mode & 0o077:
                        os.chmod(name, 0o600)
                except OSError:
                    pass
        return shelve.Shelf(db, protocol=4)  # type: ignore[arg-type]


class _OpenShelf:
    """The shelf, open for one operation under the store-wide lock."""

    def __init__(self, store: ShelveStore, verb: str, key: Optional[str]) -> None:
        self.store, self.verb, self.key = store, verb, key
        self.shelf: Any = None

    def __enter__(self) -> Any:
        store = self.store
        store._mutex.acquire()
        try:
            lock_file = store._process_lock_file(self.key)
            if not lock_file.acquire(None, 60.0):
                raise StoreError(f"cannot {self.verb} session {self.key!r}: the shelve database "
                                 f"{store.path} stayed locked for 60 s", self.key, store.path)
            try:
                self.shelf = store._open(self.verb, self.key)
            except BaseException:
                lock_file.release(None)
                raise
        except BaseException:
            store._mutex.release()
            raise
        return self.shelf

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:  # the operation failed: keep the index as it was on disk
                db = self.shelf.dict
                if _DUMB_HOOKS and isinstance(db, _AppendOnlyDumb):
                    db._modified = False
            self.shelf.close()
            if isinstance(exc, OSError) and not isinstance(exc, StoreError):
                raise exc
        except OSError as err:
            raise StoreError(f"cannot {self.verb} session {self.key!r} ({self.store.path}): {err}",
                             self.key, self.store.path) from err
        finally:
            self.store._process_lock_file(self.key).release(None)
            self.store._mutex.release()
