"""The record format every store holds, and strict JSON for session values.

A record is one UTF-8 JSON object::

    {"version": 2, "written": 1764064000.123, "key": "123", "data": {"count": 7}}

``data`` is the session (a dataclass session is stored as its fields, see ``telesession.typed``),
``version`` the schema version it was written with (``Sessions(version=...)``),
``written`` the Unix time of the write (what ``ttl`` measures from) and ``key``
the full stored key (with the manager's namespace, ``"session:123"``), so a record is
self-describing wherever it is found.

Values must survive a JSON round trip exactly: dicts with ``str`` keys, lists,
``str``, ``int``, finite ``float``, ``bool`` and ``None``.  Anything else (a
tuple, an ``int`` dict key, a ``set``, ``bytes``, ``nan``, an object) raises
``SerializationError`` naming the path, e.g. ``session["cart"][2]``, instead of
being silently changed.

Encoding and decoding use ``msgspec`` (about 20x faster than the ``json``
module for a small session).  ``msgspec`` writes some values ``json`` refuses
(tuples and sets as arrays, ``bytes`` as base64, ``nan`` as ``null``), so every
encoded session is decoded again and compared with what was encoded: anything
that would not read back equal is refused, and ``_explain`` names the path.
"""
import dataclasses
import json
import json.scanner
import math
from typing import Any, Callable, Optional, Tuple, Union

import msgspec

from .errors import CorruptSessionError, SerializationError

__all__ = ["encode_data", "encode_json", "check_round_trip", "build_record", "parse_record", "read_record"]

_msgspec_encode = msgspec.json.Encoder().encode
_msgspec_decode = msgspec.json.Decoder().decode
_DecodeError = msgspec.DecodeError  # ValidationError (an int too long) is a subclass
#: What ``msgspec`` raises for a record it will not read: 0.20 (the last release for Python 3.9)
#: raises ``UnicodeDecodeError`` for invalid UTF-8, such as a lone surrogate an older version wrote.
NOT_READ = (msgspec.DecodeError, UnicodeDecodeError)


def _make_std_decoder() -> Callable[[str], Any]:
    """The ``json`` module's strict decoder: the fallback for records ``msgspec`` will not read
    (invalid UTF-8 written by an older version, numbers beyond a double such as ``1e400``)."""
    decoder = json.JSONDecoder()
    scan = json.scanner.make_scanner(decoder)  # type: ignore[arg-type]
    slow = decoder.decode

    def decode(text: str) -> Any:
        try:
            value, end = scan(text, 0)
        except StopIteration:
            return slow(text)
        if end != len(text):
            return slow(text)  # trailing whitespace is fine, trailing garbage raises
        return value

    return decode


_std_decode = _make_std_decoder()
_std_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]
_std_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _encode_key(key: str) -> bytes:
    """A key as a JSON string, byte for byte what ``json`` writes (lone surrogates kept, as before)."""
    try:
        return _msgspec_encode(key)
    except UnicodeEncodeError:
        return _std_encode_str(key).encode("utf-8", "surrogatepass")


#: The layout of every record (``version``, ``written``, the key and the data as JSON).
RECORD = b'{"version":%d,"written":%.6f,"key":%b,"data":%b}'
#: The same with ``written`` already encoded: the hot path writes ``msgspec``'s encoding of
#: ``time.time()`` (the float's shortest round-trip form), which takes half the time of
#: ``%.6f`` or of splitting ``time_ns()`` into seconds and microseconds.
RECORD_ENCODED = b'{"version":%d,"written":%b,"key":%b,"data":%b}'

#: Where a record lives, for error messages: a string, or a callable computing it only when needed.
Where = Union[str, Callable[[], str]]


def _where(where: Where) -> str:
    return where if isinstance(where, str) else where()


def encode_json(plain: Any, key: str, where: Where, root: str = "session") -> bytes:
    """Session data as compact JSON bytes, checked to read back equal; ``SerializationError`` names the path.

    The check is one ``msgspec`` decode and one ``==``: it refuses what ``msgspec`` would
    silently change (a tuple or set becomes a list, ``nan`` becomes ``null``, an ``int`` key
    a string, ``bytes`` base64), whether or not the session changed.
    """
    try:
        try:
            text = _msgspec_encode(plain)
            same = _msgspec_decode(text) == plain
        except UnicodeEncodeError:  # a lone surrogate: written as the json module always did
            text = _std_encode(plain).encode("utf-8", "surrogatepass")
            same = _std_decode(text.decode("utf-8", "surrogatepass")) == plain
        if same:
            return text
        error: Optional[BaseException] = None
    except (TypeError, ValueError, OverflowError, RecursionError, _DecodeError) as exc:
        error = exc
    explained = _explain(plain, key, where, root)
    if explained is not None:
        raise explained from error
    if error is None:
        raise SerializationError(f"session {key!r} would not read back as written ({_where(where)})",
                                 key, _where(where), root)
    raise SerializationError(f"session {key!r} cannot be stored ({_where(where)}): {error}",
                             key, _where(where), root) from error


