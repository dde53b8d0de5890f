"""The ``telesession`` command: list, show, remove, back up, move and clean the sessions of any store.

    telesession ls URL [--json]
    telesession show URL KEY [--record]
    telesession rm URL KEY [KEY ...] [--missing-ok] [--lock-timeout S]
    telesession export URL [-o FILE] [--skip-corrupt]
    telesession import URL [FILE|-] [--overwrite | --skip-existing] [--lock-timeout S]
    telesession migrate SRC_URL DST_URL [--overwrite] [--skip-corrupt] [--lock-timeout S]
    telesession purge-expired URL [--ttl S] [--lock-timeout S]
    telesession stats URL [--json]
    telesession import-states URL FILE [--overwrite | --skip-existing] [--bot-id ID]

Every write takes the key's lock first, exactly as a running bot's handler does, so
the command and the bot never clobber each other.  Commands that only read (and
``rm``/``purge-expired``) never create a store that does not exist.  Exit status: 0
done, 1 failed (one line on stderr, ``telesession: error: ...``; ``--verbose`` adds
the traceback), 2 usage error, 130 interrupted.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import unquote

from .atomic import atomic_file
from .errors import ConflictError, CorruptSessionError, LockTimeout, SerializationError, SessionError
from .records import build_record, encode_data, parse_record
from .stores.base import Store
from .stores.url import SCHEMES, from_url
from .stores.url import scrub as scrub_url

__all__ = ["main", "build_parser", "scrub_url", "Progress"]

PROG = "telesession"

#: Passwords of the URLs given on the command line: never printed, whatever message carries them.
_secrets: List[Tuple[str, str]] = []


class CLIError(Exception):
    """A failure reported as one line on stderr, with exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class NoStore(CLIError):
    """The URL names a file store that does not exist (and the command must not create it)."""


class UsageError(Exception):
    """Arguments that argparse cannot check alone; exit status 2 like argparse's own errors."""


# -- URLs and stores ---------------------------------------------------------------------------


def _remember_secrets(url: str) -> None:
    """Note the password of ``url`` so that no message can print it."""
    scrubbed = scrub_url(url)
    if scrubbed == url:
        return
    _secrets.append((url, scrubbed))
    rest = url.partition("://")[2]
    end = min([i for i in (rest.find(c) for c in "/?#") if i != -1] or [len(rest)])
    password = rest[:end].rpartition("@")[0].partition(":")[2]
    for form in {password, unquote(password)}:
        if form:
            _secrets.append((f":{form}@", ":***@"))
            if len(form) >= 3:
                _secrets.append((form, "***"))


def _scrub(text: str) -> str:
    for secret, replacement in _secrets:
        text = text.replace(secret, replacement)
    return text


def _local_path(url: str) -> Optional[Tuple[str, str]]:
    """``(scheme, absolute path)`` of a file store URL, parsed as ``from_url`` does; else ``None``."""
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("json", "shelve", "sqlite"):
        return None
    path = unquote(rest[2:] if rest.startswith("//") else rest)
    return (scheme, os.path.abspath(path)) if path else None


def _store_exists(scheme: str, path: str) -> bool:
    if scheme == "shelve":  # dbm.dumb: PATH.dat/.dir; gdbm: PATH; ndbm: PATH.db or PATH.dir/.pag
        return any(os.path.exists(path + suffix) for suffix in ("", ".db", ".dat", ".dir", ".pag"))
    return os.path.exists(path)


def _not_a_store(scheme: str, path: str) -> Optional[str]:
    """Why the existing ``path`` cannot be a ``scheme`` store, or ``None`` (checked before opening it)."""
    if scheme == "json" and not os.path.isdir(path):
        return f"{path} is a file, not a directory of JSON sessions"
    if scheme == "sqlite":
        if os.path.isdir(path):
            return f"{path} is a directory, not a SQLite database"
        try:
            with open(path, "rb") as f:
                header = f.read(16)
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror or exc}"
        if header and header != b"SQLite format 3\x00":
            return f"{path} is not a SQLite database"
    if scheme == "shelve":
        import dbm

        kind = dbm.whichdb(path)
        if kind == "" or (kind is None and os.path.isfile(path)):
            return f"{path} is not a shelve database (dbm does not recognize it)"
    return None


def refuse_memory(url: str, verb: str) -> None:
    """A ``memory://`` destination keeps nothing once the command exits: refuse to write into it."""
    if url.partition(":")[0].lower() == "memory":
        raise CLIError(f"{verb} into {url} would keep nothing: a memory store lives only inside one "
                       f"process; give a json:, shelve:, sqlite: or redis:// URL")


