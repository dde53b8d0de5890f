"""``StateStorage``: telebot's states API (``set_state``, ``StateFilter``, ``retrieve_data``,
States V2 ``StateContext``) on any telesession store, with its locking and write rules.

    bot = telebot.TeleBot(TOKEN, state_storage=StateStorage("sqlite:bot.db"))

telebot's own storages read, copy and write a state's data without a lock, so two
handlers of one user lose each other's changes; they save even when the
``with bot.retrieve_data(...)`` block raised, and swallow that exception.  Here the
block holds the key's lock (the store's own per-key lock, across threads and,
where the store reaches, processes), saves only when the block succeeded and only
what changed, and lets the exception propagate.

Each state is one record in the session record format (``telesession.records``),
its data ``{"state": NAME_OR_NULL, "data": {...}}``, stored under the key
``telebot-states:{bot_id}:{chat_id}:{user_id}:{thread_id}:{business_connection_id}``
(``-`` for a part that is absent).  The prefix holds a ``-``, which no session
manager's name (a Python identifier) can, so states never collide with sessions on
the same store.
"""
import copy
import logging
import pickle
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .errors import CorruptSessionError
from .records import build_record, check_round_trip, encode_data, read_record
from .stores.base import Store

try:
    from telebot.storage.base_storage import StateStorageBase
except ImportError:  # pragma: no cover - telebot is a dependency; keep the error readable on use
    StateStorageBase = object  # type: ignore[assignment,misc]

__all__ = ["StateStorage", "STATE_PREFIX", "state_key", "parse_telebot_key", "import_pickle"]

logger = logging.getLogger("telesession")

#: Where state records live in a store; a manager's name cannot contain ``-``.
STATE_PREFIX = "telebot-states:"

_EMPTY = "{}"


def _part(value: Any) -> str:
    # telebot leaves a part out when it is falsy (``if bot_id:``); "-" keeps the positions fixed.
    return str(value) if value else "-"


def state_key(chat_id: Any, user_id: Any, business_connection_id: Optional[str] = None,
              message_thread_id: Optional[int] = None, bot_id: Optional[int] = None,
              prefix: str = STATE_PREFIX) -> str:
    """The stored key of one state: the same parts as telebot's keys, each in a fixed place.

    ``{prefix}{bot_id}:{chat_id}:{user_id}:{message_thread_id}:{business_connection_id}``;
    the business connection id comes last, so whatever characters it holds the key is
    unambiguous, and ``{prefix}{bot_id}:{chat_id}:`` selects every state of a chat.
    """
    chat = user_id if chat_id is None else chat_id  # what TeleBot.set_state does
    return (f"{prefix}{_part(bot_id)}:{'-' if chat is None else chat}:"
            f"{'-' if user_id is None else user_id}:{_part(message_thread_id)}:{_part(business_connection_id)}")


def _state_name(state: Any) -> Any:
    """A ``State`` is stored by its name, like telebot's storages do."""
    name = getattr(state, "name", None)
    return name if name is not None and not isinstance(state, (str, int)) else state


class _Record:
    """One state record as loaded under its lock: the raw bytes, the state and the data."""

    __slots__ = ("raw", "state", "data", "data_json")

    def __init__(self, raw: Optional[bytes], state: Any, data: Dict[str, Any], data_json: str) -> None:
        self.raw = raw
        self.state = state
        self.data = data
        self.data_json = data_json


