"""``PostgresStore``: every session a row of one PostgreSQL table, for bots that already run PostgreSQL.

Schema (created if missing; ``table`` may be ``"name"`` or ``"schema.name"``)::

    CREATE TABLE telesession_sessions (
        key     text COLLATE "C" PRIMARY KEY,  -- the stored session key
        record  bytea NOT NULL,                -- the record (JSON, see telesession.records)
        written timestamptz NOT NULL,          -- server time of the last write
        expires timestamptz                    -- written + ttl; NULL: no ttl
    );
    CREATE INDEX ... ON telesession_sessions (expires, key) WHERE expires IS NOT NULL;

A row whose ``expires`` has passed is treated as absent (load, ``keys``, ``records``)
and removed by ``purge_expired`` (``telesession purge-expired URL``).

Locking: holding a key is a transaction on one pooled connection that took the
transaction-scoped advisory lock ``pg_advisory_xact_lock(hashtextextended(key, seed))``
(``seed`` from the table's name, so two tables never share locks) under a ``lock_timeout``,
and it lasts while the handler runs; the save that ends the handler and ``COMMIT`` travel
in one round trip, so the write is visible before the lock is free.  An update costs two
round trips (BEGIN + lock + SELECT pipelined; UPDATE + COMMIT pipelined).  Threads of one
process waiting for the same key queue in-process without a connection; a process killed
while holding a key loses its connection and with it the lock, at once.  Each key held at
the same time holds one connection: ``max_size`` (default 10) bounds how many keys one
process holds at once, and the others wait for a connection (``StoreError`` after
``timeout``).
"""
import hashlib
import logging
import os
import re
import threading
import time
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, Hashable, Iterator, List, Optional, Tuple, Union
from urllib.parse import parse_qsl, quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import ConflictError, LockTimeout, StoreError
from ..locking import current_pid
from .base import Store
from .url import scrub

__all__ = ["PostgresStore"]

logger = logging.getLogger("telesession")

_OUR_PARAMS = ("table", "min_size", "max_size", "timeout")
_PAGE = 500  # rows per batch of records() and purge_expired()
_ITERSIZE = 2000  # keys fetched per round trip by keys()' server-side cursor
_COLUMNS = {"key": "text", "record": "bytea", "written": "timestamp with time zone",
            "expires": "timestamp with time zone"}

# Connections and pools inherited through fork() belong to the parent: closing (or merely
# collecting) them in the child would end the parent's sessions with the server, so a child
# keeps them referenced, never used.
_inherited: List[Any] = []
# Keys this process holds, per store location: (location, key) -> _Hold.  Two store objects
# over one table find each other's held connection (the KeyLocks are shared the same way).
_holds: Dict[Tuple[Hashable, str], "_Hold"] = {}


def _after_fork_in_child() -> None:
    _holds.clear()  # the parent's transactions are not this process's


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Hold:
    """A key held by this process: its connection in an open transaction holding the advisory lock."""

    __slots__ = ("conn", "record", "fresh", "dirty", "autocommit")

    def __init__(self, conn: "psycopg.Connection[Any]", record: Optional[bytes], autocommit: bool) -> None:
        self.conn = conn
        self.record = record  # read right after the lock, for load_locked
        self.fresh = True  # record not yet handed out
        self.dirty = False  # written inside the transaction: COMMIT must succeed
        self.autocommit = autocommit  # the connection's setting before we took it