def open_store(url: str, *, create: bool) -> Store:
    """The store ``url`` names; with ``create=False`` a missing file store is ``NoStore``, not created,
    and a path that is not a store of that kind is said to be so (nothing is created or changed)."""
    _remember_secrets(url)
    if not create:
        local = _local_path(url)
        if local is not None and not _store_exists(*local):
            raise NoStore(f"no store at {local[1]}")
        reason = _not_a_store(*local) if local is not None else None
        if reason is not None:
            raise CLIError(f"cannot read {scrub_url(url)}: {reason}")
    # A PostgreSQL table is created only by commands that write (like a missing file store).
    options = {"create_table": False} if not create and url.lower().startswith("postgres") else {}
    try:
        return from_url(url, **options)
    except ImportError as exc:
        extra = "postgres" if url.lower().startswith("postgres") else "redis"
        raise CLIError(f"cannot open {scrub_url(url)}: {exc}; install the extra it needs "
                       f"(pip install 'telesession[{extra}]')") from exc
    except SessionError:
        raise
    except ValueError as exc:  # a bad URL: from_url's message lists the schemes
        raise CLIError(str(exc)) from exc


def _sorted_keys(store: Store) -> List[str]:
    return sorted(set(store.keys()))


def _where(store: Store, key: str) -> Callable[[], str]:
    return lambda: store.describe(key)


def _read(store: Store, key: str) -> Optional[Tuple[bytes, Any, int, Optional[float]]]:
    """``(raw, data, version, written)`` of ``key``, ``None`` if absent; ``CorruptSessionError`` if unreadable."""
    raw = store.load(key)
    if raw is None:
        return None
    data, version, written = parse_record(raw, key, _where(store, key))
    return raw, data, version, written


def _readable(store: Store, keys: List[str], bar: "Progress", skip_corrupt: bool,
              skipped: List[CorruptSessionError]) -> Iterator[Tuple[str, Tuple[bytes, Any, int, Optional[float]]]]:
    """``(key, _read(...))`` of every stored key, advancing ``bar``; an unreadable record raises,
    or with ``skip_corrupt`` joins ``skipped``."""
    for key in keys:
        bar.advance()
        try:
            found = _read(store, key)
        except CorruptSessionError as exc:
            if not skip_corrupt:
                raise
            skipped.append(exc)
            continue
        if found is not None:
            yield key, found


@contextmanager
def _locked(store: Store, key: str, timeout: float) -> Iterator[None]:
    """Hold ``key`` as a handler would: no bot handler runs on it meanwhile."""
    token = store.acquire(key, timeout)
    try:
        yield
    finally:
        store.release(key, token)


# -- output --------------------------------------------------------------------------------------


