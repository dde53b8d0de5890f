"""Typed sessions: a dataclass session encoded to, and checked against, the JSON record format.

A session whose ``initial`` is a dataclass is stored as a JSON object of its
fields, encoded and decoded with ``msgspec``:

* nested dataclasses → objects; ``datetime`` → RFC 3339 text (``"2024-05-01T12:00:00Z"``,
  naive datetimes without an offset); ``date`` → ``"2024-05-01"``; ``Enum`` → its value;
  ``tuple``/``set``/``frozenset`` → arrays (sets sorted, so an unchanged set is not rewritten);
  ``dict`` → objects (``int`` keys as strings); ``Optional`` → the value or ``null``.
* On load every field is checked against its annotation: a value that does not fit is a
  ``CorruptSessionError`` naming the key and the field, and the record is left untouched.
  A field missing from the record takes its default; a stored field the class no longer
  has is dropped the next time the session is saved (one INFO line then).

The objects handed to handlers are instances of a transparent subclass of the
user's dataclass (``session_class``) that refuses attributes which are not fields,
so a typo raises ``AttributeError`` instead of vanishing on the next load.
Dict sessions never come here: they keep the strict JSON rules of ``records``.
"""
import dataclasses
import logging
import operator
import re
import threading
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple, Union

import msgspec

from .errors import CorruptSessionError, SerializationError

__all__ = ["is_dataclass_type", "session_class", "adopt", "to_plain", "from_plain", "encode_typed",
           "check_typed", "field_names", "reset_in_place"]

logger = logging.getLogger("telesession")

#: Where a record lives, for error messages: a string, or a callable computing it only when needed.
Where = Union[str, Callable[[], str]]

_classes: Dict[type, type] = {}
_classes_mutex = threading.Lock()


def _where(where: Where) -> str:
    return where if isinstance(where, str) else where()


def is_dataclass_type(value: Any) -> bool:
    return isinstance(value, type) and dataclasses.is_dataclass(value)


_field_names: Dict[type, FrozenSet[str]] = {}


