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
tuple, an ``int`` dict key, a ``set``, ``nan``) raises ``SerializationError``
naming the path, e.g. ``session["cart"][2]``, instead of being silently changed.
"""
import dataclasses
import json
import json.scanner
import math
import re
from typing import Any, Callable, Optional, Tuple, Union

from .errors import CorruptSessionError, SerializationError

__all__ = ["encode_data", "check_round_trip", "build_record", "parse_record", "read_record"]

def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _make_encoder() -> Callable[[Any], str]:
    """Compact, strict JSON; the C encoder called directly (one shot, no Python layers) when present."""
    try:
        from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]

        if c_make_encoder is None:
            raise ImportError
        chunks = c_make_encoder(None, _refuse, encode_basestring, None, ":", ",", False, False, False)
        join = "".join

        def encode(value: Any) -> str:
            if isinstance(value, str):
                return encode_basestring(value)
            return join(chunks(value, 0))

        encode({"probe": [1, 2.5, None, True, "é"]})
        return encode
    except Exception:  # pragma: no cover - another Python implementation
        return json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _make_decoder() -> Callable[[str], Any]:
    """Strict JSON decoding without the whitespace handling of ``json.loads`` (we write no whitespace)."""
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


# The numbers build_record writes, as JSON spells them (int() and float() accept more: "007", "5.").
_VERSION = re.compile(r"0|[1-9][0-9]*")
_WRITTEN = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")

_encode = _make_encoder()
_decode = _make_decoder()

#: Where a record lives, for error messages: a string, or a callable computing it only when needed.
Where = Union[str, Callable[[], str]]


def _where(where: Where) -> str:
    return where if isinstance(where, str) else where()


def encode_data(plain: Any, key: str, where: Where, root: str = "session") -> str:
    """Serialize session data to compact JSON; ``SerializationError`` names the offending path."""
    try:
        return _encode(plain)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _explain(plain, key, where, root) or SerializationError(
            f"session {key!r} cannot be stored ({_where(where)}): {exc}", key, _where(where), root) from exc


def check_round_trip(plain: Any, text: str, key: str, where: Where, root: str = "session") -> None:
    """Refuse data that JSON would silently change (tuples, non-str keys) before it is written."""
    if _decode(text) != plain:
        raise _explain(plain, key, where, root) or SerializationError(
            f"session {key!r} would not read back as written ({_where(where)})", key, _where(where), root)


def build_record(key: str, data_json: str, version: int, written: float) -> bytes:
    """The bytes of a record whose data is the already encoded ``data_json``."""
    return ('{"version":%d,"written":%.6f,"key":%s,"data":%s}'
            % (version, written, _encode(key), data_json)).encode("utf-8", "surrogatepass")


def read_record(raw: bytes, key: str, where: Where) -> Tuple[Any, int, Optional[float], Optional[str]]:
    """``parse_record`` plus the data's JSON text (``None`` if the record is not in our own shape).

    A record exactly as ``build_record`` makes it for ``key`` is cut at its fixed
    field boundaries and only its data is decoded: the data text doubles as the
    baseline for change detection, so an unchanged session is never re-encoded to
    compare.  Anything else goes through the full, strict ``parse_record``.
    """
    try:
        text = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        text = ""
    if text.startswith('{"version":') and text.endswith("}"):
        w = text.find(',"written":', 11)
        k = text.find(',"key":', w + 11)
        d = text.find(',"data":', k + 7)  # the key before it is a JSON string: its quotes are escaped
        if 11 < w < k < d:
            version, written = text[11:w], text[w + 11:k]
            if _VERSION.fullmatch(version) and _WRITTEN.fullmatch(written) and text[k + 7:d] == _encode(key):
                data_json = text[d + 8:-1]
                try:
                    return _decode(data_json), int(version), float(written), data_json
                except (ValueError, RecursionError):
                    pass  # the full parse below explains what is wrong
    data, version_number, written_at = parse_record(raw, key, where)
    return data, version_number, written_at, None


def parse_record(raw: bytes, key: str, where: Where) -> Tuple[Any, int, Optional[float]]:
    """``(data, version, written)`` of a stored record; ``CorruptSessionError`` if unreadable."""
    try:
        obj = _decode(raw.decode("utf-8", "surrogatepass"))
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
        if isinstance(node, bool) or node is None or isinstance(node, (str, int)):
            continue
        if isinstance(node, float):
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