def _json(value: Any, **options: Any) -> str:
    """JSON text that can always be written as UTF-8 (lone surrogates fall back to escapes)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, allow_nan=False, **options)
    return text


def _show_key(key: str) -> str:
    """A key as one unambiguous word: itself when plain, else quoted JSON."""
    if key and key.isprintable() and not any(c.isspace() for c in key) and not key.startswith('"'):
        return key
    return _json(key)


def _iso(written: Optional[float]) -> str:
    if written is None:
        return "-"
    return datetime.fromtimestamp(written, timezone.utc).isoformat(timespec="seconds")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _note(text: str) -> None:
    """A status line on stderr (stdout may be carrying data)."""
    sys.stderr.write(f"{PROG}: {_scrub(text)}\n")
    sys.stderr.flush()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _key_list(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class Progress:
    """Progress of a long command on ``stream`` (stderr) by ``tqdm``, with rate and time left.

    Drawn only when the stream is a terminal: piped or redirected output stays clean.
    """

    def __init__(self, label: str, total: int, stream: Optional[IO[str]] = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        stream = stream if stream is not None else sys.stderr
        try:
            self.enabled = total > 0 and stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self._bar: Any = None
        if self.enabled:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]  # only on a terminal

            try:
                sized = os.get_terminal_size(stream.fileno()).columns >= 20
            except (AttributeError, ValueError, OSError):
                sized = False
            # A terminal without a size (a bare pty) reports 0 x 0: tqdm would draw nothing.
            size: Dict[str, Any] = {"dynamic_ncols": True} if sized else {"ncols": 80, "nrows": 24}
            self._bar = tqdm(total=total, desc=label, file=stream, unit="session", leave=False,
                             mininterval=0.1, **size)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Erase the bar, so the next line starts clean."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- commands ------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """One line per session: key, record size, last-written time."""
    rows: List[Dict[str, Any]] = []
    unreadable: List[CorruptSessionError] = []
    with open_store(args.url, create=False) as store:
        for key in _sorted_keys(store):
            raw = None
            try:
                raw = store.load(key)
                if raw is None:
                    continue
                _, version, written = parse_record(raw, key, _where(store, key))
                rows.append({"key": key, "size": len(raw), "version": version, "written": written})
            except CorruptSessionError as exc:
                unreadable.append(exc)
                rows.append({"key": key, "size": None if raw is None else len(raw), "version": None,
                             "written": None, "unreadable": True})
    if args.json:
        _out(_json(rows))
    else:
        names = [_show_key(r["key"]) for r in rows]
        key_width = min(max([len(n) for n in names] + [0]), 40)
        size_width = max([len(str(r["size"])) for r in rows] + [0])
        for name, row in zip(names, rows):
            when = "UNREADABLE" if row.get("unreadable") else _iso(row["written"])
            size = "?" if row["size"] is None else row["size"]
            _out(f"{name:<{key_width}}  {size:>{size_width}}  {when}")
    if unreadable:
        raise CLIError(_unreadable_message(unreadable, args.url))
    return 0


def _with_url(text: str, url: str) -> str:
    """``text`` with the library's placeholder ``telesession rm URL KEY`` made a command one can paste."""
    if "(telesession rm URL " not in text:
        return text
    quoted = shlex.quote(scrub_url(url))
    return re.sub(r"\(telesession rm URL (.*)\)",
                  lambda m: f"(telesession rm {quoted} {shlex.quote(m.group(1))})", text, count=1)


def _unreadable_message(errors: List[CorruptSessionError], url: str) -> str:
    first = _with_url(str(errors[0]), url)
    if len(errors) == 1:
        return first
    return f"{len(errors)} unreadable sessions ({_key_list([str(e.key) for e in errors])}); first: {first}"


def _skipped_note(skipped: List[CorruptSessionError]) -> None:
    """List the records ``--skip-corrupt`` left out, each with why it does not parse."""
    _note(f"skipped {_plural(len(skipped), 'unreadable session')} (--skip-corrupt): "
          f"{_key_list([str(e.key) for e in skipped])}")
    for exc in skipped:
        _note(f"  {_show_key(str(exc.key))}: {_reason(exc)}")


def _reason(exc: CorruptSessionError) -> str:
    """Why a record does not parse, without the advice around it."""
    cause = exc.__cause__
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc)


def cmd_show(args: argparse.Namespace) -> int:
    """The session data of one key as indented JSON (``--record``: the whole record)."""
    with open_store(args.url, create=False) as store:
        raw = store.load(args.key)
        if raw is None:
            raise CLIError(f"no session {args.key!r} in {scrub_url(args.url)}")
        try:
            data, _, _ = parse_record(raw, args.key, _where(store, args.key))
        except CorruptSessionError as exc:
            if not args.record:
                raise CLIError(f"{_with_url(str(exc), args.url)}; `show --record` prints it as stored") from exc
            _stdout_raw(raw)  # what is stored, byte for byte, then why it does not parse
            raise CLIError(f"session {args.key!r} is printed as stored above, but it does not parse as a "
                           f"record ({store.describe(args.key)}): {_reason(exc)}") from exc
    value = json.loads(raw.decode("utf-8", "surrogatepass")) if args.record else data
    _out(_json(value, indent=2))
    return 0


