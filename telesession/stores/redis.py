"""``RedisStore``: sessions in Redis or Valkey, for bots that run as many processes on many machines.

Deployments: one server (``redis://``, ``rediss://``, ``unix://``, ``valkey://``,
``valkeys://``), a Redis Cluster (``redis+cluster://HOST:PORT[,HOST:PORT...]``) and a
Sentinel-managed master (``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``), or a
ready client of the ``redis`` or ``valkey`` package for any of them.

Layout under ``prefix`` (default ``"telesession:"``), keys binary-safe UTF-8:

* ``{prefix}s:{KEY}`` -- the session record, a plain string value
  (``redis-cli GET 'telesession:s:{123}'`` shows the JSON); with ``ttl`` it expires natively.
* ``{prefix}l:{KEY}`` -- the lock of ``KEY`` while a handler holds it: a random token
  with a lease (``PX``), renewed in the background while held.

The braces are a Redis Cluster hash tag: a session's record and lock hash to the same slot
(one script touches both) while different sessions spread over the cluster.  ``KEY`` is the
session key itself, with a ``~`` put in front when it is empty or starts with ``}`` or ``~``
(so the tag is never empty).  The segment after the prefix (``s:`` or ``l:``) says what a
Redis key is, so no session key, whatever its characters, can name another key's lock.
``layout="flat"`` reads and writes the layout of telesession 0.1 (``{prefix}s:KEY``, no
braces; one server only), to move such data with ``telesession migrate``; its ``keys()``
skips names of the tagged layout, so both can share a prefix during the move.

A lock is taken with ``SET NX PX`` and a random token by a Lua script that also
returns the session (``load_locked`` right after costs no round trip), given back by a Lua
compare-and-delete (never another holder's lock), and kept alive by one daemon thread
per store that extends every held lease each ``lease / 3`` seconds (one script per hash
slot).  Saves and deletes are Lua compare-and-set: they write only while the stored record
is still the one loaded and the lock token is still ours; otherwise ``ConflictError``,
nothing written.  The save that ends a handler deletes the lock in the same script
(``save_and_release``), so an update costs two round trips.  With ``wait_replicas=N`` the
write is followed by ``WAIT`` on the same connection (same round trip).
"""
import logging
import math
import os
import secrets
import threading
import time
import weakref
from types import ModuleType
from typing import Any, Dict, Hashable, Iterator, List, Optional, Tuple, Type, Union, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from ..errors import ConflictError, StoreError
from .base import Store
from .redact import scrub

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

# KEYS lock keys (one hash slot); ARGV[1] lease ms, ARGV[i+1] token of KEYS[i].  1 renewed, 0 lost.
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
_BATCH = 500  # keys per MGET / renewal script

# Guards the per-process reset of a store's lease state; made anew in a forked child, since
# another thread of the parent may have held it at the instant of the fork.
_fork_guard = threading.Lock()


def _new_fork_guard() -> None:
    global _fork_guard
    _fork_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_fork_guard)
