"""``RedisStore``: sessions in Redis, for bots that run as many processes on many machines.

Layout under ``prefix`` (default ``"telesession:"``), keys binary-safe UTF-8:

* ``{prefix}s:{key}`` -- the session record, a plain string value
  (``redis-cli GET 'telesession:s:123'`` shows the JSON); with ``ttl`` it expires natively.
* ``{prefix}l:{key}`` -- the lock of ``key`` while a handler holds it: a random token
  with a lease (``PX``), renewed in the background while held.

The segment after the prefix (``s:`` or ``l:``) says what a Redis key is, so no session
key, whatever its characters (``"lock:x"``, ``"l:x"``), can name another key's lock.

A lock is taken with ``SET NX PX`` and a random token by a Lua script that also
returns the session (``load_locked`` right after costs no round trip), given back by a Lua
compare-and-delete (never another holder's lock), and kept alive by one daemon thread
per store that extends every held lease each ``lease / 3`` seconds.  Saves and deletes
are Lua compare-and-set: they write only while the stored record is still the one
loaded and the lock token is still ours; otherwise ``ConflictError``, nothing written.
The save that ends a handler deletes the lock in the same script (``save_and_release``),
so an update costs two round trips.
"""
import logging
import math
import os
import secrets
import threading
import time
import weakref
from typing import Any, Dict, Hashable, Iterator, List, Optional, Tuple, Union, cast
from urllib.parse import parse_qsl, quote, urlencode

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from ..errors import ConflictError, StoreError
from .base import Store
from .url import scrub

__all__ = ["RedisStore"]

logger = logging.getLogger("telesession")

# KEYS[1] lock, KEYS[2] session; ARGV token, lease ms.  Take a free lock, or confirm one we
# already own (a retried SET whose first reply was lost must not make us wait for ourselves).
# 0: held by another; {1}: ours, no session; {1, record}: ours, and the record (saves a
# round trip: the handler's load comes right after).
_ACQUIRE = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
  redis.call('pexpire', KEYS[1], ARGV[2])
end
local record = redis.call('get', KEYS[2])
if record then return {1, record} end
return {1}
"""

# KEYS[1] lock; ARGV token.  Delete the lock only if it is still ours.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# KEYS lock keys; ARGV[1] lease ms, ARGV[i+1] token of KEYS[i].  1 renewed, 0 lost.
_RENEW = """
local result = {}
for i, k in ipairs(KEYS) do
  if redis.call('get', k) == ARGV[i + 1] then
    redis.call('pexpire', k, ARGV[1])
    result[i] = 1
  else
    result[i] = 0
  end
end
return result
"""

# KEYS[1] session, KEYS[2] lock; ARGV token ('' = not held, no check), has_previous,
# previous, record, ttl ms ('0' = none), release ('1': delete our lock too, whatever the
# outcome).  1 written, -1 lock lost, -2 record changed.  Writing the very record already
# stored succeeds (a retried call whose reply was lost, even if that call released the lock).
_SAVE = """
if ARGV[1] ~= '' and redis.call('get', KEYS[2]) ~= ARGV[1] then
  if ARGV[6] == '1' and redis.call('get', KEYS[1]) == ARGV[4] then return 1 end
  return -1
end
local current = redis.call('get', KEYS[1])
local result = 1
if current ~= ARGV[4] then
  if ARGV[2] == '1' then
    if current ~= ARGV[3] then result = -2 end
  elseif current then
    result = -2
  end
end
if result == 1 then
  if ARGV[5] ~= '0' then
    redis.call('set', KEYS[1], ARGV[4], 'PX', ARGV[5])
  else
    redis.call('set', KEYS[1], ARGV[4])
  end
end
if ARGV[6] == '1' then redis.call('del', KEYS[2]) end
return result
"""

# KEYS[1] session, KEYS[2] lock; ARGV token ('' = no check), has_previous, previous.
# 1 deleted (or already gone), -1 lock lost, -2 record changed.
_DELETE = """
if ARGV[1] ~= '' and redis.call('get', KEYS[2]) ~= ARGV[1] then return -1 end
if ARGV[2] == '1' then
  local current = redis.call('get', KEYS[1])
  if current and current ~= ARGV[3] then return -2 end