def encode_data(plain: Any, key: str, where: Where, root: str = "session") -> str:
    """``encode_json`` as text."""
    return encode_json(plain, key, where, root).decode("utf-8", "surrogatepass")


def check_round_trip(plain: Any, text: Union[str, bytes], key: str, where: Where, root: str = "session") -> None:
    """Refuse data that JSON would silently change (tuples, non-str keys) before it is written.

    ``encode_json`` already does this; kept for callers that encoded by other means."""
    try:
        try:
            same = _msgspec_decode(text) == plain
        except (_DecodeError, UnicodeError):  # a lone surrogate, as the json module writes it
            if isinstance(text, bytes):
                text = text.decode("utf-8", "surrogatepass")
            same = _std_decode(text) == plain
    except (ValueError, RecursionError):
        same = False
    if not same:
        raise _explain(plain, key, where, root) or SerializationError(
            f"session {key!r} would not read back as written ({_where(where)})", key, _where(where), root)


def build_record(key: str, data_json: Union[str, bytes], version: int, written: float) -> bytes:
    """The bytes of a record whose data is the already encoded ``data_json``."""
    if isinstance(data_json, str):
        data_json = data_json.encode("utf-8", "surrogatepass")
    try:
        key_json = _msgspec_encode(key)
    except UnicodeEncodeError:
        key_json = _encode_key(key)
    return RECORD % (version, written, key_json, data_json)


class _Record(msgspec.Struct, gc=False):
    """A record as ``read_record`` reads it (other fields, such as ``key``, are ignored)."""

    data: Any
    version: int = 0
    written: Optional[float] = None


_decode_record = msgspec.json.Decoder(_Record).decode


def read_record(raw: bytes, key: str, where: Where) -> Tuple[Any, int, Optional[float], Optional[str]]:
    """``parse_record`` plus the data's compact JSON text (``None`` when the slow path was taken).

    The whole record is decoded in one ``msgspec`` call and the data encoded again, which
    is cheaper than cutting the stored data out and decoding it separately: those bytes are
    the baseline for change detection (so a record written with spaces by another writer
    is not rewritten unless its data changed).  What ``msgspec`` will not read this way goes
    through the full ``parse_record``, which explains what is wrong.
    """
    try:
        record = _decode_record(raw)
        data = record.data
        return data, record.version, record.written, _msgspec_encode(data).decode("utf-8")
    except (*NOT_READ, RecursionError, UnicodeEncodeError):
        pass  # (UnicodeEncodeError: the data holds a lone surrogate, which msgspec will not write)
    data, version_number, written_at = parse_record(raw, key, where)
    return data, version_number, written_at, None


def parse_record(raw: bytes, key: str, where: Where) -> Tuple[Any, int, Optional[float]]:
    """``(data, version, written)`` of a stored record; ``CorruptSessionError`` if unreadable."""
    try:
        try:
            obj = _msgspec_decode(raw)
        except NOT_READ:  # what msgspec will not read, json may (see _make_std_decoder)
            obj = _std_decode(raw.decode("utf-8", "surrogatepass"))
        data = obj["data"]
        version = int(obj.get("version", 0))
        written = obj.get("written")
        written = None if written is None else float(written)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        where = _where(where)
        preview = raw[:60]
        raise CorruptSessionError(
            f"session {key!r} is unreadable ({where}): {type(exc).__name__}: {exc}; "
            f"starts with {preview!r}. It was left untouched: repair or remove it "
            f"(telesession rm URL {key})", key, where) from exc
    return data, version, written


def _explain(value: Any, key: str, where: Where, root: str) -> Optional[SerializationError]:
    """Find the first value JSON cannot store faithfully, and say where it is."""
    where = _where(where)
    stack = [(value, root)]
    seen = set()
    while stack:
        node, path = stack.pop()
        problem = None
        if isinstance(node, (bool, str, int)) or node is None:
            continue
        elif isinstance(node, float):
            if not math.isfinite(node):
                problem = f"is {node!r}, which JSON cannot hold"
        elif isinstance(node, dict):
            if id(node) in seen:
                problem = "refers back to itself (a cycle)"
            else:
                seen.add(id(node))
                for k, v in node.items():
                    if not isinstance(k, str):
                        return SerializationError(
                            f"session {key!r} cannot be stored ({where}): {path} has the key {k!r} "
                            f"of type {type(k).__name__}; JSON keys must be strings (use str({k!r}))",
                            key, where, path)
                    stack.append((v, f"{path}[{json.dumps(k, ensure_ascii=False)}]"))
        elif isinstance(node, list):
            if id(node) in seen:
                problem = "refers back to itself (a cycle)"
            else:
                seen.add(id(node))
                stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            problem = (f"is a {type(node).__name__} dataclass; only the session itself may be a "
                       f"dataclass (store its fields as a dict)")
        elif isinstance(node, tuple):
            problem = "is a tuple, which JSON would turn into a list; use a list"
        else:
            problem = f"is a {type(node).__name__}, which JSON cannot store"
        if problem:
            return SerializationError(
                f"session {key!r} cannot be stored ({where}): {path} {problem}", key, where, path)
    return None
