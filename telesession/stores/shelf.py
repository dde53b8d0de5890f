"""``ShelveStore``: sessions in one ``shelve`` database, for small bots on one host.

Where Python has no ``gdbm``/``ndbm`` (as on this project's reference machine),
``shelve`` means ``dbm.dumb``: ``PATH.dat`` holds the values, each starting at a
512-byte boundary, and ``PATH.dir`` is a text index of ``'key', (pos, size)``
lines, read top to bottom so that a later line for a key wins.  ``dbm.dumb``
itself re-reads the whole index on every open, rewrites it on every change and
overwrites values in place, which is slow (in proportion to the stored keys)
and not crash-safe.  ``ShelveStore`` therefore reads and writes these files
itself, in exactly that format (values are our ``bytes`` records pickled with
protocol 4, as ``shelve`` stores them), so ``shelve.open(PATH, "r")`` still
reads every session, and databases written before keep working:

* A save appends the value to ``PATH.dat`` (flushed with ``fsync``), then appends
  one index line to ``PATH.dir`` (flushed too).  Nothing is overwritten, so a
  crash leaves the old line pointing at the old value, or the new line at the
  new one.  A line torn by a crash mid-append (no final newline) is ignored when
  reading (or completed, if its key, its position and a whole value there are
  readable: the save had got that far) and cut off by the next save;
  ``dbm.dumb`` cannot open the files until then.
* Each process keeps the parsed index in memory, per database (about 170 bytes
  per key), and checks it on every operation under the store-wide lock with one
  ``stat`` of ``PATH.dir``: same file and grown, it parses only the new lines;
  replaced by another process, it re-reads it in full (about 0.1 s per 100,000
  keys).  It keeps the parsed file open, so its inode number cannot be reused
  by a later file while it is cached.  A forked child checks the inherited
  index the same way before using it.
* So a load or a save costs the same with 100 or 100,000 stored sessions, once
  the index is read.  A delete rewrites the index (temp file, ``fsync``,
  rename, ``fsync`` of the directory): it costs time in proportion to the
  stored keys, and makes every other process re-read the index once; deleting
  many sessions one by one (a purge) is therefore slow with many stored.  When
  the index holds more than twice as many lines as live keys (plus 1,000), the
  save that notices rewrites it the same way (compaction), so ``PATH.dir`` stays
  in proportion to the sessions.  A crash mid-rewrite leaves the old index and
  a temp file, which the next ``ShelveStore`` opening the database removes.
  ``PATH.dat`` grows by at least 512 bytes per save and is never compacted
  (``dbm.dumb`` never reclaims space either).

Every operation runs under a store-wide lock (a thread mutex per database per
process plus a record lock on byte 0 of ``PATH.lock``); sessions are held per key
as in every store (record locks on other bytes of the same file).  With
``gdbm``/``ndbm`` present, new databases use them through ``shelve``, opened per
operation under the same lock (opening them does not read the whole index).

``shelve`` pickles what it stores and loading a pickle runs code: never point a
``ShelveStore`` at a file that someone else can write.  The values kept here
are our own JSON records, pickled as ``bytes``.
"""
import ast
import dbm
import glob
import logging
import os
import pickle
import re
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

from ..atomic import atomic_file
from ..errors import CorruptSessionError, StoreError
from .base import Store

__all__ = ["ShelveStore"]

logger = logging.getLogger("telesession")

_BLOCK = 512  # dbm.dumb starts every value at a multiple of this
_PROTOCOL = 4  # the pickle protocol ShelveStore has always given shelve: keep it, old files stay readable
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_COMPACT_SLACK = 1000  # compact when the index has more than 2 x live keys + this many lines
_DBM_ERRORS: Tuple[Type[BaseException], ...] = (OSError, *dbm.error)

Pair = Tuple[int, int]  # (position in PATH.dat, size)

# One index line as dbm.dumb writes it for a key of plain characters: the fast path of the parser.
_LINE = re.compile(rb"^'([^'\\\r\n]*)', \((\d+), (\d+)\)$", re.M)
# The start of such a line, cut anywhere after the position: a torn last line we may complete.
_TORN = re.compile(rb"'([^'\\\r\n]*)', \((\d+),(?: (\d*)\)?)?")


class _BadIndex(ValueError):
    """A complete line of ``PATH.dir`` that is not a ``'key', (pos, size)`` entry."""


def _default_is_dumb() -> bool:
    """Whether ``dbm`` would create a new database with ``dbm.dumb`` (no gdbm/ndbm in this Python)."""
    for name in ("dbm.gnu", "dbm.ndbm"):
        try:
            __import__(name)
            return False
        except ImportError:
            pass
    return True