_IDLE_EXIT = 10.0  # seconds the renewal thread lingers with no lease before it exits
_RELEASE_RETRY = 0.5  # seconds between attempts to give back locks whose release failed


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` as a literal SCAN MATCH pattern."""
    return b"".join(b"\\" + bytes([c]) if c in _GLOB_SPECIAL else bytes([c]) for c in raw)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _tag(key: str) -> bytes:
    """``key`` as the inside of a hash tag: never empty, never starting with ``}`` (``~`` escapes)."""
    raw = _b(key)
    if not raw or raw[:1] in (b"}", b"~"):
        return b"~" + raw
    return raw


def _untag(raw: bytes) -> str:
    return (raw[1:] if raw[:1] == b"~" else raw).decode("utf-8", "surrogatepass")


class _Flavor:
    """The client package in use (``redis`` or ``valkey``): its error classes and constructors."""

    def __init__(self, name: str) -> None:
        import importlib

        self.name = name
        self.module: ModuleType = importlib.import_module(name)
        exceptions = importlib.import_module(f"{name}.exceptions")
        self.crc = importlib.import_module(f"{name}.crc")
        base = exceptions.RedisError if name == "redis" else exceptions.ValkeyError
        cluster_base = (exceptions.RedisClusterException if name == "redis"
                        else exceptions.ValkeyClusterException)
        #: Everything the client raises about the server (cluster ones are not RedisErrors).
        self.errors: Tuple[Type[BaseException], ...] = (base, cluster_base)
        #: Errors that mean the server (or the cluster's owner of a slot) could not be reached.
        self.unreachable: Tuple[Type[BaseException], ...] = (exceptions.ConnectionError, exceptions.TimeoutError,
                                              exceptions.ClusterDownError)
        self.cluster_base = cluster_base
        self.no_script = exceptions.NoScriptError
        self.ssl_connection = getattr(self.module, "SSLConnection", ())


_flavors: Dict[str, _Flavor] = {}


def _flavor(name: str) -> _Flavor:
    if name not in _flavors:
        _flavors[name] = _Flavor(name)
    return _flavors[name]


def _is_cluster(client: Any) -> bool:
    return hasattr(client, "get_primaries") and hasattr(client, "nodes_manager")


def _hosts(netloc: str, url: str) -> List[Tuple[str, int]]:
    """``h1:p1,h2:p2`` (after any ``user:password@``) as pairs."""
    hosts = netloc.rsplit("@", 1)[-1]
    pairs = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), "0"
        host = host.strip("[]")
        try:
            number = int(port) if port != "0" else 0
        except ValueError:
            number = -1
        if not host or not 0 < number < 65536:
            raise ValueError(f"bad Redis URL {scrub(url)!r}: {item.strip()!r} is not HOST:PORT")
        pairs.append((host, number))
    return pairs


class _Lease:
    """A lock this process holds: its Redis key, its token, and whether renewal found it lost.

    ``record`` is the session read together with the lock, for ``load_locked``;
    ``unreachable_since`` is when renewal first failed to reach Redis (``None``: it did not).
    """

    __slots__ = ("lock_key", "token", "lost", "record", "slot", "unreachable_since")

    def __init__(self, lock_key: bytes, token: bytes, record: Optional[bytes], slot: int) -> None:
        self.lock_key = lock_key
        self.token = token
        self.lost = False
        self.record: Any = record  # or _HANDED_OUT once load_locked returned it
        self.slot = slot
        self.unreachable_since: Optional[float] = None


_HANDED_OUT = object()  # a lease's record after load_locked: read again from Redis


class RedisStore(Store):
    """Sessions in Redis or Valkey; the lock of a key excludes every process on every machine.

    ``url_or_client``: a URL -- ``redis://[user:password@]host:port/db``, ``rediss://`` for
    TLS, ``unix:///path/redis.sock?db=0``, ``redis+cluster://HOST:PORT[,HOST:PORT...]``,
    ``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``, and each with ``valkey``
    (``valkeys``) instead of ``redis`` (``rediss``) for the ``valkey`` package; query
    parameters ``prefix``, ``lease``, ``wait_replicas`` and ``layout`` override the keywords --
    or a ready client of ``redis`` or ``valkey`` (``Redis``, ``RedisCluster``, a Sentinel's
    ``master_for(...)``, ``Valkey``, ``ValkeyCluster``), which the store then never closes.
    ``lease`` (seconds): how long a lock outlives a holder that died or stalled; a live
    holder renews it every ``lease / 3``.  ``wait_replicas=N``: a save or delete returns only
    once N replicas confirmed it (``WAIT``), else ``StoreError`` (not with a Cluster).
    ``socket_timeout`` and ``socket_connect_timeout`` bound every call; other keyword
    ``options`` go to the client's constructor.

    Redis being down raises ``StoreError`` naming the key and the server (never its
    password) and saying "Redis was unreachable"; the client reconnects by itself once Redis
    is back, and locks whose release failed meanwhile are given back then.
    """

    conditional = True

    def __init__(self, url_or_client: Union[str, Any], prefix: str = "telesession:", *,
                 lease: float = 30.0, wait_replicas: int = 0, layout: str = "tagged",
                 socket_timeout: float = 5.0, socket_connect_timeout: float = 5.0, **options: Any) -> None:
        ours: Dict[str, str] = {}
        if isinstance(url_or_client, str):  # ?prefix=...&lease=... are ours, not the client's
            url_or_client, ours = self._split_url(url_or_client)
            prefix = ours.get("prefix", prefix)
            layout = ours.get("layout", layout)
            lease = self._number(ours, "lease", lease, float)
            wait_replicas = self._number(ours, "wait_replicas", wait_replicas, int)
        if not lease > 0:
            raise ValueError(f"lease={lease!r}: must be a positive number of seconds")
        if not isinstance(wait_replicas, int) or wait_replicas < 0:
            raise ValueError(f"wait_replicas={wait_replicas!r}: must be a whole number >= 0")
        if layout not in ("tagged", "flat"):
            raise ValueError(f"layout={layout!r}: must be 'tagged' (the default) or 'flat' (telesession 0.1)")
        self.lease = float(lease)
        self._lease_ms = max(1, int(math.ceil(self.lease * 1000)))
        self.wait_replicas = wait_replicas
        self._wait_ms = max(50, int(socket_timeout * 500))  # WAIT gives up well before the socket does
        self.layout = layout
        self._sentinel: Optional[Tuple[str, List[Tuple[str, int]], int]] = None
        self._sentinel_clients: List[Any] = []
        self._password: Optional[str] = None
        if isinstance(url_or_client, str):
            self.client = self._connect(url_or_client, socket_timeout, socket_connect_timeout, options)
            self._owns_client = True
        else:
            if options:
                raise TypeError(f"options {sorted(options)} only apply when RedisStore is given a URL")
            self.client = url_or_client
            self._owns_client = False
            self._flavor = _flavor("valkey" if type(url_or_client).__module__.startswith("valkey") else "redis")
            given = getattr(getattr(url_or_client, "connection_pool", None), "connection_kwargs", {})
            if isinstance(given, dict) and given.get("socket_timeout"):  # WAIT must end before the socket's
                self._wait_ms = max(50, int(float(given["socket_timeout"]) * 500))
        self._errors = self._flavor.errors
        self.cluster = _is_cluster(self.client)
        try:
            self._check_options(wait_replicas, layout, prefix)
        except ValueError:
            if self._owns_client:
                self.client.close()
            raise
        self.prefix = prefix
        self._prefix = _b(prefix)
        if self._password is None:
            self._password = self._client_password()
        self.address, location = self._address()
        self.location: Hashable = location + (prefix, layout)
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
    def _number(ours: Dict[str, str], name: str, default: Any, kind: type) -> Any:
        if name not in ours:
            return default
        try:
            return kind(ours[name])
        except ValueError:
            raise ValueError(f"{name}={ours[name]!r} in the Redis URL: not a number") from None

    @staticmethod
    def _split_url(url: str) -> Tuple[str, Dict[str, str]]:
        """The URL without our query parameters (``prefix``, ``lease``, ...), and those."""
        head, _, rest = url.partition("?")
        query, hash_, fragment = rest.partition("#")
        ours: Dict[str, str] = {}
        kept = []
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in ("prefix", "lease", "wait_replicas", "layout"):
                ours[name] = value
            else:
                kept.append((name, value))
        if not ours:
            return url, ours
        return head + ("?" + urlencode(kept, quote_via=quote) if kept else "") + hash_ + fragment, ours

    def _connect(self, url: str, socket_timeout: float, socket_connect_timeout: float,
                 options: Dict[str, Any]) -> Any:
        """A client for ``url``: one server, a cluster or a Sentinel-managed master."""
        scheme, _, _ = url.partition(":")
        scheme = scheme.lower()
        base, _, mode = scheme.partition("+")
        package = "valkey" if base.startswith("valkey") else "redis"
        self._flavor = flavor = _flavor(package)
        tls = base in ("rediss", "valkeys")
        timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
        if mode == "":
            query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
            if "cluster" in query or "sentinel" in query:
                which = "cluster" if "cluster" in query else "sentinel"
                raise ValueError(f"bad Redis URL {scrub(url)!r}: for Redis {which.title()} use "
                                 f"{base}+{which}://HOST:PORT[,HOST:PORT...]"
                                 f"{'/SERVICE[/DB]' if which == 'sentinel' else ''}")
            backoff = import_module_attr(f"{package}.backoff")
            retry = import_module_attr(f"{package}.retry")
            jitter = getattr(backoff, "ExponentialWithJitterBackoff", None) or backoff.EqualJitterBackoff
            options.setdefault("retry", retry.Retry(jitter(cap=0.25, base=0.02), 2))
            client_class = flavor.module.Redis if package == "redis" else flavor.module.Valkey
            try:
                return client_class.from_url(url, **timeouts, **options)
            except ValueError as exc:
                raise ValueError(f"bad Redis URL {scrub(url)!r}: {exc}") from None
        if mode not in ("cluster", "sentinel"):
            raise ValueError(f"bad Redis URL {scrub(url)!r}: unknown mode {mode!r}; "
                             f"use {base}://, {base}+cluster:// or {base}+sentinel://")
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if query:
            raise ValueError(f"bad Redis URL {scrub(url)!r}: unknown parameter(s) {sorted(query)}; "
                             f"{base}+{mode}:// takes prefix, lease, wait_replicas and layout")
        nodes = _hosts(parts.netloc, url)
        auth: Dict[str, Any] = {}
        if "@" in parts.netloc:
            userinfo = parts.netloc.rsplit("@", 1)[0]
            user, _, password = userinfo.partition(":")
            if user:
                auth["username"] = unquote(user)
            if password:
                auth["password"] = self._password = unquote(password)
        if tls:
            auth["ssl"] = True
        path = [unquote(p) for p in parts.path.split("/") if p]
        if mode == "cluster":
            if path and path != ["0"]:
                raise ValueError(f"bad Redis URL {scrub(url)!r}: a cluster has only database 0")
            cluster = import_module_attr(f"{package}.cluster")
            node_class = cluster.ClusterNode
            cluster_class = cluster.RedisCluster if package == "redis" else cluster.ValkeyCluster
            try:
                return cluster_class(startup_nodes=[node_class(h, p) for h, p in nodes],
                                     **timeouts, **auth, **options)
            except flavor.errors as exc:
                raise StoreError(f"Redis was unreachable: cannot connect to the cluster at "
                                 f"{scrub(url)}: {type(exc).__name__}: {exc}", None, scrub(url)) from exc
        if not path or len(path) > 2:
            raise ValueError(f"bad Redis URL {scrub(url)!r}: name the service, "
                             f"{base}+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]")
        service = path[0]
        try:
            db = int(path[1]) if len(path) > 1 else 0
        except ValueError:
            raise ValueError(f"bad Redis URL {scrub(url)!r}: database {path[1]!r} is not a number") from None
        sentinel_module = import_module_attr(f"{package}.sentinel")
        sentinel = sentinel_module.Sentinel(nodes, sentinel_kwargs=dict(timeouts), **timeouts)
        self._sentinel = (service, nodes, db)
        self._sentinel_clients = list(sentinel.sentinels)  # ours to close, like the master's pool
        return sentinel.master_for(service, db=db, **timeouts, **auth, **options)

    def _client_password(self) -> Optional[str]:
        for holder in ("connection_pool", "nodes_manager"):
            kwargs = getattr(getattr(self.client, holder, None), "connection_kwargs", None)
            if isinstance(kwargs, dict) and kwargs.get("password"):
                return str(kwargs["password"])
        return None

    def _check_options(self, wait_replicas: int, layout: str, prefix: str) -> None:
        """Refuse what cannot work on this deployment.  A prefix may carry a complete hash tag of its
        own (all sessions in one slot), not half of one."""
        if self.cluster and wait_replicas:
            raise ValueError("wait_replicas is not supported with Redis Cluster: WAIT must follow the write "
                             "on its connection; use a Sentinel-managed master, or min-replicas-to-write")
        if self.cluster and layout == "flat":
            raise ValueError("layout='flat' cannot work with Redis Cluster (a session's lock and record "
                             "hash to different slots); move the data with telesession migrate")
        raw = _b(prefix)
        opening = raw.find(b"{")
        if layout == "tagged" and opening >= 0:
            closing = raw.find(b"}", opening + 1)
            if closing < 0 or closing == opening + 1:
                raise ValueError(f"prefix {prefix!r}: a '{{' needs a '}}' after it with something "
                                 f"in between (a hash tag), or no braces at all")

    def _address(self) -> Tuple[str, Tuple[Any, ...]]:
        """A credential-free address for messages, and the identity of the server and db."""
        family = "valkey" if self._flavor.name == "valkey" else "redis"
        if self.cluster:
            try:
                names = sorted(f"{n.host}:{n.port}" for n in self.client.get_primaries())
            except Exception:  # pragma: no cover - an unusual client
                names = [repr(self.client)]
            return f"{family}+cluster://{','.join(names)}", ("redis-cluster", tuple(names))
        pool: Any = getattr(self.client, "connection_pool", None)
        if self._sentinel is None and hasattr(pool, "service_name") and hasattr(pool, "sentinel_manager"):
            sentinels = []
            for node in getattr(pool.sentinel_manager, "sentinels", []):
                kwargs = node.connection_pool.connection_kwargs
                sentinels.append((kwargs.get("host", "localhost"), kwargs.get("port", 26379)))
            self._sentinel = (pool.service_name, sentinels, pool.connection_kwargs.get("db", 0) or 0)
        if self._sentinel is not None:
            service, nodes, db = self._sentinel
            names = sorted(f"{h}:{p}" for h, p in nodes)
            return (f"{family}+sentinel://{','.join(names)}/{service}/{db}",
                    ("redis-sentinel", service, tuple(names), db))
        try:
            kwargs = pool.connection_kwargs
        except AttributeError:  # pragma: no cover - an unusual client
            return repr(self.client), ("redis", id(self.client))
        db = kwargs.get("db", 0) or 0
        path = kwargs.get("path")
        if path:
            return f"unix://{path}?db={db}", ("redis", "unix", path, db)
        host = kwargs.get("host", "localhost")
        port = kwargs.get("port", 6379)
        connection_class = getattr(pool, "connection_class", None)
        tls = (isinstance(connection_class, type) and bool(self._flavor.ssl_connection)
               and issubclass(connection_class, self._flavor.ssl_connection))
        scheme = family + ("s" if tls else "")
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
            # Locks whose release could not reach Redis: lock key -> (session key, token, give up at).
            self._pending: Dict[bytes, Tuple[str, bytes, float]] = {}
            self._cond = threading.Condition(threading.Lock())
            self._renewer: Optional[threading.Thread] = None
            self._pid = pid

    # -- helpers ------------------------------------------------------------------------

    def _session_key(self, key: str) -> bytes:
        if self.layout == "flat":
            return self._prefix + b"s:" + _b(key)
        return self._prefix + b"s:{" + _tag(key) + b"}"

    def _lock_key(self, key: str) -> bytes:
        if self.layout == "flat":
            return self._prefix + b"l:" + _b(key)
        return self._prefix + b"l:{" + _tag(key) + b"}"

    def _slot(self, name: bytes) -> int:
        return int(self._flavor.crc.key_slot(name)) if self.cluster else 0

    def describe(self, key: str) -> str:
        name = self._session_key(key).decode("utf-8", "surrogatepass")
        return f"Redis key {name!r} at {self.address}"

    def _unreachable(self, exc: BaseException) -> bool:
        if isinstance(exc, self._flavor.cluster_base):  # "Redis Cluster cannot be connected", or a bug
            return "connect" in str(exc).lower()
        return isinstance(exc, self._flavor.unreachable)

    def _error(self, exc: BaseException, key: Optional[str], doing: str) -> StoreError:
        where = (self.describe(key) if key is not None
                 else f"Redis keys {self.prefix + 's:*'!r} at {self.address}")
        cause = "Redis was unreachable" if self._unreachable(exc) else "Redis failed"
        return StoreError(f"{cause} while {doing} {where}: {type(exc).__name__}: "
                          f"{self._scrub(str(exc))}", key, where)

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _after_error(self, exc: BaseException) -> None:
        """On a demoted or replica-less master (a failover), drop pooled connections: the next
        call asks Sentinel for the current master."""
        text = str(exc)
        if (text.startswith(("READONLY", "NOREPLICAS")) or "previous master" in text
                or type(exc).__name__ == "ReadOnlyError"):
            self._reconnect()

    def _reconnect(self) -> None:
        if self.cluster:
            return  # the cluster client follows MOVED redirections itself
        pool = getattr(self.client, "connection_pool", None)
        try:  # idle ones only: a connection in use by another thread is its to drop on its error
            if pool is not None:
                pool.disconnect(inuse_connections=False)
        except Exception:  # pragma: no cover - best effort
            logger.debug("could not drop the connections to %s", self.address, exc_info=True)

    def _run(self, key: Optional[str], doing: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)`` with every client error wrapped in ``StoreError``."""
        try:
            return call(*args, **kwargs)
        except self._errors as exc:
            self._after_error(exc)
            raise self._error(exc, key, doing) from exc

    def _write(self, key: str, doing: str, script: Any, keys: List[bytes], args: List[Any]) -> Any:
        """Run a write script; with ``wait_replicas``, ``WAIT`` for the replicas in the same round trip."""
        if not self.wait_replicas:
            return self._run(key, doing, script, keys=keys, args=args)
        for attempt in (1, 2):
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", self.wait_replicas, self._wait_ms)
                result, acked = pipe.execute(raise_on_error=False)
            except self._errors as exc:
                self._after_error(exc)
                raise self._error(exc, key, doing) from exc
            if isinstance(result, self._flavor.no_script) and attempt == 1:
                self._run(key, doing, self.client.script_load, script.script)
                continue
            break
        if isinstance(result, BaseException):
            self._after_error(result)
            raise self._error(result, key, doing) from result
        if isinstance(acked, BaseException) or int(acked) < self.wait_replicas:
            self._reconnect()  # a master that lost its replicas may have been replaced: ask again
            got = acked if isinstance(acked, BaseException) else f"{int(acked)} of {self.wait_replicas}"
            raise StoreError(
                f"Redis did not confirm the write of session {key!r} on {self.wait_replicas} replica(s) "
                f"within {self._wait_ms} ms (WAIT answered {got}; wait_replicas={self.wait_replicas}, "
                f"{self.describe(key)}); it may be lost in a failover", key, self.describe(key))
        return result

    def _held_lease(self, key: str) -> Optional[_Lease]:
        """The lease of ``key`` if the calling thread holds it through this store."""
        self._proc_state()
        if not self._thread_locks().holds(key):
            return None
        return self._leases.get(key)

    @staticmethod
    def _bytes(value: Any) -> Any:
        return _b(value) if isinstance(value, str) else value  # a client with decode_responses=True

    # -- the Store protocol -------------------------------------------------------------

    def load_locked(self, key: str, token: Any) -> Optional[bytes]:
        """The record the lock script read a moment ago (a re-entered lock has none: read it)."""
        if isinstance(token, _Lease) and token.record is not _HANDED_OUT:
            record, token.record = token.record, _HANDED_OUT
            return cast(Optional[bytes], record)
        return self.load(key)

    def load(self, key: str) -> Optional[bytes]:
        return cast(Optional[bytes], self._bytes(self._run(key, "reading", self.client.get, self._session_key(key))))

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        """Write ``record`` if the stored value is still ``previous`` and our lock still holds."""
        lease = self._held_lease(key)
        self._check_lease(lease, key)
        result = self._write(key, "writing", self._save_script, [self._session_key(key), self._lock_key(key)],
                             self._save_args(lease, record, previous, ttl, release=False))
        self._check_result(result, lease, key, "nothing was overwritten")

    def save_and_release(self, key: str, record: bytes, *, previous: Optional[bytes], ttl: Optional[float],
                         token: Any) -> None:
        """Write and give the lock back in one round trip (the script deletes our lock either way)."""
        self._proc_state()
        if not isinstance(token, _Lease) or token.lost or self._leases.get(key) is not token:
            super().save_and_release(key, record, previous=previous, ttl=ttl, token=token)
            return
        try:
            result = self._write(key, "writing", self._save_script, [self._session_key(key), token.lock_key],
                                 self._save_args(token, record, previous, ttl, release=True))
        except BaseException:
            self.release(key, token)  # did it run?  Give the lock back if it is still ours
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
        result = self._write(key, "deleting", self._delete_script, [self._session_key(key), self._lock_key(key)],
                             args)
        self._check_result(result, lease, key, "it was not deleted")

    def _why_lost(self, lease: Optional[_Lease]) -> str:
        if lease is not None and lease.unreachable_since is not None:
            return (f"Redis was unreachable for {time.monotonic() - lease.unreachable_since:.1f} s while the "
                    f"handler ran, so its lease of {self.lease:g} s could not be renewed")
        return f"its lease of {self.lease:g} s ran out and another holder may have taken it"

    def _check_lease(self, lease: Optional[_Lease], key: str) -> None:
        if lease is not None and lease.lost:
            raise ConflictError(
                f"the lock of session {key!r} was lost while the handler ran ({self._why_lost(lease)}; "
                f"{self.describe(key)}); nothing was written", key, self.describe(key))

    def _check_result(self, result: Any, lease: Optional[_Lease], key: str, outcome: str) -> None:
        if result == 1:
            return
        if result == -1:
            if lease is not None:
                lease.lost = True
            raise ConflictError(
                f"the lock of session {key!r} is no longer ours ({self._why_lost(lease)}; "
                f"{self.describe(key)}); {outcome}", key, self.describe(key))
        raise ConflictError(
            f"session {key!r} was changed by another writer since it was loaded "
            f"({self.describe(key)}); {outcome}", key, self.describe(key))

    def _names(self, prefix: str) -> Iterator[Tuple[str, bytes]]:
        """(session key, Redis key) of every session whose key starts with ``prefix``, by ``SCAN``."""
        if self.layout == "flat":
            head, lead, tail = self._prefix + b"s:", _b(prefix), b""
        else:
            head, lead, tail = self._prefix + b"s:{", _tag(prefix) if prefix else b"", b"}"
        pattern = _glob_escape(head + lead) + b"*"
        try:
            for name in self.client.scan_iter(match=pattern, count=1000):
                name = self._bytes(name)
                if not name.startswith(head) or not name.endswith(tail):
                    continue
                inner = name[len(head):len(name) - len(tail)]
                if self.layout == "flat" and inner[:1] == b"{" and inner[-1:] == b"}":
                    continue  # a record of the tagged layout beside the old one (mid-migration)
                key = inner.decode("utf-8", "surrogatepass") if self.layout == "flat" else _untag(inner)
                if key.startswith(prefix):
                    yield key, name
        except self._errors as exc:
            raise self._error(exc, None, "listing") from exc

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every session key starting with ``prefix``, by ``SCAN`` (never ``KEYS``), streamed."""
        for key, _ in self._names(prefix):
            yield key

    def records(self, prefix: str = "") -> Iterator[Tuple[str, bytes]]:
        """Every (key, record) whose key starts with ``prefix``, without locks: ``SCAN`` + ``MGET``
        in batches (split per hash slot on a cluster)."""
        batch: List[Tuple[str, bytes]] = []
        for item in self._names(prefix):
            batch.append(item)
            if len(batch) >= _BATCH:
                yield from self._fetch(batch)
                batch = []
        if batch:
            yield from self._fetch(batch)

    def _fetch(self, batch: List[Tuple[str, bytes]]) -> Iterator[Tuple[str, bytes]]:
        names = [name for _, name in batch]
        mget = self.client.mget_nonatomic if self.cluster else self.client.mget
        values = self._run(None, "reading", mget, names)
        for (key, _), value in zip(batch, values):
            if value is not None:  # expired or deleted since the scan
                yield key, self._bytes(value)

    def purge_expired(self, now: Optional[float] = None) -> int:
        """Nothing to do: Redis drops a session whose ``ttl`` ran out by itself."""
        return 0

    # -- locking between processes and machines -----------------------------------------

    def _lock_external(self, key: str, timeout: float) -> Any:
        self._proc_state()
        lock_key = self._lock_key(key)
        if lock_key in self._pending:
            self._retry_releases(only=lock_key)  # our own earlier lock on it, not yet given back
        token = secrets.token_hex(16).encode()
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            got = self._run(key, "locking", self._acquire_script, keys=[lock_key, self._session_key(key)],
                            args=[token, self._lease_ms])
            if got:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(key, timeout)
            time.sleep(min(delay * (0.5 + secrets.randbelow(1000) / 1000), remaining))
            delay = min(delay * 2, 0.05)
        record = self._bytes(got[1]) if len(got) > 1 else None
        lease = _Lease(lock_key, token, record, self._slot(lock_key))
        with self._cond:
            self._leases[key] = lease
            self._ensure_renewer()
        return lease

    def _ensure_renewer(self) -> None:
        """Start the renewal thread if none runs (call with ``self._cond`` held)."""
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=_renew_loop, args=(weakref.ref(self),),
                                             name=f"telesession-redis-lease-{self.prefix}", daemon=True)
            self._renewer.start()

    def _unlock_external(self, key: str, token: Any) -> None:
        self._proc_state()
        with self._cond:
            if self._leases.get(key) is token:
                del self._leases[key]
        if not isinstance(token, _Lease):  # pragma: no cover - a token from another process
            return
        try:
            self._release_script(keys=[token.lock_key], args=[token.token])
        except self._errors as exc:
            self._after_error(exc)
            cause = "Redis was unreachable" if self._unreachable(exc) else "Redis failed"
            logger.warning("could not release the lock of session %r (%s): %s: %s; retrying every %g s "
                           "until Redis answers (the lease expires within %g s anyway)", key, self.describe(key),
                           cause, self._scrub(str(exc)), _RELEASE_RETRY, self.lease)
            with self._cond:
                self._pending[token.lock_key] = (key, token.token, time.monotonic() + self.lease + 5)
                self._ensure_renewer()
                self._cond.notify_all()

    def _retry_releases(self, only: Optional[bytes] = None) -> None:
        """Give back the locks whose release failed; keep the ones Redis still cannot be asked about."""
        with self._cond:
            items = [(k, v) for k, v in self._pending.items() if only is None or k == only]
        now = time.monotonic()
        for lock_key, (key, token, give_up) in items:
            if now > give_up:  # its lease has run out in Redis by now (AOF keeps absolute expiry)
                with self._cond:
                    self._pending.pop(lock_key, None)
                continue
            try:
                self._release_script(keys=[lock_key], args=[token])
            except self._errors as exc:
                self._after_error(exc)
                return  # still unreachable: try again later
            with self._cond:
                if self._pending.get(lock_key, (None, None))[1] == token:
                    del self._pending[lock_key]
            logger.info("released the lock of session %r (%s) once Redis answered again", key, self.describe(key))

    def _renew_once(self) -> None:
        """Extend every lease this process holds, one script per hash slot; mark the ones found lost."""
        with self._cond:
            leases = list(self._leases.values())
        groups: Dict[int, List[_Lease]] = {}
        for lease in leases:
            groups.setdefault(lease.slot, []).append(lease)
        for slot_leases in groups.values():
            for start in range(0, len(slot_leases), _BATCH):
                self._renew_chunk(slot_leases[start:start + _BATCH])

    def _renew_chunk(self, chunk: List[_Lease]) -> None:
        try:
            results = self._renew_script(keys=[lease.lock_key for lease in chunk],
                                         args=[self._lease_ms] + [lease.token for lease in chunk])
        except self._errors as exc:
            self._after_error(exc)
            if self._unreachable(exc):
                now = time.monotonic()
                for lease in chunk:
                    if lease.unreachable_since is None:
                        lease.unreachable_since = now
            cause = "Redis was unreachable" if self._unreachable(exc) else "Redis failed"
            logger.warning("could not renew %d Redis lock lease(s) at %s: %s: %s", len(chunk),
                           self.address, cause, self._scrub(str(exc)))
            return
        with self._cond:
            current = set(map(id, self._leases.values()))
        for lease, ok in zip(chunk, results):
            if ok:
                lease.unreachable_since = None
            elif not lease.lost and id(lease) in current:  # not merely released meanwhile
                lease.lost = True
                logger.warning("lost the Redis lock %s: %s", lease.lock_key.decode("utf-8", "replace"),
                               self._why_lost(lease))

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop lease renewal and, for a client made from a URL, close its connections."""
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        if self._owns_client:
            for client in [self.client] + self._sentinel_clients:
                try:
                    client.close()
                except Exception:  # pragma: no cover
                    pass

    def __repr__(self) -> str:
        return f"RedisStore({self.address!r}, prefix={self.prefix!r})"


def import_module_attr(name: str) -> ModuleType:
    """``importlib.import_module``, named for what it is used for here: a client submodule."""
    import importlib

    return importlib.import_module(name)


def _renew_loop(ref: "weakref.ReferenceType[RedisStore]") -> None:
    """The renewal thread: every ``lease / 3`` extend held leases, and retry failed releases
    every ``_RELEASE_RETRY``; exit when idle or closed.  Any error is logged, never fatal.

    It refers to the store only weakly while it sleeps, so an abandoned store can be collected.
    """
    me = threading.current_thread()
    idle_since = time.monotonic()
    next_renewal = time.monotonic()
    while True:
        store = ref()
        if store is None or store._closed or store._renewer is not me:
            return
        cond, interval = store._cond, store.lease / 3
        wait = min(interval, _RELEASE_RETRY) if store._pending else interval
        del store
        with cond:
            cond.wait(wait)
        store = ref()
        if store is None or store._closed:
            return
        try:
            with cond:
                busy = bool(store._leases)
                pending = bool(store._pending)
                if not busy and not pending and time.monotonic() - idle_since > max(_IDLE_EXIT, store.lease):
                    store._renewer = None
                    return
            if pending:
                store._retry_releases()
            if busy:
                idle_since = time.monotonic()
                if time.monotonic() >= next_renewal - 0.01:
                    next_renewal = time.monotonic() + interval
                    store._renew_once()
            else:
                next_renewal = time.monotonic()
        except Exception:  # a bug or a client surprise must not end renewal for good
            logger.exception("the Redis lease renewal of %s failed; it goes on", store.address)
        del store