def _stdout_raw(raw: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(raw if raw.endswith(b"\n") else raw + b"\n")
    sys.stdout.buffer.flush()


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete sessions, each under its key's lock."""
    keys = list(dict.fromkeys(args.keys))
    try:
        store = open_store(args.url, create=False)
    except NoStore:
        if args.missing_ok:
            return 0
        raise
    removed, missing = 0, []
    with store:
        for key in keys:
            with _locked(store, key, args.lock_timeout):
                try:
                    raw = store.load(key)
                except CorruptSessionError:  # unreadable records are exactly what rm is for
                    store.delete(key)
                    removed += 1
                    continue
                if raw is None:
                    missing.append(key)
                    continue
                store.delete(key, previous=raw)
                removed += 1
    if removed:
        _out(f"removed {_plural(removed, 'session')}")
    if missing and not args.missing_ok:
        also = f" ({_plural(removed, 'other session')} removed)" if removed else ""
        raise CLIError(f"no session {_key_list(missing)} in {scrub_url(args.url)}{also}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Every session as JSON lines: ``{"key", "version", "written", "data"}``."""
    to_file = args.output not in (None, "-")
    skipped: List[CorruptSessionError] = []
    with open_store(args.url, create=False) as store:
        keys = _sorted_keys(store)
        count = 0
        try:
            with (atomic_file(args.output) if to_file else _stdout_bytes()) as out, \
                    Progress("export", len(keys)) as bar:
                for key, (_, data, version, written) in _readable(store, keys, bar, args.skip_corrupt, skipped):
                    line = _json({"key": key, "version": version, "written": written, "data": data},
                                 separators=(",", ":"))
                    out.write(line.encode("utf-8") + b"\n")
                    count += 1
        except (SessionError, OSError) as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            outcome = (f"nothing was written to {args.output}" if to_file
                       else f"the output is incomplete: it stops after {_plural(count, 'session')}")
            skip = "; --skip-corrupt leaves unreadable ones out" if isinstance(exc, CorruptSessionError) else ""
            raise CLIError(f"{_with_url(str(exc), args.url)}; export failed, {outcome}{skip}") from exc
    _note(f"exported {_plural(count, 'session')}" + (f" to {args.output}" if to_file else ""))
    if skipped:
        _skipped_note(skipped)
    return 0


@contextmanager
def _stdout_bytes() -> Iterator[IO[bytes]]:
    sys.stdout.flush()
    yield sys.stdout.buffer
    sys.stdout.buffer.flush()


_FIELDS = {"key", "version", "written", "data"}


def _parse_import(blob: bytes) -> List[Tuple[int, str, int, Optional[float], str]]:
    """Validate every line of an export; ``(line, key, version, written, data_json)`` each."""
    entries: List[Tuple[int, str, int, Optional[float], str]] = []
    seen: Dict[str, int] = {}
    errors: List[str] = []
    for n, line_bytes in enumerate(blob.split(b"\n"), 1):
        if not line_bytes.strip():
            continue
        try:
            entries.append(_parse_line(n, line_bytes, seen))
        except ValueError as exc:
            errors.append(f"line {n}: {exc}")
    if errors:
        more = f" (and {_plural(len(errors) - 1, 'more bad line')})" if len(errors) > 1 else ""
        raise CLIError(f"{errors[0]}{more}; nothing was imported")
    return entries


def _parse_line(n: int, line_bytes: bytes, seen: Dict[str, int]) -> Tuple[int, str, int, Optional[float], str]:
    try:
        obj = json.loads(line_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f'expected an object {{"key": ..., "data": ...}}, got {type(obj).__name__}')
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise ValueError(f"unexpected field {unknown[0]!r} (an exported record has {sorted(_FIELDS)})")
    key = obj.get("key")
    if not isinstance(key, str):
        raise ValueError('"key" must be a string' if "key" in obj else 'no "key"')
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"key {key!r} is not valid Unicode text (a lone surrogate)") from None
    if key in seen:
        raise ValueError(f"key {key!r} already appeared on line {seen[key]}")
    seen[key] = n
    if "data" not in obj:
        raise ValueError(f'session {key!r} has no "data"')
    if not isinstance(obj["data"], dict):
        raise ValueError(f'"data" of {key!r} must be a JSON object (a session is a dict, or a dataclass\'s '
                         f'fields), not {_json_type(obj["data"])}')
    version = obj.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f'"version" of {key!r} must be an integer >= 0, not {version!r}')
    written = obj.get("written")
    if written is not None and (isinstance(written, bool) or not isinstance(written, (int, float))
                                or not math.isfinite(written)):
        raise ValueError(f'"written" of {key!r} must be a Unix time or null, not {written!r}')
    try:
        data_json = encode_data(obj["data"], key, "\0")
    except SerializationError as exc:
        raise ValueError(str(exc).replace(" (\0)", "")) from None
    return n, key, version, None if written is None else float(written), data_json


def _json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, with its article: an array, a string, a number, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _same_session(raw: bytes, key: str, version: int, data_json: str) -> bool:
    """Whether the stored record holds this data and version (its write time does not matter)."""
    try:
        data, stored_version, _ = parse_record(raw, key, "")
        return stored_version == version and encode_data(data, key, "") == data_json
    except SessionError:
        return False