end
redis.call('del', KEYS[1])
return 1
"""

_GLOB_SPECIAL = frozenset(b"*?[]\\")

# Guards the per-process reset of a store's lease state; made anew in a forked child, since
# another thread of the parent may have held it at the instant of the fork.
_fork_guard = threading.Lock()


def _new_fork_guard() -> None:
    global _fork_guard
    _fork_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_fork_guard)
_IDLE_EXIT = 10.0  # seconds the renewal thread lingers with no lease before it exits


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` as a literal SCAN MATCH pattern."""
    return b"".join(b"\\" + bytes([c]) if c in _GLOB_SPECIAL else bytes([c]) for c in raw)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


_HANDED_OUT = object()  # a lease's record after load_locked: read again from Redis


class _Lease:
    """A lock this process holds: its Redis key, its token, and whether renewal found it lost.

    ``record`` is the session read together with the lock, for ``load_locked``.
    """

    __slots__ = ("lock_key", "token", "lost", "record")

    def __init__(self, lock_key: bytes, token: bytes, record: Optional[bytes]) -> None:
        self.lock_key = lock_key
        self.token = token
        self.lost = False
        self.record: Any = record  # or _HANDED_OUT once load_locked returned it


class RedisStore(Store):
    """Sessions in Redis; the lock of a key excludes every process on every machine.

    ``url_or_client``: a URL (``redis://[user:password@]host:port/db``, ``rediss://`` for
    TLS, ``unix:///path/redis.sock?db=0``; a ``?prefix=`` query parameter overrides
    ``prefix``) or a ready ``redis.Redis`` client, which the store then never closes.
    ``lease`` (seconds): how long a lock outlives a holder that died or stalled; a live
    holder renews it every ``lease / 3``.  ``socket_timeout`` and ``socket_connect_timeout``
    bound every Redis call; other keyword ``options`` go to ``redis.Redis.from_url``.

    Redis being down raises ``StoreError`` naming the key and the server (never its
    password); the client reconnects by itself once Redis is back.
    """

    conditional = True

    def __init__(self, url_or_client: Union[str, "redis.Redis"], prefix: str = "telesession:", *,
                 lease: float = 30.0, socket_timeout: float = 5.0, socket_connect_timeout: float = 5.0,
                 **options: Any) -> None:
        ours: Dict[str, str] = {}
        if isinstance(url_or_client, str):  # ?prefix=...&lease=... are ours, not redis-py's
            url_or_client, ours = self._split_url(url_or_client)
            prefix = ours.get("prefix", prefix)
            if "lease" in ours:
                try:
                    lease = float(ours["lease"])
                except ValueError:
                    raise ValueError(f"lease={ours['lease']!r} in the Redis URL: not a number") from None
        if not lease > 0:
            raise ValueError(f"lease={lease!r}: must be a positive number of seconds")
        self.lease = float(lease)
        self._lease_ms = max(1, int(math.ceil(self.lease * 1000)))
        if isinstance(url_or_client, str):
            url = url_or_client
            options.setdefault("retry", Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.02), 2))
            try:
                self.client = redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                                   socket_connect_timeout=socket_connect_timeout,
                                                   **options)
            except ValueError as exc:
                raise ValueError(f"bad Redis URL {scrub(url)!r}: {exc}") from None
            self._owns_client = True
        else:
            if options:
                raise TypeError(f"options {sorted(options)} only apply when RedisStore is given a URL")
            self.client = url_or_client
            self._owns_client = False
        self.prefix = prefix
        self._prefix = _b(prefix)
        self.address, location = self._address()
        self.location: Hashable = location + (prefix,)
        self._acquire_script = self.client.register_script(_ACQUIRE)
        self._release_script = self.client.register_script(_RELEASE)
        self._renew_script = self.client.register_script(_RENEW)
        self._save_script = self.client.register_script(_SAVE)
        self._delete_script = self.client.register_script(_DELETE)
        self._closed = False
        self._pid = -1
        self._proc_state()

    # -- configuration ------------------------------------------------------------------

    @staticmethod
    def _split_url(url: str) -> Tuple[str, Dict[str, str]]:
        """The URL without our query parameters (``prefix``, ``lease``), and those."""
        head, _, rest = url.partition("?")
        query, hash_, fragment = rest.partition("#")
        ours: Dict[str, str] = {}
        kept = []
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in ("prefix", "lease"):
                ours[name] = value
            else:
                kept.append((name, value))
        if not ours:
            return url, ours
        return head + ("?" + urlencode(kept, quote_via=quote) if kept else "") + hash_ + fragment, ours

    def _address(self) -> Tuple[str, Tuple[Any, ...]]:
        """A credential-free address for messages, and the identity of the server and db."""
        try:
            kwargs = self.client.connection_pool.connection_kwargs
        except AttributeError:  # pragma: no cover - an unusual client
            return repr(self.client), ("redis", id(self.client))
        db = kwargs.get("db", 0) or 0
        path = kwargs.get("path")
        if path:
            return f"unix://{path}?db={db}", ("redis", "unix", path, db)
        host = kwargs.get("host", "localhost")
        port = kwargs.get("port", 6379)
        connection_class = getattr(self.client.connection_pool, "connection_class", None)
        tls = isinstance(connection_class, type) and issubclass(connection_class, redis.SSLConnection)
        scheme = "rediss" if tls else "redis"
        return f"{scheme}://{host}:{port}/{db}", ("redis", host, port, db)

    def _proc_state(self) -> None:
        """Per-process lease bookkeeping; a forked child starts with none (the parent's are not its)."""
        pid = os.getpid()
        if self._pid == pid:
            return
        with _fork_guard:
            if self._pid == pid:
                return
            self._leases: Dict[str, _Lease] = {}
            self._cond = threading.Condition(threading.Lock())
            self._renewer: Optional[threading.Thread] = None
            self._pid = pid

    # -- helpers ------------------------------------------------------------------------

    def _session_key(self, key: str) -> bytes:
        return self._prefix + b"s:" + _b(key)

    def _lock_key(self, key: str) -> bytes:
        return self._prefix + b"l:" + _b(key)

    def describe(self, key: str) -> str:
        return f"Redis key {self.prefix + 's:' + key!r} at {self.address}"

    def _error(self, exc: BaseException, key: Optional[str], doing: str) -> StoreError:
        where = (self.describe(key) if key is not None
                 else f"Redis keys {self.prefix + 's:*'!r} at {self.address}")
        return StoreError(f"Redis failed while {doing} {where}: {type(exc).__name__}: "
                          f"{self._scrub(str(exc))}", key, where)

    def _scrub(self, text: str) -> str:
        try:
            password = self.client.connection_pool.connection_kwargs.get("password")
        except AttributeError:  # pragma: no cover
            password = None
        if password:
            text = text.replace(str(password), "***")
        return text

    def _held_lease(self, key: str) -> Optional[_Lease]:
        """The lease of ``key`` if the calling thread holds it through this store."""
        self._proc_state()
        if not self._thread_locks().holds(key):
            return None
        return self._leases.get(key)

    # -- the Store protocol -------------------------------------------------------------

    def load_locked(self, key: str, token: Any) -> Optional[bytes]:
        """The record the lock script read a moment ago (a re-entered lock has none: read it)."""
        if isinstance(token, _Lease) and token.record is not _HANDED_OUT:
            record, token.record = token.record, _HANDED_OUT
            return cast(Optional[bytes], record)
        return self.load(key)

    def load(self, key: str) -> Optional[bytes]:
        try:
            value = self.client.get(self._session_key(key))
        except redis.RedisError as exc:
            raise self._error(exc, key, "reading") from exc
        if isinstance(value, str):  # a client made with decode_responses=True
            value = _b(value)
        return value

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        """Write ``record`` if the stored value is still ``previous`` and our lock still holds."""
        lease = self._held_lease(key)
        self._check_lease(lease, key)
        try:
            result = self._save_script(keys=[self._session_key(key), self._lock_key(key)],
                                       args=self._save_args(lease, record, previous, ttl, release=False))
        except redis.RedisError as exc:
            raise self._error(exc, key, "writing") from exc
        self._check_result(result, lease, key, "nothing was overwritten")

    def save_and_release(self, key: str, record: bytes, *, previous: Optional[bytes], ttl: Optional[float],
                         token: Any) -> None:
        """Write and give the lock back in one round trip (the script deletes our lock either way)."""
        self._proc_state()
        if not isinstance(token, _Lease) or token.lost or self._leases.get(key) is not token:
            super().save_and_release(key, record, previous=previous, ttl=ttl, token=token)
            return
        try:
            result = self._save_script(keys=[self._session_key(key), token.lock_key],
                                       args=self._save_args(token, record, previous, ttl, release=True))
        except BaseException as exc:
            self.release(key, token)  # did it run?  Give the lock back if it is still ours
            if isinstance(exc, redis.RedisError):
                raise self._error(exc, key, "writing") from exc
            raise
        with self._cond:  # the script deleted the lock: only this process's bookkeeping is left
            if self._leases.get(key) is token:
                del self._leases[key]
        Store.release(self, key, True)
        self._check_result(result, token, key, "nothing was overwritten")

    @staticmethod
    def _save_args(lease: Optional[_Lease], record: bytes, previous: Optional[bytes], ttl: Optional[float],
                   release: bool) -> List[bytes]:
        px = 0 if ttl is None else max(1, int(math.ceil(ttl * 1000)))
        return [lease.token if lease else b"", b"0" if previous is None else b"1", previous or b"", record,
                str(px).encode(), b"1" if release and lease else b"0"]

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        """Remove the value; with ``previous``, only if it is still that record.

        ``previous=None`` deletes whatever is stored (what ``telesession rm`` wants); a value
        that is already gone is not an error.
        """
        lease = self._held_lease(key)
        self._check_lease(lease, key)
        args = [lease.token if lease else b"", b"0" if previous is None else b"1", previous or b""]
        try:
            result = self._delete_script(keys=[self._session_key(key), self._lock_key(key)], args=args)
        except redis.RedisError as exc:
            raise self._error(exc, key, "deleting") from exc
        self._check_result(result, lease, key, "it was not deleted")

    def _check_lease(self, lease: Optional[_Lease], key: str) -> None:
        if lease is not None and lease.lost:
            raise ConflictError(
                f"the lock of session {key!r} expired while the handler ran (lease {self.lease:g} s "
                f"could not be renewed) and another holder may have taken it ({self.describe(key)}); "
                f"nothing was written", key, self.describe(key))

    def _check_result(self, result: Any, lease: Optional[_Lease], key: str, outcome: str) -> None:
        if result == 1:
            return
        if result == -1:
            if lease is not None:
                lease.lost = True
            raise ConflictError(
                f"the lock of session {key!r} is no longer ours (its lease of {self.lease:g} s ran out "
                f"and another holder may have taken it; {self.describe(key)}); {outcome}",
                key, self.describe(key))
        raise ConflictError(
            f"session {key!r} was changed by another writer since it was loaded "
            f"({self.describe(key)}); {outcome}", key, self.describe(key))

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every session key starting with ``prefix``, by ``SCAN`` (never ``KEYS``), so Redis is not blocked."""
        head = self._prefix + b"s:"
        pattern = _glob_escape(head + _b(prefix)) + b"*"
        try:
            for name in self.client.scan_iter(match=pattern, count=1000):
                if isinstance(name, str):
                    name = _b(name)
                if name.startswith(head):
                    yield name[len(head):].decode("utf-8", "surrogatepass")
        except redis.RedisError as exc:
            raise self._error(exc, None, "listing") from exc

    def purge_expired(self, now: Optional[float] = None) -> int:
        """Nothing to do: Redis drops a session whose ``ttl`` ran out by itself."""
        return 0

    # -- locking between processes and machines -----------------------------------------

    def _lock_external(self, key: str, timeout: float) -> Any:
        self._proc_state()
        lock_key = self._lock_key(key)
        token = secrets.token_hex(16).encode()
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                got = self._acquire_script(keys=[lock_key, self._session_key(key)], args=[token, self._lease_ms])
            except redis.RedisError as exc:
                raise self._error(exc, key, "locking") from exc
            if got:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(key, timeout)
            time.sleep(min(delay * (0.5 + secrets.randbelow(1000) / 1000), remaining))
            delay = min(delay * 2, 0.05)
        record = got[1] if len(got) > 1 else None
        if isinstance(record, str):  # a client made with decode_responses=True
            record = _b(record)
        lease = _Lease(lock_key, token, record)
        with self._cond:
            self._leases[key] = lease
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=_renew_loop, args=(weakref.ref(self),),
                                                 name=f"telesession-redis-lease-{self.prefix}", daemon=True)
                self._renewer.start()
        return lease

    def _unlock_external(self, key: str, token: Any) -> None:
        self._proc_state()
        with self._cond:
            if self._leases.get(key) is token:
                del self._leases[key]
        if not isinstance(token, _Lease):  # pragma: no cover - a token from another process
            return
        try:
            self._release_script(keys=[token.lock_key], args=[token.token])
        except redis.RedisError as exc:
            logger.warning("could not release the lock of session %r (%s): %s; it expires within %g s",
                           key, self.describe(key), self._scrub(str(exc)), self.lease)

    def _renew_once(self) -> None:
        """Extend every lease this process holds; mark the ones found lost."""
        with self._cond:
            leases = list(self._leases.values())
        for start in range(0, len(leases), 500):
            chunk = leases[start:start + 500]
            try:
                results = self._renew_script(keys=[lease.lock_key for lease in chunk],
                                             args=[self._lease_ms] + [lease.token for lease in chunk])
            except redis.RedisError as exc:
                logger.warning("could not renew %d Redis lock lease(s) at %s: %s", len(chunk),
                               self.address, self._scrub(str(exc)))
                return
            with self._cond:
                current = set(map(id, self._leases.values()))
            for lease, ok in zip(chunk, results):
                if not ok and not lease.lost and id(lease) in current:  # not merely released meanwhile
                    lease.lost = True
                    logger.warning("lost the Redis lock %s: its lease ran out before it was renewed",
                                   lease.lock_key.decode("utf-8", "replace"))

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop lease renewal and, for a client made from a URL, close its connections."""
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        if self._owns_client:
            try:
                self.client.close()
            except redis.RedisError:  # pragma: no cover
                pass

    def __repr__(self) -> str:
        return f"RedisStore({self.address!r}, prefix={self.prefix!r})"


def _renew_loop(ref: "weakref.ReferenceType[RedisStore]") -> None:
    """The renewal thread: every ``lease / 3`` extend held leases; exit when idle or closed.

    It refers to the store only weakly while it sleeps, so an abandoned store can be collected.
    """
    me = threading.current_thread()
    idle_since = time.monotonic()
    while True:
        store = ref()
        if store is None or store._closed or store._renewer is not me:
            return
        cond, interval = store._cond, store.lease / 3
        del store
        with cond:
            cond.wait(interval)
        store = ref()
        if store is None or store._closed:
            return
        with cond:
            busy = bool(store._leases)
            if not busy and time.monotonic() - idle_since > max(_IDLE_EXIT, store.lease):
                store._renewer = None
                return
        if busy:
            idle_since = time.monotonic()
            store._renew_once()
        del store