def _line(key: bytes, pair: Pair) -> bytes:
    """``key``'s index line, byte for byte as ``dbm.dumb`` writes it."""
    return ("%r, %r\n" % (key.decode("Latin-1"), pair)).encode("Latin-1")


def _parse_slow(line: bytes, number: int, dirfile: str) -> Tuple[bytes, Pair]:
    """One index line the fast pattern did not match (escaped characters, or garbage)."""
    try:
        key, pair = ast.literal_eval(line.decode("Latin-1").rstrip())  # what dbm.dumb does
        if (not isinstance(key, str) or type(pair) is not tuple or len(pair) != 2
                or not all(type(n) is int and n >= 0 for n in pair)):
            raise ValueError("not a 'key', (position, size) entry")
        return key.encode("Latin-1"), pair
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        raise _BadIndex(f"line {number} of {dirfile}: {type(exc).__name__}: {exc}") from exc


def _parse(block: bytes, first: int, dirfile: str) -> List[Tuple[bytes, Pair]]:
    """The entries of ``block`` (whole lines, ending with a newline), in file order.

    ``first`` is the number of the first line, for error messages.
    """
    found = _LINE.findall(block)
    if len(found) == block.count(b"\n"):  # every line matched (a match never spans two lines)
        return [(key, (int(pos), int(size))) for key, pos, size in found]
    out = []
    for number, line in enumerate(block.split(b"\n")[:-1], first):
        m = _LINE.fullmatch(line)
        out.append((m.group(1), (int(m.group(2)), int(m.group(3)))) if m else _parse_slow(line, number, dirfile))
    return out


def _read_from(fd: int, offset: int) -> bytes:
    """Everything in ``fd`` from ``offset`` to its end."""
    chunks: List[bytes] = []
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _write_all(fd: int, data: bytes, offset: Optional[int] = None) -> None:
    """Write all of ``data`` (at ``offset``, or appending); a short write continues, an error raises."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def _fsync_directory(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse to sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        logger.debug("cannot fsync the directory %s: %s", path, exc)
    finally:
        os.close(fd)


def _recover(tail: bytes, datfile: str) -> Optional[Tuple[bytes, Pair]]:
    """The entry of a torn last index line if its key and position are whole and a complete
    ``bytes`` pickle starts there whose size agrees with the digits present; else ``None``."""
    m = _TORN.fullmatch(tail)
    if m is None or int(m.group(2)) % _BLOCK:
        return None
    pos, digits = int(m.group(2)), m.group(3) or b""
    try:
        with open(datfile, "rb") as f:
            f.seek(pos)
            value = pickle.Unpickler(f).load()  # reads exactly the one pickle
            size = str(f.tell() - pos).encode()
    except Exception:  # noqa: BLE001 - no whole value there: the line stays ignored
        return None
    if not isinstance(value, bytes) or not size.startswith(digits) or (tail.endswith(b")") and size != digits):
        return None
    return m.group(1), (pos, int(size))


class _Index:
    """One database's parsed ``PATH.dir`` in this process, and the mutex of its operations.

    Valid while ``PATH.dir`` is the file it parsed (``fd`` keeps that file open, so its
    inode number is not reused) and nothing before ``offset`` changed: writers only
    append whole lines, cut off a torn last line, or replace the file.
    """

    def __init__(self, base: str) -> None:
        self.dirfile = base + ".dir"
        self.datfile = base + ".dat"
        self.mutex = threading.Lock()
        self.users = 0
        self.fd: Optional[int] = None
        self.reset()

    def reset(self) -> None:
        """Forget the parsed index: the next operation re-reads ``PATH.dir`` in full."""
        fd, self.fd = self.fd, None
        self.ident: Tuple[int, int] = (-1, -1)  # (st_dev, st_ino) of the parsed file
        self.seen: Tuple[int, int] = (-1, -1)  # (st_size, st_mtime_ns) when last read or written
        self.entries: Dict[bytes, Pair] = {}
        self.offset = 0  # whole lines parsed up to here
        self.mark = b""  # the bytes just before offset: changed means rewritten in place, not appended to
        self.lines = 0
        self.retry_at = 0  # a failed compaction is retried only this many lines later
        self.tail = b""  # bytes after the last newline: a line torn by a crash
        self.tail_entry: Optional[Tuple[bytes, Pair]] = None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- reading --------------------------------------------------------------------

    def refresh(self, st: os.stat_result) -> None:
        """Bring the cache up to date with ``PATH.dir`` as ``st`` describes it (under the lock)."""
        if self.fd is None or (st.st_dev, st.st_ino) != self.ident or st.st_size < self.offset:
            self._load_all()
        elif (st.st_size, st.st_mtime_ns) != self.seen or self.tail:
            self._load_more()

    def _load_all(self) -> None:
        self.reset()
        fd = os.open(self.dirfile, os.O_RDONLY | _CLOEXEC)
        try:
            st = os.fstat(fd)
            data = _read_from(fd, 0)
            end = data.rfind(b"\n") + 1
            entries = dict(_parse(data[:end], 1, self.dirfile))
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.ident, self.entries = fd, (st.st_dev, st.st_ino), entries
        self.offset, self.lines, self.mark = end, data.count(b"\n", 0, end), data[max(end - 64, 0):end]
        self.seen = (st.st_size, st.st_mtime_ns)
        self._set_tail(data[end:])

    def _load_more(self) -> None:
        assert self.fd is not None
        st = os.fstat(self.fd)
        data = _read_from(self.fd, self.offset - len(self.mark))
        if not data.startswith(self.mark):  # not appended to but rewritten in place (not by ShelveStore)
            self._load_all()
            return
        data = data[len(self.mark):]
        end = data.rfind(b"\n") + 1
        try:
            parsed = _parse(data[:end], self.lines + 1, self.dirfile)
        except _BadIndex:
            self.reset()  # and fail the same way next time
            raise
        self.entries.update(parsed)  # in file order: a later line wins
        if end:
            self.offset += end
            self.mark = (self.mark + data[:end])[-64:]
        self.lines += len(parsed)
        self.seen = (st.st_size, st.st_mtime_ns)
        self._set_tail(data[end:])

    def _set_tail(self, tail: bytes) -> None:
        if tail != self.tail:
            self.tail = tail
            self.tail_entry = _recover(tail, self.datfile) if tail else None
            if tail:
                logger.warning("%s ends with a line torn by a crash mid-save: %s until the next save cuts it off",
                               self.dirfile, "read as completed" if self.tail_entry else "ignored")

    def get(self, key: bytes) -> Optional[Pair]:
        if self.tail_entry is not None and self.tail_entry[0] == key:
            return self.tail_entry[1]
        return self.entries.get(key)

    def live(self) -> Dict[bytes, Pair]:
        """Every key's entry, the completed torn line included."""
        if self.tail_entry is None:
            return self.entries
        return {**self.entries, self.tail_entry[0]: self.tail_entry[1]}