def _prefix_end(prefix: str) -> Optional[str]:
    """The smallest string greater than every string that starts with ``prefix`` (code point order)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:
            code = 0xE000
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


class PostgresStore(Store):
    """Sessions in a PostgreSQL table; the lock of a key excludes every process on every machine.

    ``dsn_or_pool``: a URL (``postgresql://user:password@host:5432/db``; the query parameters
    ``table``, ``min_size``, ``max_size`` and ``timeout`` are ours, the others go to libpq), a
    libpq ``key=value`` string, or a ``psycopg_pool.ConnectionPool``, which the store then
    never closes.  ``min_size``/``max_size``: the pool made from a DSN (one connection per
    key held at once, see the module docstring); ``timeout`` (seconds): how long an
    operation waits for a free connection; ``connect_timeout``: how long opening one may
    take.  ``create_table=False``: a missing table is a ``StoreError`` instead of being created.
    Other keyword ``options`` go to ``psycopg.connect``.

    The server being down or restarting raises ``StoreError`` naming the key and the server
    (never the password); the pool reconnects by itself once the server is back.  Saves are
    conditional (``conditional = True``).  Needs PostgreSQL 11 or newer.
    """

    conditional = True

    def __init__(self, dsn_or_pool: Union[str, ConnectionPool], table: str = "telesession_sessions", *,
                 min_size: int = 1, max_size: int = 10, timeout: float = 10.0, connect_timeout: float = 5.0,
                 create_table: bool = True, **options: Any) -> None:
        if isinstance(dsn_or_pool, str):
            conninfo, ours = self._split_url(dsn_or_pool)
            table = ours.get("table", table)
            try:
                min_size = int(ours.get("min_size", min_size))
                max_size = int(ours.get("max_size", max_size))
                timeout = float(ours.get("timeout", timeout))
            except ValueError as exc:
                raise ValueError(f"bad number in the PostgreSQL URL {scrub(dsn_or_pool)!r}: {exc}") from None
            try:
                params = conninfo_to_dict(conninfo)
            except psycopg.ProgrammingError as exc:
                raise ValueError(f"bad PostgreSQL URL {scrub(dsn_or_pool)!r}: "
                                 f"{self._scrub_text(str(exc), None)}") from None
            self._password = params.get("password")
            if "connect_timeout" not in params:
                options.setdefault("connect_timeout", max(1, int(round(connect_timeout))))
            options["autocommit"] = True
            self._conninfo, self._kwargs = conninfo, options
            self._owns_pool = True
        elif isinstance(dsn_or_pool, ConnectionPool):
            if options:
                raise TypeError(f"options {sorted(options)} only apply when PostgresStore is given a DSN")
            conninfo_given: Any = dsn_or_pool.conninfo  # psycopg_pool >= 3.3 also takes callables
            kwargs_given: Any = dsn_or_pool.kwargs
            self._conninfo = str(conninfo_given() if callable(conninfo_given) else conninfo_given)
            self._kwargs = dict((kwargs_given() if callable(kwargs_given) else kwargs_given) or {})
            self._password = conninfo_to_dict(self._conninfo).get("password") or self._kwargs.get("password")
            min_size, max_size = dsn_or_pool.min_size, dsn_or_pool.max_size
            self._owns_pool = False
        else:
            raise TypeError(f"PostgresStore needs a DSN/URL or a psycopg_pool.ConnectionPool, "
                            f"not {type(dsn_or_pool).__name__}")
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(f"min_size={min_size}, max_size={max_size}: need 0 <= min_size <= max_size, max_size >= 1")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout!r}: must be a positive number of seconds")
        if not table or "\x00" in table:
            raise ValueError(f"table={table!r}: not a table name")
        self.min_size, self.max_size, self.timeout = min_size, max_size, float(timeout)
        self._create_table = create_table
        schema, _, name = table.rpartition(".")
        self.table = table
        self._ident = sql.Identifier(schema, name) if schema else sql.Identifier(name)
        self._pipelined = psycopg.Pipeline.is_supported()
        self._mutex = threading.Lock()
        self._closed = False
        self._out = 0  # connections this process has taken and not given back (see _getconn)
        self._count = threading.Lock()
        self.address = "postgresql://?"
        self._pool_pid = current_pid()
        self._pool = dsn_or_pool if isinstance(dsn_or_pool, ConnectionPool) else self._new_pool()
        try:
            self._initialize()
        except BaseException:
            self.close()
            raise

    # -- configuration ------------------------------------------------------------------

    @staticmethod
    def _split_url(url: str) -> Tuple[str, Dict[str, str]]:
        """The URL without our query parameters, and those."""
        if "://" not in url:  # a key=value conninfo: nothing of ours in it
            return url, {}
        head, _, rest = url.partition("?")
        query, hash_, fragment = rest.partition("#")
        ours: Dict[str, str] = {}
        kept = []
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in _OUR_PARAMS:
                ours[name] = value
            else:
                kept.append((name, value))
        if head.lower().startswith("postgres://"):
            head = "postgresql://" + head[len("postgres://"):]
        return head + ("?" + urlencode(kept, quote_via=quote) if kept else "") + hash_ + fragment, ours

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(self._conninfo, kwargs=self._kwargs, min_size=self.min_size, max_size=self.max_size,
                              timeout=self.timeout, name="telesession", open=True)

    def _current_pool(self) -> ConnectionPool:
        """This process's pool; a forked child makes its own (the parent's sockets are not its)."""
        if self._pool_pid != current_pid():
            with self._mutex:
                if self._pool_pid != current_pid():
                    _inherited.append(self._pool)
                    self._pool = self._new_pool()
                    self._owns_pool = True
                    self._out = 0
                    self._count = threading.Lock()
                    self._pool_pid = current_pid()
        return self._pool

    def _initialize(self) -> None:
        """Create the table and its index if missing (one process at a time), check its columns,
        and derive the lock seed and the location from the table's canonical name."""
        conn = self._getconn(None, self.timeout)
        try:
            info = conn.info
            self.address = f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"
            target = self._ident.as_string(conn)
            exists = conn.execute("SELECT to_regclass(%s)", (target,)).fetchone()[0]  # type: ignore[index]
            if exists is None and not self._create_table:
                raise StoreError(f"no table {self.table} at {self.address}", None, self.address)
            if exists is None:
                name = self.table.rpartition(".")[2]
                index = sql.Identifier(f"{name[:40]}_expires_{hashlib.blake2b(self.table.encode(), digest_size=3).hexdigest()}")
                with conn.transaction():
                    # Processes starting together would race on CREATE TABLE IF NOT EXISTS (a unique
                    # violation in pg_type): serialize them on one advisory lock per table name.
                    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("telesession:" + target,))
                    conn.execute(sql.SQL(
                        'CREATE TABLE IF NOT EXISTS {t} (key text COLLATE "C" PRIMARY KEY, record bytea NOT NULL, '
                        "written timestamptz NOT NULL, expires timestamptz)").format(t=self._ident))
                    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (expires, key) "
                                         "WHERE expires IS NOT NULL").format(i=index, t=self._ident))
            row = conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass(%s)", (target,)).fetchone()
            if row is None:  # pragma: no cover - dropped in between
                raise StoreError(f"table {self.table} vanished while opening it at {self.address}", None, self.address)
            schema, name = row
            columns = dict(conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s", (schema, name)).fetchall())
        except psycopg.errors.InsufficientPrivilege as exc:
            self._putconn(conn)
            raise StoreError(f"PostgreSQL refused to create or read table {self.table} at {self.address}: "
                             f"{self._scrub_text(str(exc).strip())}; create it as shown in the PostgresStore "
                             f"docs, or grant the privilege", None, self.address) from exc
        except psycopg.Error as exc:
            self._putconn(conn)
            raise self._error(exc, None, "opening") from exc
        except BaseException:
            self._putconn(conn)
            raise
        self._putconn(conn)
        self.qualified = f"{schema}.{name}"
        self._ident = sql.Identifier(schema, name)  # the statements name it fully: search_path cannot move it
        wrong = {c: t for c, t in _COLUMNS.items() if columns.get(c) != t}
        if wrong:
            raise StoreError(
                f"table {self.qualified} at {self.address} is not telesession's (column "
                f"{', '.join(f'{c} should be {t}' for c, t in wrong.items())}); use another table=",
                None, self.address)
        self._seed = int.from_bytes(hashlib.blake2b(self.qualified.encode("utf-8", "surrogatepass"),
                                                    digest_size=8).digest(), "big", signed=True)
        self.location: Hashable = ("postgresql", info.host, info.port, info.dbname, schema, name)
        self._sql = self._statements(conn)

    def _statements(self, conn: Any) -> Dict[str, str]:
        live = "(expires IS NULL OR expires > now())"
        ttl = "now() + %s::float8 * interval '1 second'"
        statements = {
            "begin": "BEGIN ISOLATION LEVEL READ COMMITTED",
            "lock_timeout": "SELECT set_config('lock_timeout', %s, true)",
            "lock": "SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))",
            "try_lock": "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, %s))",
            "load": f"SELECT record FROM {{t}} WHERE key = %s AND {live}",
            "insert": (f"INSERT INTO {{t}} AS s (key, record, written, expires) VALUES (%s, %b, now(), {ttl}) "
                       "ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record, written = EXCLUDED.written, "
                       "expires = EXCLUDED.expires WHERE s.expires IS NOT NULL AND s.expires <= now()"),
            "update": f"UPDATE {{t}} SET record = %b, written = now(), expires = {ttl} WHERE key = %s AND record = %b",
            "delete": "DELETE FROM {t} WHERE key = %s",
            "delete_if": "DELETE FROM {t} WHERE key = %s AND record = %b",
            "exists": f"SELECT 1 FROM {{t}} WHERE key = %s AND {live}",
            "keys": f"SELECT key FROM {{t}} WHERE {live}",
            "keys_prefix": f'SELECT key FROM {{t}} WHERE key >= %s AND key < %s AND {live}',
            "keys_prefix_open": f"SELECT key FROM {{t}} WHERE key >= %s AND {live}",
            "records": f"SELECT key, record FROM {{t}} WHERE key > %s AND {live} ORDER BY key LIMIT {_PAGE}",
            "records_first": f"SELECT key, record FROM {{t}} WHERE key >= %s AND {live} ORDER BY key LIMIT {_PAGE}",
            "expired": (f"SELECT expires, key FROM {{t}} WHERE expires IS NOT NULL AND expires <= %s "
                        f"AND (expires, key) > (%s, %s) ORDER BY expires, key LIMIT {_PAGE}"),
            "purge": ("DELETE FROM {t} WHERE key = ANY(%s) AND expires <= %s "
                      "AND pg_try_advisory_xact_lock(hashtextextended(key, %s))"),
        }
        return {name: sql.SQL(text).format(t=self._ident).as_string(conn) if "{t}" in text else text  # type: ignore[arg-type]
                for name, text in statements.items()}

    # -- connections and errors ---------------------------------------------------------

    def _getconn(self, key: Optional[str], timeout: float) -> "psycopg.Connection[Any]":
        """A connection from this process's pool, autocommit; ``StoreError`` when there is none.

        When the pool has nothing to give within a moment although this process uses fewer
        than ``max_size`` of its connections, the pool is (re)connecting -- after a server
        restart it retries with a growing delay -- so connect directly: that either fails
        at once with libpq's reason (the server is down: ``StoreError``) or yields a
        connection for this one operation.  A pool whose connections are all in use here
        is waited for, up to ``timeout``.
        """
        if self._closed:
            raise StoreError(f"{self!r} is closed", key, self.address)
        pool = self._current_pool()
        try:
            conn = pool.getconn(timeout=min(timeout, 0.25))
        except PoolTimeout:
            conn = None
        if conn is None:
            if self._out < pool.max_size:
                conn = self._connect_directly(key)
            else:
                try:
                    conn = pool.getconn(timeout=max(timeout - 0.25, 0.05))
                except PoolTimeout:
                    where = self.describe(key) if key is not None else self.address
                    raise StoreError(
                        f"no PostgreSQL connection free within {timeout:g} s for {where}: all "
                        f"{pool.max_size} connections of the pool are in use (each session held at the same "
                        f"time needs one): raise max_size, or timeout", key, where) from None
                except Exception as exc:  # pragma: no cover - a closed pool
                    raise self._error(exc, key, "connecting for") from exc
        with self._count:
            self._out += 1
        if not conn.autocommit:  # a pool the caller made
            try:
                conn.autocommit = True
            except psycopg.Error as exc:
                self._putconn(conn)
                raise self._error(exc, key, "connecting for") from exc
            conn._telesession_restore = True  # type: ignore[attr-defined]
        return conn

    def _connect_directly(self, key: Optional[str]) -> "psycopg.Connection[Any]":
        """A connection outside the pool, closed when given back; ``StoreError`` with libpq's
        reason if the server cannot be reached."""
        try:
            conn = psycopg.connect(self._conninfo, **{**self._kwargs, "autocommit": True})
        except psycopg.Error as exc:
            raise self._error(exc, key, "connecting for") from exc
        conn._telesession_extra = True  # type: ignore[attr-defined]
        return conn

    def _putconn(self, conn: "psycopg.Connection[Any]") -> None:
        """Give ``conn`` back, idle (a broken one is discarded by the pool)."""
        try:
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
            if getattr(conn, "_telesession_restore", False) and not conn.closed:
                conn.autocommit = False
                del conn._telesession_restore  # type: ignore[attr-defined]
        except psycopg.Error:
            pass  # broken: the pool discards it
        with self._count:
            self._out -= 1
        if getattr(conn, "_telesession_extra", False):
            if self._pool_pid == current_pid():
                conn.close()
            else:  # pragma: no cover
                _inherited.append(conn)
            return
        try:
            pool = self._pool
            if self._pool_pid == current_pid():
                pool.putconn(conn)
            else:  # pragma: no cover - handed back in a forked child
                _inherited.append(conn)
        except Exception:  # pragma: no cover - a pool closed meanwhile
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _recheck(self) -> None:
        """After a connection turned out broken (a server restart): drop the pool's other dead ones."""
        try:
            self._current_pool().check()
        except Exception as exc:  # pragma: no cover - best effort
            logger.debug("checking the PostgreSQL pool of %s failed: %s", self.address, exc)

    def _pipeline(self, conn: "psycopg.Connection[Any]") -> ContextManager[Any]:
        return conn.pipeline() if self._pipelined else nullcontext()

    def _scrub_text(self, text: str, password: Optional[str] = "") -> str:
        """``text`` without the DSN's password, nor any ``scheme://user:password@`` in it."""
        password = getattr(self, "_password", None) if password == "" else password
        if password and len(str(password)) >= 3:  # a shorter one would garble every message
            text = text.replace(str(password), "***")
        return re.sub(r"(://[^:/@\s]*):[^@\s]*@", r"\1:***@", text)

    def _error(self, exc: BaseException, key: Optional[str], doing: str) -> StoreError:
        where = self.describe(key) if key is not None else f"table {self.table} at {self.address}"
        text = self._scrub_text(str(exc).strip()).replace("\n", " ")
        return StoreError(f"PostgreSQL failed while {doing} {where}: {type(exc).__name__}: {text}", key, where)

    def _check_key(self, key: str) -> None:
        """``StoreError`` for a key that PostgreSQL text cannot hold (NUL, lone surrogates)."""
        if "\x00" in key:
            raise StoreError(f"session key {key!r} contains a NUL character, which PostgreSQL text cannot hold "
                             f"({self.describe(key)})", key, self.describe(key))
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StoreError(f"session key {key!r} is not valid Unicode text ({exc.reason}); PostgreSQL "
                             f"cannot store it ({self.describe(key)})", key, self.describe(key)) from None

    def _run(self, key: Optional[str], doing: str, body: Any) -> Any:
        """``body(conn)`` on the connection of the key this thread holds, else on a pool connection
        (retried once on a fresh one if the first was broken, e.g. by a server restart)."""
        if key is not None:
            self._check_key(key)
            hold = self._hold_of(key)
            if hold is not None:
                try:
                    return body(hold.conn)
                except psycopg.Error as exc:
                    raise self._error(exc, key, doing) from exc
        for attempt in (1, 2):
            conn = self._getconn(key, self.timeout)
            try:
                return body(conn)
            except psycopg.Error as exc:
                broken = conn.closed or getattr(conn, "broken", False)
                if attempt == 1 and broken and isinstance(exc, psycopg.OperationalError):
                    self._putconn(conn)
                    conn = None  # type: ignore[assignment]
                    self._recheck()
                    continue
                raise self._error(exc, key, doing) from exc
            finally:
                if conn is not None:
                    self._putconn(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _hold_of(self, key: str) -> Optional[_Hold]:
        """The hold of ``key`` if the calling thread holds it (through any store on this table)."""
        if not self._thread_locks().holds(key):
            return None
        return _holds.get((self.location, key))

    # -- the Store protocol -------------------------------------------------------------

    def describe(self, key: str) -> str:
        return f"row {key!r} of table {getattr(self, 'qualified', self.table)} at {self.address}"

    def load(self, key: str) -> Optional[bytes]:
        q = self._sql["load"]

        def body(conn: Any) -> Optional[bytes]:
            row = conn.execute(q, (key,), binary=True).fetchone()
            return None if row is None else bytes(row[0])

        return self._run(key, "reading", body)  # type: ignore[no-any-return]

    def load_locked(self, key: str, token: Any) -> Optional[bytes]:
        """The record read together with the lock (a re-entered lock has none: read it)."""
        if isinstance(token, _Hold) and token.fresh:
            token.fresh = False
            return token.record
        return self.load(key)

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        """Write ``record`` only if the row is still ``previous`` (absent or expired for ``None``).

        Inside a held key the write commits when the key is released.
        """
        written = self._run(key, "writing", lambda conn: self._write(conn, key, record, previous, ttl))
        hold = self._hold_of(key)
        if hold is not None:
            hold.dirty = True
        self._check_written(written, key, previous)

    def _write(self, conn: Any, key: str, record: bytes, previous: Optional[bytes], ttl: Optional[float]) -> int:
        if previous is None:
            cur = conn.execute(self._sql["insert"], (key, record, ttl))
        else:
            cur = conn.execute(self._sql["update"], (record, ttl, key, previous))
        return int(cur.rowcount)

    def _check_written(self, written: int, key: str, previous: Optional[bytes]) -> None:
        if written != 1:
            what = "was created" if previous is None else "was changed or deleted"
            raise ConflictError(
                f"session {key!r} {what} by another writer since it was loaded "
                f"({self.describe(key)}); nothing was overwritten", key, self.describe(key))

    def save_and_release(self, key: str, record: bytes, *, previous: Optional[bytes], ttl: Optional[float],
                         token: Any) -> None:
        """Write and commit (which frees the lock) in one round trip."""
        if not isinstance(token, _Hold) or _holds.get((self.location, key)) is not token:
            super().save_and_release(key, record, previous=previous, ttl=ttl, token=token)
            return
        conn = token.conn
        try:
            with self._pipeline(conn):
                if previous is None:
                    cur = conn.execute(self._sql["insert"], (key, record, ttl))
                else:
                    cur = conn.execute(self._sql["update"], (record, ttl, key, previous))
                conn.execute("COMMIT")
            written = int(cur.rowcount)
        except BaseException as exc:
            self._end_hold(key, token, commit=False)
            if isinstance(exc, psycopg.Error):
                raise self._error(exc, key, "writing") from exc
            raise
        self._end_hold(key, token, commit=None)
        self._check_written(written, key, previous)

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        """Remove the row; with ``previous``, only if it is still that record.

        ``previous=None`` deletes whatever is stored (what ``telesession rm`` wants); a row
        that is already gone is not an error.  Inside a held key it commits on release.
        """
        def body(conn: Any) -> bool:
            if previous is None:
                conn.execute(self._sql["delete"], (key,))
                return True
            if conn.execute(self._sql["delete_if"], (key, previous)).rowcount == 1:
                return True
            return conn.execute(self._sql["exists"], (key,)).fetchone() is None

        ok = self._run(key, "deleting", body)
        hold = self._hold_of(key)
        if hold is not None:
            hold.dirty = True
        if not ok:
            raise ConflictError(
                f"session {key!r} was changed by another writer since it was loaded "
                f"({self.describe(key)}); it was not deleted", key, self.describe(key))

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every live key starting with ``prefix``, streamed by a server-side cursor (2000 a round trip).

        The iteration holds one pooled connection and a read transaction until it ends.
        """
        if prefix:
            self._check_key(prefix)
        end = _prefix_end(prefix) if prefix else None
        params: Tuple[str, ...]
        if not prefix:
            q, params = self._sql["keys"], ()
        elif end is None:
            q, params = self._sql["keys_prefix_open"], (prefix,)
        else:
            q, params = self._sql["keys_prefix"], (prefix, end)
        for attempt in (1, 2):
            conn = self._getconn(None, self.timeout)
            started = False
            try:
                with conn.transaction():
                    with conn.cursor(name="telesession_keys") as cur:
                        cur.itersize = _ITERSIZE
                        cur.execute(q, params)
                        started = True
                        for (key,) in cur:
                            if key.startswith(prefix):
                                yield key
                return
            except psycopg.Error as exc:
                if attempt == 1 and not started and (conn.closed or getattr(conn, "broken", False)):
                    self._putconn(conn)
                    conn = None  # type: ignore[assignment]
                    self._recheck()  # a connection that died while idle in the pool: try a fresh one
                    continue
                raise self._error(exc, None, "listing") from exc
            finally:
                if conn is not None:
                    self._putconn(conn)

    def records(self, prefix: str = "") -> Iterator[Tuple[str, bytes]]:
        """Every live ``(key, record)`` whose key starts with ``prefix``, read without any lock in
        batches of 500 by key (no connection or transaction is kept between batches)."""
        if prefix:
            self._check_key(prefix)
        end = _prefix_end(prefix) if prefix else None
        after: Optional[str] = None
        while True:
            if after is None:
                q, param = self._sql["records_first"], prefix
            else:
                q, param = self._sql["records"], after
            rows = self._run(None, "listing", lambda conn: conn.execute(q, (param,), binary=True).fetchall())
            for key, record in rows:
                if not key.startswith(prefix):
                    if end is not None and key >= end:
                        return
                    continue
                yield key, bytes(record)
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def purge_expired(self, now: Optional[float] = None) -> int:
        """Delete the rows whose ``ttl`` ran out (by the server's clock, or before ``now``, a Unix
        time); returns how many.  A key some handler holds right now is skipped."""
        import datetime

        if now is None:
            cutoff = self._run(None, "purging", lambda conn: conn.execute("SELECT now()").fetchone()[0])
        else:
            cutoff = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        after: Tuple[Any, str] = (datetime.datetime(1, 1, 1, tzinfo=datetime.timezone.utc), "")
        purged = 0
        while True:
            rows = self._run(None, "purging", lambda conn: conn.execute(
                self._sql["expired"], (cutoff, after[0], after[1])).fetchall())
            if not rows:
                break
            keys = [key for _, key in rows]
            purged += self._run(None, "purging", lambda conn: conn.execute(
                self._sql["purge"], (keys, cutoff, self._seed)).rowcount)
            after = rows[-1]
            if len(rows) < _PAGE:
                break
        if purged:
            logger.debug("purged %d expired sessions from table %s at %s", purged, self.qualified, self.address)
        return purged

    # -- locking between processes and machines -----------------------------------------

    def _lock_external(self, key: str, timeout: float) -> Any:
        self._check_key(key)
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            conn = self._getconn(key, self.timeout)
            autocommit = not getattr(conn, "_telesession_restore", False)
            remaining = deadline - time.monotonic()
            try:
                with self._pipeline(conn):
                    conn.execute(self._sql["begin"])
                    if timeout > 0:
                        ms = max(1, int(remaining * 1000)) if remaining < 2_000_000 else 0  # 0: no limit
                        conn.execute(self._sql["lock_timeout"], (f"{ms}ms",))
                        got = conn.execute(self._sql["lock"], (key, self._seed))
                    else:
                        got = conn.execute(self._sql["try_lock"], (key, self._seed))
                    cur = conn.execute(self._sql["load"], (key,), binary=True)
                if timeout <= 0 and not (got.fetchone() or (False,))[0]:
                    self._putconn(conn)
                    raise LockTimeout(f"session {key!r} is held", key, self.describe(key))
                row = cur.fetchone()
            except psycopg.errors.LockNotAvailable:
                self._putconn(conn)
                raise LockTimeout(f"session {key!r} is held", key, self.describe(key)) from None
            except psycopg.Error as exc:
                broken = conn.closed or getattr(conn, "broken", False)
                self._putconn(conn)
                if attempt == 1 and broken and isinstance(exc, psycopg.OperationalError):
                    self._recheck()  # a connection that died while idle in the pool: try a fresh one
                    continue
                raise self._error(exc, key, "locking") from exc
            except BaseException:
                self._putconn(conn)
                raise
            hold = _Hold(conn, None if row is None else bytes(row[0]), autocommit)
            _holds[(self.location, key)] = hold
            return hold
        raise AssertionError("unreachable")  # pragma: no cover

    def _unlock_external(self, key: str, token: Any) -> None:
        if isinstance(token, _Hold):
            self._end_hold(key, token, commit=True)

    def _end_hold(self, key: str, hold: _Hold, commit: Optional[bool]) -> None:
        """Finish ``hold``'s transaction (``commit=None``: already committed) and give its connection
        back; the thread lock is released here only for ``commit is not True`` (release() does it)."""
        if _holds.get((self.location, key)) is hold:
            del _holds[(self.location, key)]
        conn = hold.conn
        error: Optional[BaseException] = None
        if commit and hold.dirty and conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            error = psycopg.OperationalError("a later statement failed, so the transaction was rolled back")
        elif commit and not conn.closed:
            try:
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                error = exc
        elif commit and hold.dirty:
            error = psycopg.OperationalError("the connection was closed")
        self._putconn(conn)
        if commit is not True:
            Store.release(self, key, True)
        if error is not None:
            if hold.dirty:  # a write made inside the hold did not commit: say so
                raise self._error(error, key, "committing") from error
            logger.warning("releasing the lock of session %r (%s) failed: %s; the lock went with the "
                           "connection", key, self.describe(key), self._scrub_text(str(error)))

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the pool this store made (never one it was given); the store must not be used afterwards."""
        self._closed = True
        if self._owns_pool and self._pool_pid == current_pid():
            try:
                self._pool.close(timeout=5)
            except Exception:  # pragma: no cover - best effort
                pass

    def __repr__(self) -> str:
        return f"PostgresStore({self.address!r}, table={self.table!r})"