def field_names(cls: type) -> FrozenSet[str]:
    """The names of ``cls``'s dataclass fields (what a record of it may hold), computed once."""
    names = _field_names.get(cls)
    if names is None:
        names = _field_names[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    return names


def session_class(cls: type) -> type:
    """The guarded subclass of dataclass ``cls`` whose instances handlers get (one per class).

    It adds no state (``__slots__ = ()``), keeps ``cls``'s name, equality and hash
    (``Order(...) == session`` holds), and raises ``AttributeError`` on assignment of
    an attribute that is not a field.
    """
    guarded = _classes.get(cls)
    if guarded is not None:
        return guarded
    with _classes_mutex:
        guarded = _classes.get(cls)
        if guarded is None:
            guarded = _make_session_class(cls)
            _classes[cls] = guarded
    return guarded


def _make_session_class(cls: type) -> type:
    names = field_names(cls)
    ordered = [f.name for f in dataclasses.fields(cls) if f.compare]
    base_setattr: Any = cls.__setattr__
    compares = getattr(cls, "__dataclass_params__").eq

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if name not in names:
            raise AttributeError(
                f"{cls.__name__} has no field {name!r} (fields: {', '.join(sorted(names))}); "
                f"a session only keeps its dataclass fields")
        base_setattr(self, name, value)

    def __eq__(self: Any, other: Any) -> Any:
        # As the dataclass compares, but a plain instance of the user's class counts as the same class.
        if not compares:
            return self is other
        if type(other) is not type(self) and type(other) is not cls:
            return NotImplemented
        return [getattr(self, n) for n in ordered] == [getattr(other, n) for n in ordered]

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        # pickle and copy see the user's class: a copy is a plain instance of it.
        return _rebuild, (cls, {f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    namespace = {
        "__slots__": (),
        "__setattr__": __setattr__,
        "__eq__": __eq__,
        "__reduce_ex__": __reduce_ex__,
        "__hash__": cls.__hash__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), namespace)


def _rebuild(cls: type, values: Dict[str, Any]) -> Any:
    """A plain instance of dataclass ``cls`` with these field values (how a session pickles)."""
    plain: Any = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(plain, name, value)
    return plain


def adopt(value: Any, cls: type) -> Any:
    """Make ``value`` (an instance of ``cls``) an instance of its guarded class, in place."""
    guarded = session_class(cls)
    if type(value) is cls:
        object.__setattr__(value, "__class__", guarded)
    return value


def reset_in_place(value: Any, fresh: Any) -> None:
    """Give ``value`` every field of ``fresh`` (how a typed session is deleted: references stay valid)."""
    for f in dataclasses.fields(fresh):
        object.__setattr__(value, f.name, getattr(fresh, f.name))


def to_plain(value: Any) -> Any:
    """The JSON-able form of a session: a dataclass becomes a dict of its fields (rich types encoded)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return msgspec.to_builtins(value, order="deterministic", str_keys=True)
    return value


_encode_ordered = msgspec.json.Encoder(order="deterministic").encode


def encode_typed(value: Any, key: str, where: Where, root: str = "session") -> bytes:
    """Compact JSON of dataclass session ``value`` (sets and dict keys sorted, so equal sessions
    encode equally)."""
    try:
        try:
            return _encode_ordered(value)
        except TypeError:  # msgspec sorts only str-keyed dicts: make the keys str first (same bytes)
            return msgspec.json.encode(msgspec.to_builtins(value, order="deterministic", str_keys=True))
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        where = _where(where)
        raise SerializationError(
            f"session {key!r} cannot be stored ({where}): {exc}", key, where, root) from exc


def check_typed(value: Any, text: Union[bytes, str], cls: type, key: str, where: Where,
                root: str = "session") -> None:
    """Refuse a session that would not load back as ``cls`` with the same values, naming the field.

    Catches an ``int`` in a ``str`` field (a record every later load would refuse)
    and a tuple in a ``list`` field (it would silently come back a list).
    """
    try:
        back: Any = msgspec.json.decode(text, type=cls, strict=True)
    except msgspec.ValidationError as exc:
        where = _where(where)
        path = _path(exc, root)
        raise SerializationError(
            f"session {key!r} cannot be stored ({where}): {path} does not fit {cls.__name__}: "
            f"{_reason(exc)}", key, where, path) from exc
    except Exception as exc:  # a __post_init__ that refuses what would be read back
        where = _where(where)
        raise SerializationError(
            f"session {key!r} cannot be stored ({where}): it would not load back as {cls.__name__}: "
            f"{type(exc).__name__}: {exc}", key, where, root) from exc
    if not _same(back, value, cls):
        where = _where(where)
        path = _first_difference(back, value, root)
        raise SerializationError(
            f"session {key!r} cannot be stored ({where}): {path} would not read back as written "
            f"(its value does not match the field's annotation)", key, where, path)


def _same(back: Any, value: Any, cls: type) -> bool:
    # Equality tells a tuple from a list and a set from a list: what would change on reload.
    values = _values.get(cls)
    if values is None:
        names = [f.name for f in dataclasses.fields(cls)]
        values = _values[cls] = operator.attrgetter(*names) if names else (lambda _: ())
    return bool(values(back) == values(value))


_values: Dict[type, Callable[[Any], Any]] = {}  # class -> its field values, read in one C call


def _first_difference(back: Any, value: Any, root: str) -> str:
    for f in dataclasses.fields(value):
        x, y = getattr(back, f.name), getattr(value, f.name)
        if x != y:
            return f"{root}.{f.name}"
    return root


_AT = re.compile(r" - at (`key` in )?`\$([^`]*)`$")


def _path(exc: msgspec.ValidationError, root: str) -> str:
    """``$.addrs[0].street`` in msgspec's message → ``session.addrs[0].street``."""
    found = _AT.search(str(exc))
    return root if found is None else root + found.group(2)


def _reason(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    found = _AT.search(text)
    if found is None:
        return text
    return text[:found.start()] + (" (in a key)" if found.group(1) else "")


def from_plain(cls: Optional[type], data: Any, key: str, where: Where) -> Tuple[Any, List[str]]:
    """Rebuild a session of dataclass ``cls`` from stored ``data``: ``(session, dropped field names)``.

    ``cls=None`` (a dict session) returns ``data`` as it is.  A value that does not fit
    its field raises ``CorruptSessionError`` naming the key and the field.
    """
    if cls is None:
        return data, []
    if not isinstance(data, dict):
        where = _where(where)
        raise CorruptSessionError(
            f"session {key!r} ({where}) does not match {cls.__name__}: its data is a "
            f"{type(data).__name__}, not an object of fields; it was left untouched: add a migration "
            f"(Sessions(version=..., migrations=...)) or fix the record", key, where)
    try:
        value: Any = msgspec.convert(data, cls, strict=True, str_keys=True)
    except msgspec.ValidationError as exc:
        where = _where(where)
        path = _path(exc, "session")
        raise CorruptSessionError(
            f"session {key!r} ({where}) does not match {cls.__name__}: field {path}: {_reason(exc)}; "
            f"it was left untouched: add a migration (Sessions(version=..., migrations=...)) or fix "
            f"the record", key, where) from exc
    except Exception as exc:  # a __post_init__ that refused the values (any exception it raises)
        where = _where(where)
        raise CorruptSessionError(
            f"session {key!r} ({where}) does not match {cls.__name__}: {type(exc).__name__}: {exc}; "
            f"it was left untouched", key, where) from exc
    names = field_names(cls)
    dropped = [] if names.issuperset(data) else [name for name in data if name not in names]
    return adopt(value, cls), dropped