class StateStorage(StateStorageBase):  # type: ignore[misc,valid-type]
    """A ``telebot.storage.StateStorageBase`` over a telesession store (or store URL).

    ``ttl`` (seconds): a state not written for that long reads as absent.
    ``lock_timeout``: how long an operation waits for a key another handler holds
    (``LockTimeout`` after it).  ``prefix`` keeps several state storages on one store
    apart.  Errors are the sessions' ones: ``CorruptSessionError`` for an unreadable
    record (left untouched), ``SerializationError`` for a value JSON cannot hold
    (nothing written), both naming the key and where it lives.
    """

    def __init__(self, store: Union[Store, str, None] = None, *, ttl: Optional[float] = None,
                 lock_timeout: float = 30.0, prefix: str = STATE_PREFIX) -> None:
        super().__init__()
        if store is None:
            from .stores.memory import MemoryStore

            store = MemoryStore()
        elif isinstance(store, str):
            from .stores.url import from_url

            store = from_url(store)
        if not isinstance(store, Store):
            raise TypeError(f"store must be a telesession Store or a store URL, not {type(store).__name__}")
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be a positive number of seconds, or None")
        if lock_timeout is None or lock_timeout < 0:
            raise ValueError("lock_timeout must be a number of seconds >= 0")
        if not prefix:
            raise ValueError("prefix must not be empty: state records would mix with sessions")
        self.store = store
        self.ttl = ttl
        self.lock_timeout = float(lock_timeout)
        self.prefix = prefix
        self._local = threading.local()  # key -> the _StateData block this thread holds open

    # -- keys and records ----------------------------------------------------------------

    def key(self, chat_id: Any, user_id: Any, business_connection_id: Optional[str] = None,
            message_thread_id: Optional[int] = None, bot_id: Optional[int] = None) -> str:
        """The stored key of a state (see ``state_key``)."""
        return state_key(chat_id, user_id, business_connection_id, message_thread_id, bot_id, self.prefix)

    def _where(self, key: str) -> Callable[[], str]:
        return lambda: self.store.describe(key)

    def _decode(self, key: str, raw: Optional[bytes]) -> _Record:
        """The record ``raw`` of ``key`` (absent or expired: no state, empty data)."""
        if raw is not None:
            value, _, written, whole = read_record(raw, key, self._where(key))
            if self.ttl is not None and written is not None and time.time() - written > self.ttl:
                logger.debug("state %r expired (written %.0f s ago)", key, time.time() - written)
            else:
                if (not isinstance(value, dict) or not isinstance(value.get("data", {}), dict)
                        or set(value) - {"state", "data"}):
                    where = self.store.describe(key)
                    raise CorruptSessionError(
                        f"state {key!r} ({where}) is not a state record {{\"state\": ..., \"data\": {{...}}}}; "
                        f"it was left untouched: repair or remove it (telesession rm URL {key})", key, where)
                data, state = value.get("data", {}), value.get("state")
                return _Record(raw, state, data, self._data_json(key, whole, state, data))
        return _Record(raw, None, {}, _EMPTY)

    def _data_json(self, key: str, whole: Optional[str], state: Any, data: Any) -> str:
        """The data's JSON: cut from our own record's text when it has our shape, else encoded."""
        if whole is not None and (state is None or type(state) is str):
            head = '{"state":%s,"data":' % encode_data(state, key, "", "state")
            if whole.startswith(head) and whole.endswith("}"):
                return whole[len(head):-1]
        return encode_data(data, key, self._where(key), "data")

    def _read(self, key: str) -> _Record:
        """The current record of ``key``, read without a lock (a record is written atomically)."""
        return self._decode(key, self.store.load(key))

    def _encode(self, key: str, state: Any, data: Any, data_json: Optional[str] = None) -> Tuple[str, str]:
        """``(state_json, data_json)``, refusing what would not read back exactly."""
        if not isinstance(data, dict):
            raise TypeError(f"the data of state {key!r} must be a dict, not {type(data).__name__}")
        where = self._where(key)
        if data_json is None:
            data_json = encode_data(data, key, where, "data")
        check_round_trip(data, data_json, key, where, "data")
        state_json = encode_data(state, key, where, "state")
        if state is not None and type(state) is not str:  # a str or None reads back as written
            check_round_trip(state, state_json, key, where, "state")
        return state_json, data_json

    def _write(self, key: str, previous: Optional[bytes], state: Any, data: Any, token: Any,
               data_json: Optional[str] = None) -> Optional[bytes]:
        """Save ``state``/``data`` over ``previous`` and release ``key`` (in every case); the new record."""
        try:
            state_json, data_json = self._encode(key, state, data, data_json)
            record: Optional[bytes] = None
            if state is None and data_json == _EMPTY:  # nothing left to keep: no record
                if previous is not None:
                    self.store.delete(key, previous=previous)
            else:
                record = build_record(key, '{"state":%s,"data":%s}' % (state_json, data_json), 0, time.time())
        except BaseException:
            self.store.release(key, token)
            raise
        if record is None:
            self.store.release(key, token)
            return None
        self.store.save_and_release(key, record, previous=previous, ttl=self.ttl, token=token)
        return record

    def _update(self, key: str, change: Callable[[_Record], Optional[bool]]) -> bool:
        """Under ``key``'s lock: load, apply ``change`` (``False``: nothing to write), save, release.

        ``change`` mutates the record's data in place, so that a ``retrieve_data`` block this
        thread holds open on the key gets the same change: the block sees it, and its own
        save at the end keeps it.
        """
        token = self.store.acquire(key, self.lock_timeout)
        try:
            record = self._decode(key, self.store.load_locked(key, token))
            before = (record.state, record.data_json)
            if change(record) is False:
                self.store.release(key, token)
                return False
            data_json = encode_data(record.data, key, self._where(key), "data")
        except BaseException:
            self.store.release(key, token)
            raise
        if (record.state, data_json) == before:
            self.store.release(key, token)
            raw = record.raw
        else:
            raw = self._write(key, record.raw, record.state, record.data, token, data_json)
        block = self._open_blocks().get(key)
        if block is not None:
            change(block.record)
            block.record.raw = raw
        return True

    def _open_blocks(self) -> Dict[str, "_StateData"]:
        blocks = getattr(self._local, "blocks", None)
        if blocks is None:
            blocks = self._local.blocks = {}
        return blocks

    # -- telebot's StateStorageBase --------------------------------------------------------

    def set_state(self, chat_id: Any, user_id: Any, state: Any, business_connection_id: Optional[str] = None,
                  message_thread_id: Optional[int] = None, bot_id: Optional[int] = None) -> bool:
        """Set the state of a user in a chat, creating the record (with empty data) if needed."""
        state = _state_name(state)

        def change(record: _Record) -> None:
            record.state = state

        return self._update(self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id), change)

    def get_state(self, chat_id: Any, user_id: Any, business_connection_id: Optional[str] = None,
                  message_thread_id: Optional[int] = None, bot_id: Optional[int] = None) -> Any:
        """The state's name, or ``None``."""
        return self._read(self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id)).state

    def delete_state(self, chat_id: Any, user_id: Any, business_connection_id: Optional[str] = None,
                     message_thread_id: Optional[int] = None, bot_id: Optional[int] = None) -> bool:
        """Remove the state and its data; ``False`` if there was none."""
        key = self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        token = self.store.acquire(key, self.lock_timeout)
        try:
            raw = self.store.load_locked(key, token)
            if raw is not None:
                self._decode(key, raw)  # an unreadable record is not deleted silently
                self.store.delete(key, previous=raw)
        finally:
            self.store.release(key, token)
        block = self._open_blocks().get(key)
        if block is not None:  # the open block starts from nothing too
            block.record.raw, block.record.state = None, None
            block.record.data.clear()
        return raw is not None

    def set_data(self, chat_id: Any, user_id: Any, key: str, value: Any,
                 business_connection_id: Optional[str] = None, message_thread_id: Optional[int] = None,
                 bot_id: Optional[int] = None) -> bool:
        """``data[key] = value`` (``bot.add_data``); works with or without a state set."""
        def change(record: _Record) -> None:
            record.data[key] = value

        return self._update(self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id), change)

    def get_data(self, chat_id: Any, user_id: Any, business_connection_id: Optional[str] = None,
                 message_thread_id: Optional[int] = None, bot_id: Optional[int] = None) -> Dict[str, Any]:
        """A copy of the state's data (``{}`` if none); changing it changes nothing stored."""
        return self._read(self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id)).data

    def reset_data(self, chat_id: Any, user_id: Any, business_connection_id: Optional[str] = None,
                   message_thread_id: Optional[int] = None, bot_id: Optional[int] = None) -> bool:
        """Empty the data, keep the state; ``False`` if there was no record."""
        def change(record: _Record) -> Optional[bool]:
            if record.raw is None:
                return False
            record.data.clear()
            return None

        return self._update(self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id), change)

    def get_interactive_data(self, chat_id: Any, user_id: Any, business_connection_id: Optional[str] = None,
                             message_thread_id: Optional[int] = None,
                             bot_id: Optional[int] = None) -> "_StateData":
        """``with bot.retrieve_data(...) as data:`` — the data under the key's lock for the block."""
        return _StateData(self, self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id))

    def save(self, chat_id: Any, user_id: Any, data: Dict[str, Any], business_connection_id: Optional[str] = None,
             message_thread_id: Optional[int] = None, bot_id: Optional[int] = None) -> bool:
        """Replace the data (keeping the state), under the key's lock."""
        def change(record: _Record) -> None:
            record.data.clear()
            record.data.update(copy.deepcopy(data))

        return self._update(self.key(chat_id, user_id, business_connection_id, message_thread_id, bot_id), change)

    # -- beyond telebot's interface ----------------------------------------------------------

    def keys(self) -> Iterator[str]:
        """The stored keys of every state in the store."""
        return (k for k in self.store.keys() if k.startswith(self.prefix))

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    def __repr__(self) -> str:
        return f"StateStorage({self.store!r})"

    def __str__(self) -> str:
        return repr(self)