def cmd_import(args: argparse.Namespace) -> int:
    """Write the sessions of an export, each under its key's lock; refuse to replace different ones."""
    refuse_memory(args.url, "importing")
    if args.file == "-":
        blob = sys.stdin.buffer.read()
    else:
        try:
            with open(args.file, "rb") as f:
                blob = f.read()
        except OSError as exc:
            raise CLIError(f"cannot read the export {args.file}: {exc.strerror or exc}; nothing was imported") \
                from None
    entries = _parse_import(blob)
    mode = "overwrite" if args.overwrite else "skip" if args.skip_existing else "refuse"
    with open_store(args.url, create=True) as store:
        if mode == "refuse":
            conflicts = []
            for _, key, version, _, data_json in entries:
                try:
                    raw = store.load(key)
                except CorruptSessionError:
                    conflicts.append(key)
                    continue
                if raw is not None and not _same_session(raw, key, version, data_json):
                    conflicts.append(key)
            if conflicts:
                raise CLIError(f"{_plural(len(conflicts), 'session')} already "
                               f"{'exists' if len(conflicts) == 1 else 'exist'} with different data "
                               f"({_key_list(conflicts)}); nothing was imported; use --overwrite to "
                               f"replace them or --skip-existing to keep them")
        imported = unchanged = skipped = 0
        late: List[str] = []
        try:
            with Progress("import", len(entries)) as bar:
                for _, key, version, written, data_json in entries:
                    bar.advance()
                    with _locked(store, key, args.lock_timeout):
                        try:
                            previous = store.load(key)
                        except CorruptSessionError:  # unreadable: replaced only with --overwrite
                            if mode == "skip":
                                skipped += 1
                                continue
                            if mode == "refuse":
                                late.append(key)
                                continue
                            store.delete(key)
                            previous = None
                        if previous is not None:
                            if _same_session(previous, key, version, data_json):
                                unchanged += 1
                                continue
                            if mode == "skip":
                                skipped += 1
                                continue
                            if mode == "refuse":  # written by someone since the check above
                                late.append(key)
                                continue
                        stamp = time.time() if written is None else written
                        store.save(key, build_record(key, data_json, version, stamp), previous=previous)
                        imported += 1
        except (SessionError, OSError) as exc:
            raise CLIError(f"{exc}; import stopped after writing {imported} of "
                           f"{_plural(len(entries), 'session')}") from exc
    summary = f"imported {_plural(imported, 'session')}"
    extras = [f"{unchanged} unchanged" if unchanged else "", f"{skipped} existing skipped" if skipped else ""]
    extras = [e for e in extras if e]
    _out(summary + (f" ({', '.join(extras)})" if extras else ""))
    if late:
        raise CLIError(f"{_plural(len(late), 'session')} changed while importing and were left as they are "
                       f"({_key_list(late)}); use --overwrite to replace them")
    return 0


def cmd_import_states(args: argparse.Namespace) -> int:
    """Copy the states of telebot's ``StatePickleStorage`` file into a ``StateStorage`` on URL."""
    import pickle

    from .states import StateStorage, import_pickle

    mode = "overwrite" if args.overwrite else "skip" if args.skip_existing else "refuse"
    with open_store(args.url, create=True) as store:
        try:
            counts = import_pickle(StateStorage(store, lock_timeout=args.lock_timeout), args.file,
                                   prefix=args.prefix, separator=args.separator, bot_id=args.bot_id, mode=mode)
        except (ValueError, pickle.UnpicklingError, EOFError) as exc:
            raise CLIError(f"{args.file}: {exc}") from exc
    extras = [f"{counts[k]} {k}" for k in ("unchanged", "skipped") if counts[k]]
    _out(f"imported {_plural(counts['imported'], 'state')}" + (f" ({', '.join(extras)})" if extras else ""))
    return 0


