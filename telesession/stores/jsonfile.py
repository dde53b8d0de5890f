"""``JSONFileStore``: one JSON file per session key in a directory; threads and processes on one host.

File names keep every key inside the directory and distinct keys distinct: the
characters ``a-z 0-9 _ -`` (and ``.`` after the first character) stand for
themselves, every other byte of the key's UTF-8 is written ``%XX``; so chat
``-1001234`` lives in ``-1001234.json`` and ``../x`` in ``%2E.%2Fx.json``.  A name
that would exceed 200 bytes is cut and ends in ``~`` plus a SHA-256 of the key;
the record itself names its key.  The empty key is ``%.json``.

Saves write a temporary file (mode 0600), ``fsync`` it (unless ``fsync=False``),
and ``os.replace`` it over the record: a crash leaves the old file or the new
one.  Processes exclude each other per key with record locks on one byte of
``.lock`` in the directory (opened once per process; a killed process's locks
vanish with it).
"""
import hashlib
import itertools
import json
import logging
import os
import re
import time
from typing import Iterator, List, Optional
from urllib.parse import unquote_to_bytes

from ..errors import StoreError
from ..locking import current_pid
from .base import Store

__all__ = ["JSONFileStore", "key_to_filename", "filename_to_key"]

logger = logging.getLogger("telesession")

_PLAIN = re.compile(r"[a-z0-9_\-][a-z0-9_.\-]*\Z")
_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-.")
_SUFFIX = ".json"
_MAX_NAME = 200
_STALE_TEMP_SECONDS = 3600
_temp_names = itertools.count()  # next() is atomic under the GIL
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | _CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC
_WINDOWS_DEVICES = frozenset(["con", "prn", "aux", "nul"] + [f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)])


def key_to_filename(key: str) -> str:
    """The file name of ``key``: injective, never a path, never hidden, never a Windows device, <= 205 bytes."""
    if _PLAIN.match(key) and len(key) <= _MAX_NAME and key.partition(".")[0] not in _WINDOWS_DEVICES:
        return key + _SUFFIX
    if not key:
        return "%" + _SUFFIX
    device = key.partition(".")[0].lower() in _WINDOWS_DEVICES  # "nul" -> "%6Eul"
    parts = []
    for i, ch in enumerate(key):
        if ch in _KEEP and (i or (ch != "." and not device)):
            parts.append(ch)
        else:
            parts.extend("%%%02X" % b for b in ch.encode("utf-8", "surrogatepass"))
    name = "".join(parts)
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        name = name[:_MAX_NAME - 65].rstrip("%0123456789ABCDEF") + "~" + digest
    return name + _SUFFIX


def filename_to_key(name: str) -> Optional[str]:
    """The key of a file name made by ``key_to_filename``; ``None`` for hashed (long) names."""
    stem = name[:-len(_SUFFIX)]
    if "~" in stem:
        return None
    if stem == "%":
        return ""
    return unquote_to_bytes(stem).decode("utf-8", "surrogatepass")


class JSONFileStore(Store):
    """Sessions as ``DIRECTORY/<key>.json`` files (directory created mode 0700)."""

    def __init__(self, directory: str, *, fsync: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self.fsync = fsync
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the session directory {self.directory}: {exc.strerror}",
                             None, self.directory) from exc
        if not os.path.isdir(self.directory):
            raise StoreError(f"{self.directory} is not a directory", None, self.directory)
        self.location = ("json", os.path.realpath(self.directory))
        self.lock_path = os.path.join(self.directory, ".lock")
        self._remove_stale_temp_files()

    def path(self, key: str) -> str:
        """The file that holds ``key``."""
        return os.path.join(self.directory, key_to_filename(key))

    def describe(self, key: str) -> str:
        return f"file {self.path(key)}"

    # -- records --------------------------------------------------------------------

    def load(self, key: str) -> Optional[bytes]:
        path = self.path(key)
        try:
            fd = os.open(path, _READ_FLAGS)  # no buffered file object: half the system calls
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error("read", key, path, exc) from exc
        try:
            chunks: List[bytes] = []
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        except OSError as exc:
            raise self._error("read", key, path, exc) from exc
        finally:
            os.close(fd)

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        path = self.path(key)
        # Unique per process (module-wide counter: several store objects may share a directory).
        temp = os.path.join(self.directory, f".{current_pid()}-{next(_temp_names)}.tmp")
        try:
            fd = os.open(temp, _WRITE_FLAGS, 0o600)
        except OSError as exc:
            raise self._error("write", key, path, exc) from exc
        try:
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError as exc:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise self._error("write", key, path, exc) from exc

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        path = self.path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error("delete", key, path, exc) from exc

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys from the file names (a long key's from its record); ``prefix`` filters them."""
        for key in self._all_keys():
            if key.startswith(prefix):
                yield key

    def _all_keys(self) -> Iterator[str]:
        with os.scandir(self.directory) as entries:
            names = [e.name for e in entries if e.name.endswith(_SUFFIX) and not e.name.startswith(".")]
        for name in names:
            key = filename_to_key(name)
            if key is None:  # a long key: the record names it
                try:
                    with open(os.path.join(self.directory, name), "rb") as f:
                        key = json.loads(f.read()).get("key")
                except (OSError, ValueError, AttributeError):
                    logger.warning("cannot read the key of %s", os.path.join(self.directory, name))
                    continue
                if not isinstance(key, str):
                    continue
            yield key

    # -- helpers --------------------------------------------------------------------

    def _error(self, verb: str, key: str, path: str, exc: OSError) -> StoreError:
        reason = exc.strerror or str(exc)
        return StoreError(f"cannot {verb} session {key!r} ({path}): {reason}"
                          f"{' [errno ' + str(exc.errno) + ']' if exc.errno else ''}", key, path)

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writers killed mid-save: harmless, but don't let them pile up."""
        cutoff = time.time() - _STALE_TEMP_SECONDS
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                        try:
                            if entry.stat().st_mtime < cutoff:
                                os.unlink(entry.path)
                        except OSError:
                            pass
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"JSONFileStore({self.directory!r})"