class _StateData:
    """What ``bot.retrieve_data(...)`` returns: holds the key's lock from ``__enter__`` to ``__exit__``.

    The data is saved when the block ends normally and changed it; when the block
    raises, nothing is saved and the exception propagates (``__exit__`` returns
    ``False``).  A block re-entered by the same thread on the same key shares the
    outer block's data, which the outer block saves.
    """

    __slots__ = ("storage", "key", "token", "record", "outer", "entered")

    def __init__(self, storage: StateStorage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.token: Any = None
        self.record: _Record = _Record(None, None, {}, _EMPTY)
        self.outer: Optional[_StateData] = None
        self.entered = False

    def __enter__(self) -> Dict[str, Any]:
        storage, key = self.storage, self.key
        blocks = storage._open_blocks()
        outer = blocks.get(key)
        if outer is not None:
            self.outer = outer
            self.entered = True
            return outer.record.data
        token = storage.store.acquire(key, storage.lock_timeout)
        try:
            self.record = storage._decode(key, storage.store.load_locked(key, token))
        except BaseException:
            storage.store.release(key, token)
            raise
        self.token = token
        self.entered = True
        blocks[key] = self
        return self.record.data

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.entered or self.outer is not None:
            return None
        self.entered = False
        storage, key, record = self.storage, self.key, self.record
        storage._open_blocks().pop(key, None)
        if exc_type is not None:
            storage.store.release(key, self.token)
            return None  # the block's exception propagates; nothing was saved
        try:
            data_json = encode_data(record.data, key, storage._where(key), "data")
            if data_json == record.data_json:
                storage.store.release(key, self.token)
                return None
        except BaseException:
            storage.store.release(key, self.token)
            raise
        storage._write(key, record.raw, record.state, record.data, self.token, data_json)
        return None

    @property
    def data(self) -> Dict[str, Any]:
        """The data, as telebot's ``StateDataContext.data``: the block's own dict inside the
        block, a fresh copy (read without the lock) outside it."""
        if self.entered:
            return self.outer.record.data if self.outer is not None else self.record.data
        return self.storage._read(self.key).data


# -- moving from telebot's StatePickleStorage ---------------------------------------------------


def parse_telebot_key(key: str, prefix: str = "telebot", separator: str = ":"
                      ) -> Tuple[Optional[int], Optional[str], Optional[int], int, Optional[int]]:
    """``(bot_id, business_connection_id, message_thread_id, chat_id, user_id)`` of a telebot key.

    telebot joins ``prefix, [bot_id], [business_connection_id], [thread_id], chat_id,
    user_id`` and leaves out the parts that are absent.  TeleBot always passes its bot
    id, so a single numeric middle part is the bot id; a non-numeric one is a business
    connection id.  ``ValueError`` for a key that is not telebot's.
    """
    head = prefix + separator
    if not key.startswith(head):
        raise ValueError(f"{key!r} does not start with {head!r}")
    parts = key[len(head):].split(separator)
    if len(parts) < 2 or len(parts) > 5:
        raise ValueError(f"{key!r} has {len(parts)} parts after the prefix; telebot keys have 2 to 5")
    try:
        chat_id = int(parts[-2])
        user_id = None if parts[-1] == "None" else int(parts[-1])
    except ValueError:
        raise ValueError(f"{key!r} does not end with CHAT_ID{separator}USER_ID") from None
    middle = parts[:-2]
    bot_id: Optional[int] = None
    business: Optional[str] = None
    thread: Optional[int] = None
    if middle and middle[0].isdigit():
        bot_id = int(middle.pop(0))
    if middle and not middle[0].isdigit():
        business = middle.pop(0)
    if middle and middle[0].isdigit():
        thread = int(middle.pop(0))
    if middle:
        raise ValueError(f"{key!r}: cannot tell which part is the bot id, business connection id and thread id")
    return bot_id, business, thread, chat_id, user_id


class _PlainUnpickler(pickle.Unpickler):
    """Only dicts, lists, strings, numbers: a state file holds nothing else, and no code runs."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"the pickle file refers to {module}.{name}; only plain data (dict, list, str, numbers) "
            f"can be imported")


def read_pickle_states(path: str) -> Dict[str, Any]:
    """The dict a ``StatePickleStorage`` file holds, loaded without running any code from it."""
    with open(path, "rb") as f:
        value = _PlainUnpickler(f).load()
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not the dict of a StatePickleStorage")
    return value


def import_pickle(storage: StateStorage, path: str, *, prefix: str = "telebot", separator: str = ":",
                  bot_id: Optional[int] = None, mode: str = "refuse") -> Dict[str, int]:
    """Copy the states of a ``StatePickleStorage`` file into ``storage``, each under its key's lock.

    ``bot_id`` fills in keys written without one.  ``mode``: ``"refuse"`` (an existing
    different state stops the import before anything is written), ``"skip"`` or
    ``"overwrite"``.  Returns counts: ``imported``, ``unchanged``, ``skipped``.
    """
    states = read_pickle_states(path)
    entries: List[Tuple[str, Any, Dict[str, Any]]] = []
    for old_key, value in states.items():
        if not isinstance(old_key, str) or not isinstance(value, dict):
            raise ValueError(f"{path}: entry {old_key!r} is not a telebot state (a key and a dict)")
        bot, business, thread, chat, user = parse_telebot_key(old_key, prefix, separator)
        key = storage.key(chat, user, business, thread, bot if bot is not None else bot_id)
        state, data = value.get("state"), value.get("data") or {}
        storage._encode(key, state, data)  # refuse what cannot be stored before writing anything
        entries.append((key, state, data))
    if mode == "refuse":
        conflicts = [key for key, state, data in entries
                     if (lambda r: r.raw is not None and (r.state, r.data) != (state, data))(storage._read(key))]
        if conflicts:
            raise ValueError(f"{len(conflicts)} state(s) already exist with different values "
                             f"({', '.join(conflicts[:5])}); nothing was imported; overwrite or skip them")
    counts = {"imported": 0, "unchanged": 0, "skipped": 0}
    for key, state, data in entries:
        def change(record: _Record, state: Any = state, data: Any = data) -> Optional[bool]:
            if record.raw is not None and (record.state, record.data) == (state, data):
                counts["unchanged"] += 1
                return False
            if record.raw is not None and mode != "overwrite":
                counts["skipped"] += 1
                return False
            record.state = state
            record.data.clear()
            record.data.update(copy.deepcopy(data))
            counts["imported"] += 1
            return None

        storage._update(key, change)
    return counts