def _digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy every record byte for byte to another store, then read everything back to verify it."""
    src_name, dst_name = scrub_url(args.src), scrub_url(args.dst)
    refuse_memory(args.dst, "migrating")
    local = _local_path(args.dst)
    # A destination that does not exist yet holds nothing to overwrite; it is created only once
    # the source has been checked, so a refused migration leaves no empty store behind.
    dst_exists = local is None or _store_exists(*local)
    with open_store(args.src, create=False) as src:
        dst = open_store(args.dst, create=True) if dst_exists else None
        try:
            if dst is not None and src.location == dst.location:
                raise CLIError(f"{src_name} and {dst_name} are the same store")
            keys = _sorted_keys(src)
            conflicts = []
            skipped: List[CorruptSessionError] = []
            with Progress("check", len(keys)) as bar:
                for key in keys:
                    bar.advance()
                    try:
                        found = _read(src, key)
                    except CorruptSessionError as exc:  # stop before copying anything
                        if args.skip_corrupt:
                            skipped.append(exc)
                            continue
                        raise CLIError(f"{_with_url(str(exc), args.src)}; nothing was copied "
                                       f"(--skip-corrupt copies the others)") from exc
                    if found is not None and dst is not None and _differs(dst, key, found[0]):
                        conflicts.append(key)
            if conflicts and not args.overwrite:
                raise CLIError(f"{_plural(len(conflicts), 'session')} of {src_name} already "
                               f"{'exists' if len(conflicts) == 1 else 'exist'} in "
                               f"{dst_name} with different records ({_key_list(conflicts)}); nothing was "
                               f"copied; use --overwrite to replace them")
            if dst is None:
                dst = open_store(args.dst, create=True)
            left_out = {str(e.key) for e in skipped}
            copied = _copy(src, dst, [k for k in keys if k not in left_out], args, src_name, dst_name,
                           skipped)
        finally:
            if dst is not None:
                dst.close()
    _out(f"copied {_plural(len(copied), 'session')}, verified")
    if skipped:
        _skipped_note(skipped)
    return 0


def _differs(dst: Store, key: str, raw: bytes) -> bool:
    """Whether copying ``raw`` to ``key`` would replace something else (an unreadable record included)."""
    try:
        existing = dst.load(key)
    except CorruptSessionError:
        return True
    return existing is not None and existing != raw


def _copy(src: Store, dst: Store, keys: List[str], args: argparse.Namespace, src_name: str,
          dst_name: str, skipped: List[CorruptSessionError]) -> Dict[str, bytes]:
    """Copy the records of ``keys`` under the destination's key locks, then verify; key -> SHA-256.

    With ``--skip-corrupt`` a record that became unreadable since the check joins ``skipped``."""
    copied: Dict[str, bytes] = {}  # key -> SHA-256 of the record copied
    try:
        with Progress("migrate", len(keys)) as bar:
            for key, found in _readable(src, keys, bar, args.skip_corrupt, skipped):
                raw = found[0]
                with _locked(dst, key, args.lock_timeout):
                    if not args.overwrite and _differs(dst, key, raw):
                        raise ConflictError(f"session {key!r} was written to {dst_name} during the "
                                            f"migration; it was left as it is", key)
                    try:
                        previous = dst.load(key)
                    except CorruptSessionError:  # --overwrite: the unreadable record goes
                        dst.delete(key)
                        previous = None
                    if previous != raw:
                        dst.save(key, raw, previous=previous)
                copied[key] = _digest(raw)
    except (SessionError, OSError, KeyboardInterrupt) as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        raise CLIError(
            f"migration failed after copying {len(copied)} of {_plural(len(keys), 'session')}: {reason}; "
            f"{dst_name} is now PARTIAL (it holds {len(copied)} of them): fix the cause and run the "
            f"migration again with --overwrite",
            130 if isinstance(exc, KeyboardInterrupt) else 1) from exc
    _verify(src, dst, copied, src_name, dst_name, {str(e.key) for e in skipped})
    return copied


def _verify(src: Store, dst: Store, copied: Dict[str, bytes], src_name: str, dst_name: str,
            skipped: Set[str]) -> None:
    """The destination holds every copied record, byte for byte, and the source did not move meanwhile."""
    dst_keys = set(dst.keys())
    present = [k for k in copied if k in dst_keys]
    differ = [k for k in present if _digest(dst.load(k) or b"") != copied[k]]
    if len(present) != len(copied) or differ:
        missing = [k for k in copied if k not in dst_keys]
        details = "; ".join(part for part in (
            f"{len(missing)} missing ({_key_list(missing)})" if missing else "",
            f"{len(differ)} read back different ({_key_list(differ)})" if differ else "") if part)
        raise CLIError(f"verification failed: {dst_name} has {len(present) - len(differ)} of the "
                       f"{len(copied)} sessions copied from {src_name}: {details}; run the migration "
                       f"again with --overwrite")
    src_now = [k for k in _sorted_keys(src) if k not in skipped]
    changed = [k for k in src_now if k not in copied or _digest(src.load(k) or b"") != copied[k]]
    still_there = set(src_now)
    gone = [k for k in copied if k not in still_there]
    if changed or gone:
        raise CLIError(f"copied {_plural(len(copied), 'session')} to {dst_name}, but {src_name} changed "
                       f"while copying ({_key_list(changed + gone)}): stop the bot and run the migration "
                       f"again with --overwrite")


def cmd_purge_expired(args: argparse.Namespace) -> int:
    """Delete sessions not written for ``--ttl`` seconds (or the store's own expired ones)."""
    with open_store(args.url, create=False) as store:
        if args.ttl is None:
            native = getattr(store, "purge_expired", None)
            if not callable(native):
                raise UsageError(f"--ttl is required: {type(store).__name__} keeps no expiry of its own")
            _out(f"removed {_plural(native(), 'expired session')}")
            return 0
        cutoff = time.time() - args.ttl
        keys = _sorted_keys(store)
        removed, busy = 0, []
        unreadable: List[CorruptSessionError] = []

        def expired(key: str) -> Optional[bytes]:
            found = _read(store, key)
            if found is None or found[3] is None or found[3] >= cutoff:
                return None
            return found[0]

        with Progress("purge", len(keys)) as bar:
            for key in keys:
                bar.advance()
                try:
                    if expired(key) is None:
                        continue
                    with _locked(store, key, args.lock_timeout):
                        raw = expired(key)  # again under the lock: a handler may just have written it
                        if raw is not None:
                            store.delete(key, previous=raw)
                            removed += 1
                except CorruptSessionError as exc:  # never delete what nobody can read
                    unreadable.append(exc)
                except LockTimeout:
                    busy.append(key)
    _out(f"removed {_plural(removed, 'expired session')}"
         + (f"; {len(busy)} in use left alone ({_key_list(busy)})" if busy else ""))
    if unreadable:
        raise CLIError(f"left alone: {_unreadable_message(unreadable, args.url)}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Number of sessions, total size, oldest and newest write."""
    count = total = 0
    oldest: Optional[Tuple[float, str]] = None
    newest: Optional[Tuple[float, str]] = None
    unreadable: List[CorruptSessionError] = []
    with open_store(args.url, create=False) as store:
        for key in _sorted_keys(store):
            try:
                raw = store.load(key)
                if raw is None:
                    continue
                count += 1
                total += len(raw)
                _, _, written = parse_record(raw, key, _where(store, key))
            except CorruptSessionError as exc:
                unreadable.append(exc)
                continue
            if written is not None:
                oldest = min(oldest, (written, key)) if oldest else (written, key)
                newest = max(newest, (written, key)) if newest else (written, key)
    if args.json:
        _out(_json({"sessions": count, "total_bytes": total, "unreadable": len(unreadable),
                    "oldest_written": oldest and oldest[0], "oldest_key": oldest and oldest[1],
                    "newest_written": newest and newest[0], "newest_key": newest and newest[1]}))
    else:
        _out(f"sessions:        {count}")
        _out(f"total size:      {total} bytes")
        _out(f"oldest written:  {_iso(oldest[0]) + '  ' + _show_key(oldest[1]) if oldest else '-'}")
        _out(f"newest written:  {_iso(newest[0]) + '  ' + _show_key(newest[1]) if newest else '-'}")
        if unreadable:
            _out(f"unreadable:      {len(unreadable)}")
    if unreadable:
        raise CLIError(_unreadable_message(unreadable, args.url))
    return 0


# -- the parser and main ---------------------------------------------------------------------------


def _number_of_seconds(text: str, *, zero: bool) -> float:
    """``text`` as seconds; one wording for every bad value (a word, ``nan``, ``-5`` or, unless ``zero``, ``0``)."""
    bound = ">= 0" if zero else "> 0"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"must be a number of seconds {bound}, not {text!r}")
    return value


def _seconds(text: str) -> float:
    return _number_of_seconds(text, zero=True)


def _positive_seconds(text: str) -> float:
    return _number_of_seconds(text, zero=False)


_EPILOG = f"""\
store URLs: {SCHEMES}
exit status: 0 done, 1 failed (one line on stderr), 2 usage error, 130 interrupted"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``telesession`` command."""
    from . import __version__

    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
    locking = argparse.ArgumentParser(add_help=False)
    locking.add_argument("--lock-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                         help="how long to wait for a key a bot's handler holds (default: 10)")

    parser = argparse.ArgumentParser(prog=PROG, description="Inspect and maintain telesession stores.",
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str,
                parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=_EPILOG, parents=[verbose, *parents],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func, command_parser=p)
        return p

    p = command("ls", cmd_ls, "list sessions: key, size in bytes, last written (UTC)")
    p.add_argument("url", metavar="URL")
    p.add_argument("--json", action="store_true", help="a JSON array of {key, size, version, written}")

    p = command("show", cmd_show, "print the data of one session as JSON")
    p.add_argument("url", metavar="URL")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--record", action="store_true", help="the whole record: version, written, key, data")

    p = command("rm", cmd_rm, "delete sessions, each under its key's lock", [locking])
    p.add_argument("url", metavar="URL")
    p.add_argument("keys", metavar="KEY", nargs="+")
    p.add_argument("--missing-ok", action="store_true", help="a key that does not exist is not an error")

    p = command("export", cmd_export, "write every session as JSON lines {key, version, written, data}")
    p.add_argument("url", metavar="URL")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE (atomically, mode 0600) instead of stdout")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave unreadable records out and list them at the end (default: stop at the first)")

    p = command("import", cmd_import, "write the sessions of an export (JSON lines) into a store", [locking])
    p.add_argument("url", metavar="URL")
    p.add_argument("file", metavar="FILE", nargs="?", default="-", help="the export to read (default: stdin)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace existing sessions with other data")
    group.add_argument("--skip-existing", action="store_true", help="keep existing sessions, import the rest")

    p = command("migrate", cmd_migrate, "copy every session to another store byte for byte, then verify",
                [locking])
    p.add_argument("src", metavar="SRC_URL")
    p.add_argument("dst", metavar="DST_URL")
    p.add_argument("--overwrite", action="store_true", help="replace sessions that exist in DST_URL")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="copy the readable records, list the unreadable ones at the end (default: copy nothing)")

    p = command("purge-expired", cmd_purge_expired,
                "delete sessions not written for --ttl seconds (without --ttl: the store's own expiry)",
                [locking])
    p.add_argument("url", metavar="URL")
    p.add_argument("--ttl", type=_positive_seconds, metavar="SECONDS",
                   help="age of the last write beyond which a session is deleted")

    p = command("import-states", cmd_import_states,
                "copy the states of telebot's StatePickleStorage file into a telesession.StateStorage",
                [locking])
    p.add_argument("url", metavar="URL")
    p.add_argument("file", metavar="FILE", help="the StatePickleStorage file (e.g. .state-save/states.pkl)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace existing states with other values")
    group.add_argument("--skip-existing", action="store_true", help="keep existing states, import the rest")
    p.add_argument("--bot-id", type=int, help="the bot id for keys written without one")
    p.add_argument("--prefix", default="telebot", help="the StatePickleStorage prefix (default: telebot)")
    p.add_argument("--separator", default=":", help="the StatePickleStorage separator (default: :)")

    p = command("stats", cmd_stats, "number of sessions, total size, oldest and newest write")
    p.add_argument("url", metavar="URL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _one_line(text: str) -> str:
    return _scrub(re.sub(r"\s*\n\s*", " ", text.strip()))


@contextmanager
def _command_logging(verbose: bool) -> Iterator[None]:
    """The library's log lines on stderr as ``telesession: LEVEL: ...`` while a command runs;
    the logger is put back as it was afterwards (``main`` may be called from a program)."""
    logger = logging.getLogger("telesession")
    if logger.handlers:  # the calling program configured it: leave it alone
        yield
        return
    level, propagate = logger.level, logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``telesession`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with _command_logging(bool(getattr(args, "verbose", False))):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command ``args`` names, its failures turned into one line on stderr and an exit status."""
    verbose = bool(getattr(args, "verbose", False))
    try:
        status = args.func(args)
        sys.stdout.flush()
        return status
    except UsageError as exc:
        args.command_parser.error(_one_line(str(exc)))  # exits 2
        raise  # pragma: no cover
    except BrokenPipeError:  # `telesession ls URL | head`: the reader left, nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except (CLIError, SessionError, OSError) as exc:
        if verbose:
            traceback.print_exc()
        code = exc.code if isinstance(exc, CLIError) else 1
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and not isinstance(exc, SessionError) and exc.strerror:
            message = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror  # not "[Errno 2] ..."
        url = getattr(args, "url", None) or getattr(args, "src", None)
        if url:
            message = _with_url(message, url)
        if isinstance(exc, LockTimeout) and hasattr(args, "lock_timeout"):
            message += f" (this command waited --lock-timeout {args.lock_timeout:g} s)"
        sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
        return code
    except Exception as exc:  # a bug: still one line, the traceback on request
        if verbose:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
                         f"(run again with --verbose for the traceback)\n")
        return 1