_indexes: Dict[str, _Index] = {}
_indexes_mutex = threading.Lock()


def _index_for(base: str) -> _Index:
    """The one ``_Index`` of the database at ``base`` (a resolved path) in this process."""
    with _indexes_mutex:
        index = _indexes.get(base)
        if index is None:
            index = _indexes[base] = _Index(base)
        index.users += 1
        return index


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held a mutex, mid-operation: the child gets fresh
    # mutexes, and drops any index that was being updated.  The others stay (the child holds
    # their descriptors too) and are checked against the files before every use as always.
    global _indexes_mutex
    _indexes_mutex = threading.Lock()
    for index in _indexes.values():
        busy = index.mutex.locked()
        index.mutex = threading.Lock()
        if busy:
            index.reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
        real = self._real = os.path.realpath(self.path)
        self.location = ("shelve", real)
        self.lock_path = self.path + ".lock"
        kind = dbm.whichdb(self.path)
        self._dumb = kind == "dbm.dumb" or (kind is None and _default_is_dumb())
        self._index: Optional[_Index] = _index_for(real)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        """Create the files if missing and read the index: a damaged database fails here already."""
        with self._locked("create", None) as index:
            if self._dumb:
                for name in (index.datfile, index.dirfile):
                    if not os.path.exists(name):  # an existing database may be read-only
                        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | _CLOEXEC, 0o600))
                index.refresh(os.stat(index.dirfile))
                # Index rewrites happen under the lock we hold: a temp file left now is a crashed one's.
                for name in glob.glob(os.path.join(glob.escape(os.path.dirname(index.dirfile)),
                                                   "." + glob.escape(os.path.basename(index.dirfile)) + ".*.tmp")):
                    try:
                        os.unlink(name)
                    except OSError:
                        pass
            else:
                self._open_generic().close()
            for name in glob.glob(glob.escape(self.path) + "*"):  # files made by older versions or others
                try:
                    if not name.endswith((".lock", ".lock.d")) and os.stat(name).st_mode & 0o077:
                        os.chmod(name, 0o600)
                except OSError:
                    pass

    def describe(self, key: str) -> str:
        return f"record {key!r} of shelve database {self.path}"

    # -- records --------------------------------------------------------------------

    def load(self, key: str) -> Optional[bytes]:
        kb = key.encode("utf-8")
        with self._locked("read", key) as index:
            if not self._dumb:
                with self._open_generic() as db:
                    raw = db[kb] if kb in db else None
            else:
                self._refresh(index)
                pair = index.get(kb)
                if pair is None:
                    return None
                raw = self._read_value(index, key, pair)
        return None if raw is None else self._unpickle(key, raw)

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        kb = key.encode("utf-8")
        raw = pickle.dumps(record, protocol=_PROTOCOL)
        with self._locked("write", key) as index:
            if not self._dumb:
                with self._open_generic() as db:
                    db[kb] = raw
            else:
                self._append(index, kb, raw)

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        kb = key.encode("utf-8")
        with self._locked("delete", key) as index:
            if not self._dumb:
                with self._open_generic() as db:
                    if kb in db:
                        del db[kb]
                return
            self._refresh(index)
            if index.get(kb) is not None:
                entries = index.live()
                self._rewrite(index, {k: v for k, v in entries.items() if k != kb})

    def keys(self, prefix: str = "") -> Iterator[str]:
        return iter([key for key in self._all_keys() if key.startswith(prefix)])

    def _all_keys(self) -> Iterator[str]:
        with self._locked("list", None) as index:
            if not self._dumb:
                with self._open_generic() as db:
                    names = list(db.keys())
            else:
                self._refresh(index)
                names = list(index.live())
        try:
            return iter([name.decode("utf-8") for name in names])
        except UnicodeDecodeError as exc:
            raise CorruptSessionError(f"cannot list the store: the shelve database {self.path} holds a key "
                                      f"that is not UTF-8 ({exc})", None, self.path) from exc

    def close(self) -> None:
        """Forget this process's cached index when no other store object uses the database."""
        index, self._index = self._index, None
        if index is None:
            return
        with _indexes_mutex:
            index.users -= 1
            if index.users > 0:
                return
            if _indexes.get(self._real) is index:
                del _indexes[self._real]
        with index.mutex:
            index.reset()

    # -- dbm.dumb files -------------------------------------------------------------

    def _refresh(self, index: _Index) -> None:
        try:
            st = os.stat(index.dirfile)
        except FileNotFoundError:  # removed from outside: an empty index, as dbm.dumb makes one
            os.close(os.open(index.dirfile, os.O_WRONLY | os.O_CREAT | _CLOEXEC, 0o600))
            st = os.stat(index.dirfile)
        index.refresh(st)

    def _read_value(self, index: _Index, key: str, pair: Pair) -> bytes:
        pos, size = pair
        fd = os.open(index.datfile, os.O_RDONLY | _CLOEXEC)
        try:
            raw = os.pread(fd, size, pos) if size else b""
        finally:
            os.close(fd)
        if len(raw) != size:
            raise CorruptSessionError(
                f"session {key!r} is unreadable ({self.describe(key)}): its index entry points past the end "
                f"of {index.datfile} ({pos} + {size} bytes); it was left untouched", key, self.describe(key))
        return raw

    def _unpickle(self, key: str, raw: bytes) -> bytes:
        try:
            value = pickle.loads(raw)
        except Exception as exc:  # unpickling garbage raises anything
            raise CorruptSessionError(
                f"session {key!r} is unreadable ({self.describe(key)}): {type(exc).__name__}: {exc}; "
                "it was left untouched", key, self.describe(key)) from exc
        if not isinstance(value, bytes):
            raise CorruptSessionError(f"session {key!r} ({self.describe(key)}) holds a "
                                      f"{type(value).__name__}, not a telesession record", key,
                                      self.describe(key))
        return value

    def _append(self, index: _Index, kb: bytes, raw: bytes) -> None:
        """Append ``raw`` to ``PATH.dat``, then its index line to ``PATH.dir`` (each flushed with fsync)."""
        dfd = os.open(index.dirfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _CLOEXEC, 0o600)
        try:
            index.refresh(os.fstat(dfd))
            fd = os.open(index.datfile, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o600)
            try:
                end = os.lseek(fd, 0, os.SEEK_END)
                pos = -(-end // _BLOCK) * _BLOCK
                _write_all(fd, b"\0" * (pos - end) + raw, end)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            added = [(kb, (pos, len(raw)))]
            if index.tail:  # a line torn by a crash
                self._settle_tail(index, dfd)
            start = index.offset
            data = b"".join(_line(k, p) for k, p in added)
            try:
                _write_all(dfd, data)
                if self.fsync:
                    os.fsync(dfd)
                st = os.fstat(dfd)
            except BaseException:  # not saved: take back what part of the line was written
                index.reset()
                try:
                    os.ftruncate(dfd, start)
                except OSError:
                    pass
                raise
        finally:
            os.close(dfd)
        if (st.st_dev, st.st_ino) != index.ident or st.st_size != start + len(data):
            index.reset()  # replaced or appended to from outside, under our lock: start afresh
            return
        index.entries.update(added)
        index.lines += len(added)
        index.offset = st.st_size
        index.mark = (index.mark + data)[-64:]
        index.seen = (st.st_size, st.st_mtime_ns)
        if index.lines > max(2 * len(index.entries) + _COMPACT_SLACK, index.retry_at):
            try:
                self._rewrite(index, index.entries)
            except OSError as exc:  # the save itself is done; a later one tries again
                index.retry_at = index.lines + _COMPACT_SLACK
                logger.warning("cannot compact the index of the shelve database %s: %s", self.path, exc)

    def _settle_tail(self, index: _Index, dfd: int) -> None:
        """Complete a torn last line in place if it could be read as completed, else cut it off.

        Completed first and on its own, so a failure of the save that follows (which takes
        back only its own line) never drops the entry the torn line recovered.
        """
        entry, tail = index.tail_entry, index.tail
        full = _line(*entry) if entry is not None else b""
        try:
            if entry is not None and full.startswith(tail):
                _write_all(dfd, full[len(tail):])  # O_APPEND: right after the torn bytes
                if self.fsync:
                    os.fsync(dfd)
                index.entries[entry[0]] = entry[1]
                index.lines += 1
                index.offset += len(full)
                index.mark = (index.mark + full)[-64:]
            else:
                os.ftruncate(dfd, index.offset)
        except BaseException:
            index.reset()  # the file may hold a longer prefix now: read it afresh next time
            raise
        index.tail, index.tail_entry = b"", None

    def _rewrite(self, index: _Index, entries: Dict[bytes, Pair]) -> None:
        """Replace ``PATH.dir`` with one line per entry (temp file, fsync, rename)."""
        body = b"".join(_line(k, p) for k, p in entries.items())
        with atomic_file(index.dirfile, fsync=self.fsync) as f:  # failing, it leaves the old file as it was
            f.write(body)
        entries = dict(entries)  # a copy: reset() drops the cached dict, which may be ``entries`` itself
        index.reset()  # the old file is gone: from here on, cache the new one
        if self.fsync:
            _fsync_directory(os.path.dirname(index.dirfile))
        fd = os.open(index.dirfile, os.O_RDONLY | _CLOEXEC)
        st = os.fstat(fd)
        index.fd, index.ident, index.seen = fd, (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)
        if st.st_size != len(body):  # not what we wrote: read what is there
            index.reset()
            return
        index.entries = entries
        index.offset, index.lines, index.mark = len(body), len(entries), body[-64:]

    # -- gdbm / ndbm ----------------------------------------------------------------

    def _open_generic(self) -> Any:
        """The gdbm/ndbm database, opened for one operation (cheap for those)."""
        return dbm.open(self.path, "c", 0o600)

    # -- the lock -------------------------------------------------------------------

    @contextmanager
    def _locked(self, verb: str, key: Optional[str]) -> Iterator[_Index]:
        """Run one operation under the store-wide lock; OS errors become ``StoreError``,
        an unreadable index ``CorruptSessionError``, both naming the key and the path."""
        index = self._index
        if index is None:  # used after close(): take the database again
            index = self._index = _index_for(self._real)
        what = f"{verb} session {key!r}" if key is not None else f"{verb} the store"
        index.mutex.acquire()
        try:
            lock_file = self._process_lock_file(key)
            if not lock_file.acquire(None, 60.0):
                raise StoreError(f"cannot {what}: the shelve database {self.path} stayed locked for 60 s",
                                 key, self.path)
            try:
                yield index
            except _BadIndex as exc:
                backup = f"; {self.path}.bak may hold an older index" if os.path.exists(self.path + ".bak") else ""
                raise CorruptSessionError(
                    f"cannot {what}: the shelve database {self.path} is damaged ({exc}); "
                    f"it was left untouched{backup}", key, self.path) from exc
            except StoreError:
                raise
            except _DBM_ERRORS as exc:  # OSError, and gdbm's or ndbm's own error
                raise StoreError(f"cannot {what} ({self.path}): {exc}", key, self.path) from exc
            finally:
                lock_file.release(None)
        finally:
            index.mutex.release()
