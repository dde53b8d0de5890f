"""Group → supergroup: move a chat's sessions to its new chat id when Telegram migrates it.

When a group becomes a supergroup, Telegram gives it a new id and sends a service
message ``migrate_to_chat_id`` in the old group and ``migrate_from_chat_id`` in the
new supergroup.  ``SessionMiddleware`` calls ``follow_migration`` for both (whichever
a worker thread reaches first moves the sessions; the other finds nothing left to
move), before it opens the update's own session.

Each session moves under the locks of both its keys (taken in sorted order, so two
moves never deadlock): the record is rewritten under the new key (same data,
version and write time), then the old one is deleted.  If the new key already has a
session, both are kept and a warning is logged.  Which keys hold a chat id depends on
the key strategy: ``by_chat`` (``CHAT``), ``by_user_in_chat`` (``CHAT:USER``) and
``by_chat_topic`` (``CHAT`` / ``CHAT:THREAD``), also inside ``keys.prefixed``; other
strategies (``by_user``, custom functions) are left alone.
"""
import json
import logging
from typing import Any, Iterator, List, Optional, Tuple

from .errors import SessionError
from .records import build_record, encode_data, read_record

__all__ = ["follow_migration", "move_chat", "chat_keys"]

logger = logging.getLogger("telesession")


def _stored_key(sessions: Any, key: str) -> str:
    """Where the manager stores the session of ``key`` (or, for a prefix, where such keys start)."""
    return sessions._stored_key(key)  # the manager's one key -> stored key mapping (its namespace)


def chat_keys(sessions: Any, chat_id: int) -> Iterator[str]:
    """The (unprefixed) keys of ``sessions`` that belong to ``chat_id`` under its key strategy."""
    strategy = sessions.key
    layout = getattr(strategy, "_telesession_chat_layout", None)
    if layout is None:
        return
    prefix = getattr(strategy, "_telesession_key_prefix", "")
    exact = f"{prefix}{chat_id}"
    if layout == "chat":
        yield exact
        return
    # "chat-prefix": CHAT itself and every CHAT:... (a scan; the store streams its keys)
    stored_exact = _stored_key(sessions, exact)
    namespace = stored_exact[:len(stored_exact) - len(exact)]
    head = stored_exact + ":"
    for stored in _keys_with_prefix(sessions.store, stored_exact):
        if stored == stored_exact or stored.startswith(head):
            yield stored[len(namespace):]


def _keys_with_prefix(store: Any, prefix: str) -> Iterator[str]:
    """``store.keys(prefix)`` where the store supports it, else every key filtered here."""
    try:
        found = store.keys(prefix)
    except TypeError:  # a store written before Store.keys(prefix)
        found = store.keys()
    return (k for k in found if k.startswith(prefix))


def move_chat(sessions: Any, old_chat_id: int, new_chat_id: int) -> List[Tuple[str, str]]:
    """Move every session of ``old_chat_id`` to ``new_chat_id``; the ``(old, new)`` keys moved.

    A session whose new key is taken already stays where it is (logged as a warning).
    """
    moved = []
    strategy_prefix = getattr(sessions.key, "_telesession_key_prefix", "")
    old_head = f"{strategy_prefix}{old_chat_id}"
    for old_key in list(chat_keys(sessions, old_chat_id)):
        new_key = f"{strategy_prefix}{new_chat_id}{old_key[len(old_head):]}"
        if _move_one(sessions, old_key, new_key):
            moved.append((old_key, new_key))
    return moved


def _move_one(sessions: Any, old_key: str, new_key: str) -> bool:
    store = sessions.store
    old_stored, new_stored = _stored_key(sessions, old_key), _stored_key(sessions, new_key)
    first, second = sorted((old_stored, new_stored))
    token_first = store.acquire(first, sessions.lock_timeout)
    try:
        token_second = store.acquire(second, sessions.lock_timeout)
        try:
            raw = store.load(old_stored)
            if raw is None:
                return False  # nothing there (or the other service message moved it already)
            if store.load(new_stored) is not None:
                logger.warning("chat moved to a supergroup: session %r was not moved to %r, which has a "
                               "session already; both are kept", old_stored, new_stored)
                return False
            where = lambda: store.describe(old_stored)  # noqa: E731
            data, version, written, data_json = read_record(raw, old_stored, where)
            record_key = _record_key(raw, old_key, old_stored, new_key, new_stored)
            text = data_json if data_json is not None else encode_data(data, new_stored, where)
            store.save(new_stored, build_record(record_key, text, version, written or 0.0), previous=None,
                       ttl=getattr(sessions, "ttl", None))
            store.delete(old_stored, previous=raw)
            logger.info("chat moved to a supergroup: session %r moved to %r", old_stored, new_stored)
            return True
        finally:
            store.release(second, token_second)
    finally:
        store.release(first, token_first)


def _record_key(raw: bytes, old_key: str, old_stored: str, new_key: str, new_stored: str) -> str:
    """The ``key`` field of the moved record: the new key in the form the old record named it."""
    try:
        named = json.loads(raw.decode("utf-8", "surrogatepass")).get("key")
    except (ValueError, AttributeError):
        named = None
    return new_key if named == old_key and old_key != old_stored else new_stored


def follow_migration(sessions: Any, message: Any) -> None:
    """Move the sessions of a migrated chat, if ``message`` is Telegram's migration notice.

    Failures (a lock timeout, a store error, an unreadable record) are logged with the
    key and place, and leave both chats' sessions as they were; the update itself is
    handled as usual.
    """
    new_id: Optional[int] = getattr(message, "migrate_to_chat_id", None)
    old_id: Optional[int] = getattr(message, "migrate_from_chat_id", None)
    chat = getattr(message, "chat", None)
    if chat is None or (new_id is None and old_id is None):
        return
    if new_id is None:
        new_id = chat.id
    else:
        old_id = chat.id
    try:
        move_chat(sessions, old_id, new_id)  # type: ignore[arg-type]
    except SessionError as exc:
        logger.error("chat %s moved to %s, but its sessions could not be moved: %s (key %r, %s)",
                     old_id, new_id, exc, exc.key, exc.where)

