#!/usr/bin/env python3
"""Benchmark telesession against telebot's own state storage and against bare floors.

    python benchmarks/bench.py                  # full run: a few minutes
    python benchmarks/bench.py --quick          # under 40 s
    python benchmarks/bench.py --json out.json  # also write machine-readable results
    python benchmarks/bench.py --profile json   # cProfile one store's per-update path
    python benchmarks/bench.py --breakdown sqlite-NORMAL  # per-update cost by step (lock, decode, ...)
    python benchmarks/bench.py --only 5 --e2e sqlite --e2e-reps 25  # one pair of section 5, many rounds

Every figure comes from this run: medians of several repetitions, and every ratio is
against a baseline measured in the same run (the micro-benchmarks of sections 1-3 are
interleaved round by round, so drift on a noisy machine hits all of them alike).
Standard library and the project's dependencies only (telebot; redis for RedisStore).

Sections:
  1. per-update overhead of ``with_session`` for every store (read-only and read-modify-write)
  2. telebot's own ``retrieve_data`` (StateMemoryStorage, StatePickleStorage), same increment
  3. floors: bare dict increment, bare atomic file write, bare SQLite WAL upsert; target ratios
  4. scaling with the number of stored sessions (100 / 10,000 / 100,000)
  5. end to end through a real threaded TeleBot (``process_new_updates``), totals checked
  6. several processes on one store (SQLite, JSON files, Redis), totals checked
  7. durability settings: what each fsync policy costs
  plugins: every ``benchmarks/bench_*.py`` module (``SECTION``, ``run(quick, workdir) -> rows``)

The run ends with one table of every target of issue 13 (and every plugin row that has
one): its figure, the floor or peer it is compared with, the ratio and PASS/FAIL.
"""
import argparse
import contextlib
import datetime
import gc
import glob
import importlib.util
import json
import multiprocessing
import os
import platform
import random
import shelve
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import msgspec  # noqa: E402
import telebot  # noqa: E402
from telebot import types  # noqa: E402
from telebot.storage import StateMemoryStorage, StatePickleStorage  # noqa: E402

import telesession  # noqa: E402
import telesession.testing  # noqa: E402
from telesession import Sessions, session  # noqa: E402
from telesession.records import build_record, parse_record  # noqa: E402
from telesession.stores import MemoryStore, from_url  # noqa: E402

now_ns = time.perf_counter_ns
TOKEN = "123:TEST"
BOT_ID = 123
SMALL = '{"count":0}'


# ---------------------------------------------------------------------------------------
# plan: what a full and a quick run do
# ---------------------------------------------------------------------------------------

class Plan:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.reps = 3 if quick else 5               # repetitions per scaling level
        self.micro_reps = 3 if quick else 7         # interleaved rounds of the per-update benchmarks
        self.batch_s = 0.02 if quick else 0.12      # target time of one timed batch
        self.min_ops = 5 if quick else 20
        self.keys = 100                             # keys the per-update benchmarks spread over
        self.levels = (100, 10_000) if quick else (100, 10_000, 100_000)
        self.scale_budget_s = 0.5 if quick else 4.0  # timing budget per store and level
        self.shelve_prefill_budget_s = 3.0 if quick else 20.0
        self.e2e_updates = 2_000 if quick else 20_000
        self.e2e_chats = 200 if quick else 1_000
        self.e2e_reps = 3 if quick else 5  # threaded runs on 2 cores swing widely: more runs
        self.e2e_budget_s = 0.25 if quick else 3.0  # per timed repetition (slow stores get fewer updates)
        self.e2e_min_updates = 50 if quick else 100
        self.e2e_warm = 16 if quick else 32        # warm-up updates per run: threads, connections
        self.mp_procs = (1, 2, 4)
        self.mp_duration_s = 0.25 if quick else 1.5
        self.mp_reps = 2 if quick else 3
        self.mp_keys = 200


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------

def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def short_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 70 else text[:67] + "..."


def fmt_us(ns: Optional[float]) -> str:
    if ns is None or ns != ns:
        return "-"
    us = ns / 1000.0
    if us < 10:
        return f"{us:.2f}"
    if us < 1000:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def fmt_rate(rate: Optional[float]) -> str:
    return "-" if rate is None or rate != rate else f"{rate:,.0f}"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None or x != x:
        return "-"
    if x >= 100:
        return f"{x:,.0f}x"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def target_row(env: "Env", section: str, name: str, value: Optional[float], unit: str, compare_to: str,
               ratio: Optional[float], target: Optional[str], passed: Optional[bool], note: str = "") -> None:
    """Record one target (same shape as a plugin row) for the final table and ``--json``."""
    env.targets.append({"section": section, "name": name, "value": value, "unit": unit, "compare_to": compare_to,
                        "ratio": ratio, "target": target, "passed": passed, "note": note})


def status(passed: Optional[bool]) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


def fmt_value(value: Optional[float], unit: str) -> str:
    if value is None or value != value:
        return "n/a"
    if "/s" in unit:
        return f"{value:,.0f} {unit}"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}" if abs(value) < 10 else f"{value:.1f} {unit}"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = [f"\n== {title}"]
    for n, row in enumerate(cells):
        parts = []
        for i, cell in enumerate(row):
            parts.append(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]))
        out.append("  ".join(parts).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.extend(f"   {note}" for note in notes)
    print("\n".join(out), flush=True)


def update_dict(update_id: int, chat_id: int, text: str = "hi") -> Dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id, "date": 1764064000, "text": text,
            "chat": {"id": chat_id, "type": "private", "first_name": "U"},
            "from": {"id": chat_id, "is_bot": False, "first_name": "U"},
        },
    }


def make_updates(chat_ids: Sequence[int], start_id: int = 1) -> List[types.Update]:
    return [types.Update.de_json(update_dict(start_id + i, c)) for i, c in enumerate(chat_ids)]


def make_messages(chat_ids: Sequence[int]) -> List[types.Message]:
    return [u.message for u in make_updates(chat_ids)]


def drain(bot: telebot.TeleBot, timeout: float = 300.0) -> None:
    """Wait for every task queued so far on the bot's pool, parked updates included."""
    telesession.testing.drain(bot, timeout)


def stop_bot(bot: telebot.TeleBot) -> None:
    """Stop the pool's threads without joining (each exits within telebot's 0.5 s poll)."""
    for worker in getattr(getattr(bot, "worker_pool", None), "workers", ()):
        worker.stop()


def cycler(handler: Callable[[Any], Any], items: Sequence[Any]) -> Callable[[int], None]:
    """``run(n)``: call ``handler`` on the next ``n`` items, round robin."""
    state = [0]
    size = len(items)

    def run(n: int) -> None:
        i = state[0]
        for _ in range(n):
            handler(items[i])
            i += 1
            if i == size:
                i = 0
        state[0] = i

    return run


def timed(run: Callable[[int], None], n: int, settle: bool = False) -> float:
    """ns per operation of one batch of ``n``; ``settle``: first flush dirty pages (``os.sync``), so a
    batch never pays for the writeback that the previous benchmark left queued."""
    if settle and hasattr(os, "sync"):
        os.sync()
    t0 = now_ns()
    run(n)
    return (now_ns() - t0) / n


def calibrate(run: Callable[[int], None], target_s: float, min_ops: int,
              max_ops: int = 2_000_000) -> Tuple[int, float]:
    """Warm up (at least a quarter of ``target_s``) and size a batch to take ``target_s``."""
    n = 1
    while True:
        t0 = now_ns()
        run(n)
        dt = now_ns() - t0
        if dt >= target_s * 1e9 / 4 or n >= max_ops:
            break
        n = min(max_ops, n * 4)
    per_op = max(dt / n, 1.0)
    return max(min_ops, min(max_ops, int(target_s * 1e9 / per_op))), per_op


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def filesystem_of(path: str) -> str:
    path = os.path.realpath(path)
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best[0]):
                        best = (parts[1], parts[2], parts[0])
    except OSError:
        pass
    return f"{best[1]} ({best[2]} on {best[0] or '?'})"


# ---------------------------------------------------------------------------------------
# redis-server of our own
# ---------------------------------------------------------------------------------------

class RedisServer:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.process: Optional[subprocess.Popen] = None
        self.port = 0
        self.url: Optional[str] = None
        self.reason: Optional[str] = None
        self.version = "-"

    def start(self) -> bool:
        exe = shutil.which("redis-server")
        if exe is None:
            self.reason = "redis-server not installed"
            return False
        try:
            import redis  # noqa: F401
        except ImportError:
            self.reason = "redis package not installed"
            return False
        try:
            self.version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                          timeout=10).stdout.split()[2].replace("v=", "")
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
        for _ in range(3):
            self.port = free_port()
            self.process = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", self.directory],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                        sock.sendall(b"PING\r\n")
                        if sock.recv(64).startswith(b"+PONG"):
                            self.url = f"redis://127.0.0.1:{self.port}/0"
                            return True
                except OSError:
                    time.sleep(0.02)
            self.stop()
        self.reason = "redis-server did not start"
        return False

    def flush(self) -> None:
        if self.url:
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# ---------------------------------------------------------------------------------------
# the stores under test
# ---------------------------------------------------------------------------------------

STORES = [  # name, kind, options
    ("memory", "memory", {}),
    ("json fsync", "json", {"fsync": True}),
    ("json no-fsync", "json", {"fsync": False}),
    ("shelve", "shelve", {}),
    ("shelve no-fsync", "shelve", {"fsync": False}),
    ("sqlite NORMAL", "sqlite", {"synchronous": "NORMAL"}),
    ("sqlite FULL", "sqlite", {"synchronous": "FULL"}),
    ("sqlite OFF", "sqlite", {"synchronous": "OFF"}),
    ("redis", "redis", {}),
]


class Env:
    """Temp directory, redis server, plan, collected results."""

    def __init__(self, plan: Plan, base: str, redis_server: RedisServer) -> None:
        self.plan = plan
        self.base = base
        self.redis = redis_server
        self.results: Dict[str, Any] = {}
        self.targets: List[Dict[str, Any]] = []
        self._n = 0
        self.last_dir: Optional[str] = None  # the directory of the last store made (None: Redis, memory)
        self.pin = True  # section 5 on one core
        self.e2e_only: Optional[List[str]] = None  # section 5: only configurations whose name has one of these

    def fresh_dir(self, label: str) -> str:
        self._n += 1
        path = os.path.join(self.base, f"{self._n:03d}-{label.replace(' ', '_')}")
        os.makedirs(path, mode=0o700)
        self.last_dir = path
        return path

    def make_store(self, kind: str, label: str, **options: Any) -> Any:
        """A fresh, empty store of ``kind``; raises with a reason when unavailable."""
        self.last_dir = None
        if kind == "memory":
            return MemoryStore()
        if kind == "json":
            from telesession.stores import JSONFileStore

            return JSONFileStore(os.path.join(self.fresh_dir(label), "sessions"), **options)
        if kind == "shelve":
            from telesession.stores import ShelveStore

            return ShelveStore(os.path.join(self.fresh_dir(label), "sessions.shelf"), **options)
        if kind == "sqlite":
            from telesession.stores import SQLiteStore

            return SQLiteStore(os.path.join(self.fresh_dir(label), "sessions.db"), **options)
        if kind == "redis":
            if self.redis.url is None:
                raise RuntimeError(self.redis.reason or "no redis-server")
            from telesession.stores import RedisStore

            self._n += 1
            return RedisStore(self.redis.url, prefix=f"bench{self._n}:", **options)
        raise ValueError(kind)


def close_store(store: Any) -> None:
    with contextlib.suppress(Exception):
        store.close()


def stored_key(sessions: Sessions, key: str) -> str:
    """Where ``sessions`` keeps the session of ``key`` in its store (a namespace, once there is one)."""
    mapping = getattr(sessions, "_stored_key", None)
    return key if mapping is None else mapping(key)


def count_of(store: Any, key: str) -> int:
    raw = store.load(key)
    if raw is None:
        return 0
    data = parse_record(raw, key, "bench")[0]
    return int(data.get("count", 0))


def counts_of(store: Any, keys: Sequence[str]) -> Dict[str, int]:
    """Every key's count; one open of the shelf for a ShelveStore (each load reopens it)."""
    if type(store).__name__ == "ShelveStore":
        import dbm

        with contextlib.suppress(Exception):
            with shelve.Shelf(dbm.open(store.path, "r")) as shelf:
                out = {}
                for key in keys:
                    raw = shelf.get(key)
                    out[key] = 0 if raw is None else int(parse_record(raw, key, "bench")[0].get("count", 0))
                return out
    return {key: count_of(store, key) for key in keys}


def prefill(store: Any, keys: Sequence[str], budget_s: Optional[float] = None) -> int:
    """Write a small record for every key, fast; returns how many were written (budget-capped)."""
    stamp = time.time()
    name = type(store).__name__
    deadline = None if budget_s is None else time.monotonic() + budget_s
    if name == "JSONFileStore" and hasattr(store, "path"):
        for key in keys:  # the very bytes store.save writes, minus temp file and rename
            fd = os.open(store.path(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, build_record(key, SMALL, 0, stamp))
            finally:
                os.close(fd)
        return len(keys)
    if name == "ShelveStore":  # one open of the dbm for all of them (dbm.dumb: each open reads the index)
        import dbm

        done = 0
        with shelve.Shelf(dbm.open(store.path, "c", 0o600), protocol=4) as shelf:
            for key in keys:
                shelf[key] = build_record(key, SMALL, 0, stamp)
                done += 1
                if deadline is not None and done % 1000 == 0 and time.monotonic() > deadline:
                    break
        return done
    if name == "SQLiteStore":
        try:
            conn = sqlite3.connect(store.path, isolation_level=None, timeout=30)
            try:
                conn.execute("BEGIN")
                conn.executemany("INSERT OR REPLACE INTO sessions(key, record, written, expires) "
                                 "VALUES (?, ?, ?, NULL)",
                                 ((k, build_record(k, SMALL, 0, stamp), stamp) for k in keys))
                conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a running bot would long have done it
            finally:
                conn.close()
            return len(keys)
        except sqlite3.Error:
            pass  # another layout: go through the store
    if name == "RedisStore" and hasattr(store, "_session_key"):
        pipe = store.client.pipeline(transaction=False)
        for i, key in enumerate(keys, 1):
            pipe.set(store._session_key(key), build_record(key, SMALL, 0, stamp))
            if i % 2000 == 0:
                pipe.execute()
        pipe.execute()
        return len(keys)
    done = 0
    for key in keys:
        store.save(key, build_record(key, SMALL, 0, stamp))
        done += 1
        if deadline is not None and done % 100 == 0 and time.monotonic() > deadline:
            break
    return done


def session_handlers(sessions: Sessions) -> Tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """The read-only and the read-modify-write handler, decorated with ``with_session``."""

    @sessions.with_session
    def read_only(message: Any) -> Any:
        return session["count"]

    @sessions.with_session
    def increment(message: Any) -> None:
        session["count"] += 1

    return read_only, increment


def peer_bot(storage: Any, chat_ids: Sequence[int]) -> telebot.TeleBot:
    bot = telebot.TeleBot(TOKEN, threaded=False, state_storage=storage)
    for chat in chat_ids:
        bot.set_state(chat, "s", chat)
    return bot


def peer_handlers(bot: telebot.TeleBot) -> Tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """What a telebot user writes today: ``retrieve_data`` around the same increment."""

    def read_only(message: Any) -> Any:
        with bot.retrieve_data(message.from_user.id, message.chat.id) as data:
            return data.get("count", 0)

    def increment(message: Any) -> None:
        with bot.retrieve_data(message.from_user.id, message.chat.id) as data:
            data["count"] = data.get("count", 0) + 1

    return read_only, increment


# ---------------------------------------------------------------------------------------
# sections 1-3: per-update micro-benchmarks, interleaved
# ---------------------------------------------------------------------------------------

def atomic_writer(directory: str, fsync: bool, keys: Sequence[str]) -> Callable[[int], None]:
    """Bare floor: new temp file + write (+ fsync) + os.replace over the record, same bytes, no read, no lock."""
    records = [(os.path.join(directory, k + ".json"), build_record(k, '{"count":1}', 0, time.time()))
               for k in keys]
    prefix = os.path.join(directory, ".floor-")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    counter = [0]

    def write(item: Tuple[str, bytes]) -> None:
        counter[0] += 1
        temp = f"{prefix}{counter[0]}.tmp"
        fd = os.open(temp, flags, 0o600)
        try:
            os.write(fd, item[1])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, item[0])

    return cycler(write, records)


def sqlite_upserter(path: str, synchronous: str, keys: Sequence[str]) -> Tuple[Callable[[int], None], Any]:
    """Bare floor: one autocommit WAL upsert of the same row, its count changing every time
    (SQLite skips rewriting a row whose bytes are unchanged: an identical record is no floor)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (key TEXT PRIMARY KEY, record BLOB NOT NULL)")
    stamp = time.time()
    templates = [(k, build_record(k, '{"count":%d}', 0, stamp).replace(b"%d", b"%010d")) for k in keys]
    sql = "INSERT INTO t(key, record) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET record=excluded.record"
    execute = conn.execute
    counter = [0]

    def upsert(item: Tuple[str, bytes]) -> None:
        counter[0] += 1
        execute(sql, (item[0], item[1] % counter[0]))

    return cycler(upsert, templates), conn


def raw_increment(conn: sqlite3.Connection, key: str) -> None:
    """The floor under ``SQLiteStore``: one session's count incremented in a bare transaction
    (``BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT``, msgspec, no lock of ours)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        record = msgspec.json.decode(conn.execute("SELECT record FROM sessions WHERE key=?", (key,)).fetchone()[0])
        record["data"]["count"] += 1
        conn.execute("UPDATE sessions SET record=?, written=? WHERE key=?",
                     (msgspec.json.encode(record), time.time(), key))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def sqlite_rmw(path: str, synchronous: str, keys: Sequence[str]) -> Tuple[Callable[[int], None], Any]:
    """Bare floor of a SQLite update: ``BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT`` of the same row in
    SQLiteStore's table layout (WAL), the record's count changing every time; no lock, no codec."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS sessions (key TEXT PRIMARY KEY NOT NULL, record BLOB NOT NULL,"
                 " written REAL, expires REAL)")
    stamp = time.time()
    conn.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, NULL)",
                     ((k, build_record(k, SMALL, 0, stamp), stamp) for k in keys))
    templates = [(k, build_record(k, '{"count":%d}', 0, stamp)) for k in keys]
    execute = conn.execute
    counter = [0]

    def rmw(item: Tuple[str, bytes]) -> None:
        counter[0] += 1
        execute("BEGIN IMMEDIATE")
        execute("SELECT record FROM sessions WHERE key=?", (item[0],)).fetchone()
        execute("UPDATE sessions SET record=?, written=? WHERE key=?", (item[1] % counter[0], stamp, item[0]))
        execute("COMMIT")

    return cycler(rmw, templates), conn


def inlined_memory_increment(keys: Sequence[str]) -> Callable[[Any], None]:
    """What ``MemoryStore`` + ``with_session`` do for one increment, written as one function:
    key, key lock, load, decode, bind, handler, encode, read-back check, change detection,
    record, save, unlock, with the store's internals inlined, and none of the library's
    structure (``Store`` protocol calls, key checks, re-entrance, ``ttl``, versions, typed
    sessions).  It shows what the steps cost and what the structure adds to them."""
    from telesession import context as session_context
    from telesession.locking import _WAITERS, _get_ident, _wake
    from telesession.manager import _LOADED, _Handle
    from telesession.records import RECORD_ENCODED, _decode_record, _msgspec_decode, _msgspec_encode

    sessions = Sessions(MemoryStore(), initial=lambda: {"count": 0})
    store = sessions.store
    for key in keys:
        with sessions.open(key) as data:
            data["count"] = 1  # (a session equal to initial() is not stored)
    entries = store._thread_locks()._entries
    records, stack = store._records, session_context._stack
    namespace = sessions._namespace

    def increment(message: Any) -> None:
        key = namespace + str(message.chat.id)
        entry = [_get_ident(), 1]
        if entries.setdefault(key, entry) is not entry:
            raise RuntimeError("key busy")
        data = _decode_record(records[key]).data
        baseline = _msgspec_encode(data)
        handle = _Handle(sessions, key)
        handle.data, handle.state = data, _LOADED
        stack.set((handle,))
        session["count"] += 1
        text = _msgspec_encode(data)
        if _msgspec_decode(text) != data:
            raise ValueError("would not read back equal")
        if text != baseline:
            records[key] = RECORD_ENCODED % (0, _msgspec_encode(time.time()), _msgspec_encode(key), text)
        stack.set(())
        del entries[key]
        if len(entry) > _WAITERS:
            _wake(entry)

    return increment


def section_micro(env: Env) -> None:
    plan = env.plan
    chat_ids = [1_000_001 + i for i in range(plan.keys)]
    keys = [str(c) for c in chat_ids]
    messages = make_messages(chat_ids)
    cases: List[Tuple[str, Callable[[int], None]]] = []
    unavailable: Dict[str, str] = {}
    cleanup: List[Callable[[], None]] = []

    plain = {"count": 0}

    def plain_ro(message: Any) -> Any:
        return plain["count"]

    def plain_rmw(message: Any) -> None:
        plain["count"] += 1

    cases.append(("plain/ro", cycler(plain_ro, messages)))
    cases.append(("plain/rmw", cycler(plain_rmw, messages)))

    for name, kind, options in STORES:
        try:
            store = env.make_store(kind, name, **options)
        except Exception as exc:  # noqa: BLE001 - a store being written right now may not import
            unavailable[name] = short_reason(exc)
            continue
        cleanup.append(lambda s=store: close_store(s))
        sessions = Sessions(store, initial=lambda: {"count": 0})
        ro, rmw = session_handlers(sessions)
        try:
            for m in messages:  # create every session first
                rmw(m)
        except Exception as exc:  # noqa: BLE001
            unavailable[name] = short_reason(exc)
            continue
        cases.append((f"{name}/ro", cycler(ro, messages)))
        cases.append((f"{name}/rmw", cycler(rmw, messages)))

    # section 2: telebot's own storage
    mem_bot = peer_bot(StateMemoryStorage(), chat_ids)
    ro, rmw = peer_handlers(mem_bot)
    cases.append(("StateMemoryStorage/ro", cycler(ro, messages)))
    cases.append(("StateMemoryStorage/rmw", cycler(rmw, messages)))
    pickle_path = os.path.join(env.fresh_dir("pickle"), "states.pkl")
    pkl_bot = peer_bot(StatePickleStorage(file_path=pickle_path), chat_ids)
    ro, rmw = peer_handlers(pkl_bot)
    cases.append(("StatePickleStorage/ro", cycler(ro, messages)))
    cases.append(("StatePickleStorage/rmw", cycler(rmw, messages)))

    # section 3: floors
    floor_dict = {k: {"count": 0} for k in keys}

    def dict_increment(message: Any) -> None:
        floor_dict[str(message.chat.id)]["count"] += 1

    cases.append(("floor dict", cycler(dict_increment, messages)))
    cases.append(("floor inlined memory", cycler(inlined_memory_increment(keys), messages)))
    cases.append(("floor atomic fsync", atomic_writer(env.fresh_dir("floor-fsync"), True, keys)))
    cases.append(("floor atomic no-fsync", atomic_writer(env.fresh_dir("floor-nofsync"), False, keys)))
    for sync in ("NORMAL", "FULL", "OFF"):
        run, conn = sqlite_upserter(os.path.join(env.fresh_dir(f"floor-sqlite-{sync}"), "floor.db"), sync, keys)
        cleanup.append(conn.close)
        cases.append((f"floor sqlite {sync}", run))
    run, conn = sqlite_rmw(os.path.join(env.fresh_dir("floor-sqlite-rmw"), "floor.db"), "NORMAL", keys)
    cleanup.append(conn.close)
    cases.append(("floor sqlite rmw NORMAL", run))

    order = ["plain/ro", "plain/rmw", "floor dict", "floor inlined memory", "memory/", "StateMemoryStorage/",
             "floor atomic fsync",
             "json fsync/", "floor atomic no-fsync", "json no-fsync/", "shelve/", "StatePickleStorage/",
             "floor sqlite NORMAL", "floor sqlite rmw NORMAL", "sqlite NORMAL/", "floor sqlite FULL", "sqlite FULL/", "floor sqlite OFF",
             "sqlite OFF/", "redis/"]
    rank = {name: next((i for i, p in enumerate(order) if name.startswith(p)), len(order)) for name, _ in cases}
    cases.sort(key=lambda case: rank[case[0]])  # a store next to its floor: paired rounds see the same disk
    log(f"[1-3] calibrating {len(cases)} per-update cases")
    sizes = {}
    for name, run in cases:
        sizes[name] = calibrate(run, plan.batch_s, plan.min_ops)[0]
    samples: Dict[str, List[float]] = {name: [] for name, _ in cases}
    for rep in range(plan.micro_reps):
        log(f"[1-3] round {rep + 1}/{plan.micro_reps}")
        for name, run in cases:
            samples[name].append(timed(run, sizes[name], settle=True))
    for fn in cleanup:
        fn()
    med = {name: median(values) for name, values in samples.items()}
    env.results["micro"] = {"median_ns": med, "samples_ns": samples, "ops_per_rep": sizes,
                            "unavailable": unavailable, "keys": plan.keys}
    report_micro(env, med, samples, unavailable)


def report_micro(env: Env, med: Dict[str, float], samples: Dict[str, List[float]],
                 unavailable: Dict[str, str]) -> None:
    plain_ro, plain_rmw = med["plain/ro"], med["plain/rmw"]
    peer_mem = med["StateMemoryStorage/rmw"]
    rows = []
    overhead: Dict[str, Dict[str, float]] = {}
    for name, _, _ in STORES:
        if name in unavailable:
            rows.append([name, f"n/a ({unavailable[name]})", "", "", "", ""])
            continue
        ro, rmw = med[f"{name}/ro"] - plain_ro, med[f"{name}/rmw"] - plain_rmw
        overhead[name] = {"ro_ns": ro, "rmw_ns": rmw}
        rows.append([name, fmt_us(ro), fmt_us(rmw), fmt_rate(1e9 / med[f"{name}/rmw"]),
                     fmt_ratio(rmw / peer_mem), fmt_ratio(rmw / med["StatePickleStorage/rmw"])])
    for name in ("StateMemoryStorage", "StatePickleStorage"):
        rows.append([f"telebot {name}", fmt_us(med[f"{name}/ro"] - plain_ro), fmt_us(med[f"{name}/rmw"] - plain_rmw),
                     fmt_rate(1e9 / med[f"{name}/rmw"]), fmt_ratio(med[f"{name}/rmw"] / peer_mem),
                     fmt_ratio(med[f"{name}/rmw"] / med["StatePickleStorage/rmw"])])
    table(f"1-2. Per-update overhead, one thread, {env.plan.keys} keys, session {{\"count\": n}} "
          f"(median of {env.plan.micro_reps}; minus the undecorated handler: ro {fmt_us(plain_ro)} us, "
          f"rmw {fmt_us(plain_rmw)} us)",
          ["store", "read-only us", "increment us", "increments/s", "vs StateMemory", "vs StatePickle"], rows,
          ["read-only: the handler reads session['count'] (nothing is written);"
           " increment: session['count'] += 1 (load + save).",
           "telebot rows: bot.retrieve_data(user, chat) around the same code (it saves even read-only)."])
    env.results["micro"]["overhead_ns"] = overhead

    # section 3: floors and targets
    targets = []
    floors = [["bare dict increment", fmt_us(med["floor dict"])],
              ["MemoryStore's steps inlined in one function (session bound, checked, recorded)",
               fmt_us(med["floor inlined memory"] - med["plain/rmw"])],
              ["bare atomic write, fsync", fmt_us(med["floor atomic fsync"])],
              ["bare atomic write, no fsync", fmt_us(med["floor atomic no-fsync"])]]
    for sync in ("NORMAL", "FULL", "OFF"):
        floors.append([f"bare SQLite WAL upsert, synchronous={sync}", fmt_us(med[f"floor sqlite {sync}"])])
    floors.append(["bare SQLite read-modify-write transaction (BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT), NORMAL",
                   fmt_us(med["floor sqlite rmw NORMAL"])])
    table("3a. Floors: the same work done bare (median us per op)", ["floor", "us/op"], floors)

    def paired(case: str, floor: str) -> float:
        """Median over rounds of (case - undecorated) / floor, each pair measured back to back."""
        return median([(c - p) / f for c, p, f in zip(samples[case], samples["plain/rmw"], samples[floor])])

    def target(what: str, store: str, floor: str, limit: Optional[float], floor_name: str,
               section: str = "1-3 per update") -> None:
        value_ns, floor_ns = overhead.get(store, {}).get("rmw_ns"), med[floor]
        if value_ns is None:
            targets.append([what, "n/a", fmt_us(floor_ns), "-", f"<= {limit:g}x {floor_name}" if limit else "info", "n/a"])
            if limit:
                target_row(env, section, what, None, "us/update", f"{floor_name} {fmt_us(floor_ns)} us", None,
                           f"<= {limit:g}x", None, "store unavailable")
            return
        ratio = paired(f"{store}/rmw", floor)
        ok = None if limit is None else ratio <= limit
        targets.append([what, fmt_us(value_ns), fmt_us(floor_ns), fmt_ratio(ratio),
                        f"<= {limit:g}x {floor_name}" if limit else f"(info: {floor_name})",
                        status(ok) if limit else "info"])
        if limit:
            target_row(env, section, what, value_ns / 1000, "us/update", f"{floor_name} {fmt_us(floor_ns)} us",
                       ratio, f"<= {limit:g}x", ok, "median of paired ratios, each pair timed back to back")

    mem = overhead.get("memory", {}).get("rmw_ns")
    peer_over = [p - q for p, q in zip(samples["StateMemoryStorage/rmw"], samples["plain/rmw"])]
    if mem is not None:
        # issue 13, target 1: both sides minus the undecorated handler, paired per round
        ratio = median([(m - q) / p for m, q, p in zip(samples["memory/rmw"], samples["plain/rmw"], peer_over)])
        ok = ratio <= 1.0
        targets.append(["memory increment vs StateMemoryStorage", fmt_us(mem), fmt_us(median(peer_over)),
                        fmt_ratio(ratio), "<= 1x telebot StateMemoryStorage", status(ok)])
        target_row(env, "1-3 per update", "MemoryStore increment vs telebot StateMemoryStorage (retrieve_data)",
                   mem / 1000, "us/update", f"StateMemoryStorage {fmt_us(median(peer_over))} us", ratio,
                   "<= 1.0x", ok, "lock, private copy, change detection, read-back check kept; paired rounds")
        targets.append(["memory vs bare dict", fmt_us(mem), fmt_us(med["floor dict"]),
                        fmt_ratio(paired("memory/rmw", "floor dict")), "(info: floor)", "info"])
        inlined = [i - q for i, q in zip(samples["floor inlined memory"], samples["plain/rmw"])]
        targets.append(["every step inlined in one function vs StateMemoryStorage", fmt_us(median(inlined)),
                        fmt_us(median(peer_over)), fmt_ratio(median([i / p for i, p in zip(inlined, peer_over)])),
                        "(info: what the structure adds)", "info"])
    target("json fsync increment", "json fsync", "floor atomic fsync", 1.5, "atomic write + fsync")
    target("json no-fsync increment", "json no-fsync", "floor atomic no-fsync", 1.5, "atomic write")
    target("sqlite NORMAL increment", "sqlite NORMAL", "floor sqlite rmw NORMAL", 2.0, "bare RMW transaction")
    for sync in ("NORMAL", "FULL", "OFF"):
        target(f"sqlite {sync} vs bare upsert", f"sqlite {sync}", f"floor sqlite {sync}", None,
               "WAL upsert (no read)")
    table("3b. Targets (per-update overhead vs its floor or peer, same run)",
          ["what", "us", "floor us", "ratio", "target", "status"], targets,
          ["ratio: median over rounds of (increment - undecorated) / floor, each pair timed back to back;"
           " us columns: medians.",
           "bare RMW transaction: BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT on SQLiteStore's table (WAL, NORMAL)."])
    env.results["floors_ns"] = {k: v for k, v in med.items() if k.startswith("floor")}


# ---------------------------------------------------------------------------------------
# section 4: scaling with the number of stored sessions
# ---------------------------------------------------------------------------------------

def batches_for(per_op_ns: float, n: int, reps: int, budget_s: float) -> Tuple[int, int]:
    """Batch size and repetitions that fit ``budget_s`` (at least one single-op batch)."""
    if n * per_op_ns * reps > budget_s * 1e9:
        n = max(1, int(budget_s * 1e9 / reps / per_op_ns))
        if n == 1:
            reps = max(1, min(reps, int(budget_s * 1e9 / per_op_ns)))
    return n, reps


def measure_levels(entries: List[Dict[str, Any]], plan: Plan, label: str) -> None:
    """Calibrate each level, then time them round-robin (levels interleaved, so disk drift hits all)."""
    for e in entries:
        n, per_op = calibrate(e["run"], plan.batch_s, 1)
        budget = e.get("budget_s", plan.scale_budget_s)
        e["ops_per_rep"], e["reps"] = batches_for(per_op, n, plan.reps, budget)
        e["samples_ns"] = []
    for rnd in range(max((e["reps"] for e in entries), default=0)):
        for e in entries:
            if rnd < e["reps"]:
                e["samples_ns"].append(timed(e["run"], e["ops_per_rep"], settle=True))
    for e in entries:
        e["median_ns"] = median(e["samples_ns"])
        log(f"[4] {label} @ {e['stored']:,}: {fmt_us(e['median_ns'])} us ({e['reps']} x {e['ops_per_rep']} ops)")


def section_scaling(env: Env) -> None:
    plan = env.plan
    rng = random.Random(4)
    kinds = [("json fsync", "json", {"fsync": True}), ("shelve", "shelve", {}),
             ("sqlite NORMAL", "sqlite", {"synchronous": "NORMAL"}), ("redis", "redis", {})]
    results: Dict[str, Dict[int, Any]] = {}
    for name, kind, options in kinds:
        results[name] = {}
        entries: List[Dict[str, Any]] = []
        opened: List[Tuple[Any, Optional[str]]] = []
        try:
            for level in plan.levels:
                store = env.make_store(kind, f"scale-{name}-{level}", **options)
                opened.append((store, env.last_dir))
                log(f"[4] {name}: prefill {level:,}")
                t0 = time.monotonic()
                chat_ids = list(range(1, level + 1))
                budget = plan.shelve_prefill_budget_s if kind == "shelve" else None
                sessions = Sessions(store, initial=lambda: {"count": 0})
                reached = prefill(store, [stored_key(sessions, str(c)) for c in chat_ids], budget)
                prefill_s = time.monotonic() - t0
                sample = rng.sample(chat_ids[:reached], min(reached, 1000))
                store.load(stored_key(sessions, str(sample[0])))  # one-time work (a shelve's index read)
                rmw = session_handlers(sessions)[1]
                entries.append({"level": level, "stored": reached, "prefill_s": prefill_s,
                                "run": cycler(rmw, make_messages(sample))})
            measure_levels(entries, plan, name)
            for e in entries:
                results[name][e["level"]] = {k: v for k, v in e.items() if k != "run"}
        except Exception as exc:  # noqa: BLE001 - a store not importable yet, or failing: say so in its row
            results[name] = {plan.levels[0]: {"na": short_reason(exc)}}
            log(f"[4] {name}: n/a: {traceback.format_exc()}")
        finally:
            for store, directory in opened:
                close_store(store)
                if directory:
                    shutil.rmtree(directory, ignore_errors=True)
            if kind == "redis" and env.redis.url:
                env.redis.flush()
    # the floor under SQLiteStore: does SQLite itself slow down with the number of rows?
    name = "bare SQLite WAL upsert (floor)"
    results[name] = {}
    entries = []
    conns = []
    directories = []
    for level in plan.levels:
        directory = env.fresh_dir(f"scale-sqlite-floor-{level}")
        directories.append(directory)
        path = os.path.join(directory, "floor.db")
        keys = [str(c) for c in range(1, level + 1)]
        t0 = time.monotonic()
        run, conn = sqlite_upserter(path, "NORMAL", rng.sample(keys, min(level, 1000)))
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO t(key, record) VALUES (?, ?)",
                         ((k, build_record(k, SMALL, 0, time.time())) for k in keys))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conns.append(conn)
        entries.append({"level": level, "stored": level, "prefill_s": time.monotonic() - t0, "run": run})
    log(f"[4] {name}")
    measure_levels(entries, plan, name)
    for e in entries:
        results[name][e["level"]] = {k: v for k, v in e.items() if k != "run"}
    for conn in conns:
        conn.close()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    # telebot's StatePickleStorage: rewrites the whole file on every operation
    name = "telebot StatePickleStorage"
    results[name] = {}
    entries = []
    directories = []
    for level in plan.levels:
        directory = env.fresh_dir(f"scale-pickle-{level}")
        directories.append(directory)
        storage = StatePickleStorage(file_path=os.path.join(directory, "states.pkl"))
        chat_ids = list(range(1, level + 1))
        t0 = time.monotonic()
        storage._write_to_file({storage._get_key(c, c, storage.prefix, storage.separator, None, None, BOT_ID):
                                {"state": "s", "data": {"count": 0}} for c in chat_ids})
        prefill_s = time.monotonic() - t0
        bot = telebot.TeleBot(TOKEN, threaded=False, state_storage=storage)
        rmw = peer_handlers(bot)[1]
        entries.append({"level": level, "stored": level, "prefill_s": prefill_s,
                        "budget_s": plan.scale_budget_s if level < 100_000 else min(plan.scale_budget_s, 3.0),
                        "run": cycler(rmw, make_messages(rng.sample(chat_ids, min(level, 1000))))})
    log(f"[4] {name}")
    measure_levels(entries, plan, name)
    for e in entries:
        results[name][e["level"]] = {k: v for k, v in e.items() if k != "run"}
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    env.results["scaling"] = {n: {str(k): v for k, v in r.items()} for n, r in results.items()}
    first_level, last_level = plan.levels[0], plan.levels[-1]
    for name in ("json fsync", "shelve", "sqlite NORMAL", "redis"):
        a, b = results.get(name, {}).get(first_level, {}), results.get(name, {}).get(last_level, {})
        what = f"{name}: increment with {last_level:,} vs {first_level:,} stored sessions"
        if "median_ns" in a and "median_ns" in b:
            ratio = b["median_ns"] / a["median_ns"]
            target_row(env, "4 scaling", what, b["median_ns"] / 1000, "us/update",
                       f"{first_level:,} sessions {fmt_us(a['median_ns'])} us", ratio, "<= 1.3x", ratio <= 1.3,
                       "" if b.get("stored") == last_level else f"prefill reached {b.get('stored'):,}")
        else:
            target_row(env, "4 scaling", what, None, "us/update", f"{first_level:,} sessions", None, "<= 1.3x",
                       None, (a.get("na") or b.get("na") or "not measured"))

    rows = []
    first, last = plan.levels[0], plan.levels[-1]
    for name, per_level in results.items():
        row = [name]
        for level in plan.levels:
            m = per_level.get(level)
            if m is None:
                row.append("-")
            elif "na" in m:
                row.append(f"n/a ({m['na']})" if level == first else "n/a")
            else:
                note = "" if m["stored"] == level else f" @{m['stored']:,}"
                small = m["ops_per_rep"] * m["reps"]
                note += f" ({small} op{'s' if small > 1 else ''})" if small < 10 else ""
                row.append(fmt_us(m["median_ns"]) + note)
        a, b = per_level.get(first, {}), per_level.get(last, {})
        row.append(fmt_ratio(b["median_ns"] / a["median_ns"]) if "median_ns" in a and "median_ns" in b else "-")
        rows.append(row)
    table(f"4. Scaling: us per increment with N stored sessions (random keys among N; median of <= {plan.reps})",
          ["store"] + [f"N={lv:,}" for lv in plan.levels] + [f"{last // first:,}x N"], rows,
          ["@K: the prefill stopped at K sessions within its time budget; (k ops): the budget allowed only k.",
           "json/shelve/sqlite/redis through with_session; StatePickleStorage through bot.retrieve_data.",
           "bare SQLite WAL upsert: the floor's statement alone on a table of N rows (SQLite's own growth, with "
           "its default WAL checkpoint every 1,000 pages: deeper B-trees, more distinct pages per checkpoint; "
           "SQLiteStore checkpoints every 4,000)."])


# ---------------------------------------------------------------------------------------
# section 5: end to end through a real threaded TeleBot
# ---------------------------------------------------------------------------------------

class _CountErrors(telebot.ExceptionHandler):
    def __init__(self) -> None:
        self.errors: List[str] = []

    def handle(self, exception: Exception) -> bool:
        self.errors.append(short_reason(exception))
        return True


def e2e_once(env: Env, config: Tuple[str, str, Dict[str, Any]], warm: List[types.Update],
             updates: Optional[List[types.Update]], chat_ids: Sequence[int],
             size: Callable[[float], List[types.Update]] = list) -> Dict[str, Any]:
    """One run: fresh bot and store (sessions of every chat stored), warm-up batch, then the
    timed batch (``None``: ``size(warm-up rate)`` picks it); totals checked."""
    name, kind, options = config
    errors = _CountErrors()
    bot = telebot.TeleBot(TOKEN, threaded=True, num_threads=8, use_class_middlewares=True,
                          exception_handler=errors, state_storage=StateMemoryStorage())
    store = None
    try:
        if kind == "baseline":
            counts: Dict[int, int] = {}

            @bot.message_handler(func=lambda m: True)
            def plain(message: Any) -> None:
                chat = message.chat.id
                counts[chat] = counts.get(chat, 0) + 1  # no lock: what an unprotected bot does

            def total() -> int:
                return sum(counts.values())
        elif kind == "peer":
            for chat in chat_ids:
                bot.set_state(chat, "s", chat)
            increment = peer_handlers(bot)[1]
            bot.message_handler(func=lambda m: True)(increment)

            def total() -> int:
                return sum(bot.current_states.get_data(c, c, bot_id=BOT_ID).get("count", 0) for c in chat_ids)
        elif kind == "sqlite-raw":  # the floor under SQLiteStore: a bare read-modify-write transaction
            store = env.make_store("sqlite", f"e2e-{name}")
            prefill(store, [str(c) for c in chat_ids])
            path, local = store.path, threading.local()

            @bot.message_handler(func=lambda m: True)
            def raw(message: Any) -> None:
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = local.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                    conn.execute("PRAGMA synchronous=NORMAL")
                raw_increment(conn, str(message.chat.id))

            def total() -> int:
                return sum(counts_of(store, [str(c) for c in chat_ids]).values())
        else:
            store = env.make_store(kind, f"e2e-{name}", **options)
            sessions = Sessions(store, initial=lambda: {"count": 0})
            sessions.setup(bot)  # per-key order is always on (each chat's updates in update_id order)
            stored = [stored_key(sessions, str(c)) for c in chat_ids]  # (the namespace follows setup(bot))
            prefill(store, stored)  # every timed update loads and saves an existing session

            @bot.message_handler(func=lambda m: True)
            def count(message: Any) -> None:
                session["count"] += 1

            def total() -> int:
                return sum(counts_of(store, stored).values())
        t0 = now_ns()
        bot.process_new_updates(warm)  # starts connections and thread-local state
        drain(bot)
        warm_rate = len(warm) / ((now_ns() - t0) / 1e9)
        if updates is None:
            updates = size(warm_rate)
        collections = [g["collections"] for g in gc.get_stats()]
        t0 = now_ns()
        bot.process_new_updates(updates)
        drain(bot)
        elapsed = now_ns() - t0
        collections = [g["collections"] - c for g, c in zip(gc.get_stats(), collections)]
        got, expected = total(), len(warm) + len(updates)
        return {"updates": len(updates), "elapsed_ns": elapsed, "warm_rate": warm_rate, "rate": len(updates) / (elapsed / 1e9),
                "total": got, "expected": expected, "errors": len(errors.errors),
                "first_error": errors.errors[0] if errors.errors else None,
                "gc_collections": collections}  # per generation: a full (gen 2) collection costs ms here
    finally:
        stop_bot(bot)
        if store is not None:
            close_store(store)
            if kind == "redis":
                env.redis.flush()


RAW_SQLITE = "raw sqlite3 in the handler (floor)"
#: Stores of ``STORES`` that section 5 leaves out (their cost is in sections 1 and 7).
E2E_SKIPPED = ("sqlite FULL", "sqlite OFF", "shelve no-fsync")


def section_e2e(env: Env) -> None:
    """Section 5, pinned to one core (``os.sched_setaffinity``) unless ``--no-pin``: on two shared
    cores eight worker threads swing by up to 2x between runs; on one they are steady."""
    pinned = None
    original = None
    if env.pin and hasattr(os, "sched_setaffinity"):
        original = os.sched_getaffinity(0)
        pinned = min(original)
        os.sched_setaffinity(0, {pinned})  # this thread; the bots' worker threads inherit it
    env.results["e2e_pinned_cpu"] = pinned
    try:
        _section_e2e(env, pinned)
    finally:
        if original is not None:
            os.sched_setaffinity(0, original)


def _section_e2e(env: Env, pinned: Optional[int]) -> None:
    plan = env.plan
    rng = random.Random(5)
    chat_ids = list(range(2_000_001, 2_000_001 + plan.e2e_chats))
    per_chat = plan.e2e_updates // plan.e2e_chats
    order = [c for c in chat_ids for _ in range(per_chat)]
    rng.shuffle(order)
    log(f"[5] building {len(order):,} updates")
    updates = make_updates(order)
    warm = make_updates([rng.choice(chat_ids) for _ in range(plan.e2e_warm)], start_id=10_000_000)
    configs = [("no sessions (baseline)", "baseline", {}), ("telebot StateMemoryStorage", "peer", {})]
    configs += [(name, kind, options) for name, kind, options in STORES if name not in E2E_SKIPPED]
    configs += [(RAW_SQLITE, "sqlite-raw", {})]
    if env.e2e_only:
        configs = [c for c in configs if any(word in c[0].lower() for word in env.e2e_only)]
    runs: Dict[str, List[Dict[str, Any]]] = {config[0]: [] for config in configs}
    failed: Dict[str, str] = {}

    def size(warm_rate: float) -> List[types.Update]:
        """All updates unless the warm-up rate (a pessimistic estimate) says a run would take over 4x
        the budget; then slow stores get fewer updates over the same chats."""
        n = len(updates)
        if warm_rate * plan.e2e_budget_s * 4 >= n:
            return updates
        return updates[:max(min(n, plan.e2e_min_updates), int(warm_rate * plan.e2e_budget_s))]

    for rep in range(plan.e2e_reps):  # configurations interleaved: drift hits them alike
        for config in configs:
            name = config[0]
            if name in failed:
                continue
            done = runs[name]
            log(f"[5] {name}: run {rep + 1}/{plan.e2e_reps}")
            gc.collect()
            try:
                done.append(e2e_once(env, config, warm, updates[:done[0]["updates"]] if done else None,
                                     chat_ids, size))
            except Exception as exc:  # noqa: BLE001
                failed[name] = short_reason(exc)
                log(f"[5] {name}: failed: {traceback.format_exc()}")
    results: Dict[str, Any] = {}
    for name, done in runs.items():
        if name in failed:
            results[name] = {"na": failed[name]}
            continue
        results[name] = {"runs": done, "rate": median([r["rate"] for r in done]), "updates": done[0]["updates"],
                         "exact": all(r["total"] == r["expected"] for r in done),
                         "lost": sum(r["expected"] - r["total"] for r in done),
                         "expected": sum(r["expected"] for r in done),
                         "errors": sum(r["errors"] for r in done)}
    env.results["e2e"] = results
    base = results.get("no sessions (baseline)", {}).get("rate")
    rows = []
    for name, r in results.items():
        if "na" in r:
            rows.append([name, f"n/a ({r['na']})", "", "", "", "", ""])
            continue
        if r["exact"]:
            exact = "exact"
        else:
            exact = f"lost {r['lost']:,} of {r['expected']:,} ({100 * r['lost'] / r['expected']:.2f}%)"
        if r["errors"]:
            exact += f", {r['errors']} errors"
        rates = [run["rate"] for run in r["runs"]]
        rows.append([name, f"{r['updates']:,}", fmt_rate(r["rate"]), f"{fmt_rate(min(rates))}-{fmt_rate(max(rates))}",
                     fmt_us(1e9 / r["rate"]), fmt_ratio(r["rate"] / base) if base else "-", exact])
    floor_note = [f"pinned to CPU {pinned} (os.sched_setaffinity)" if pinned is not None
                  else "not pinned (--no-pin): threaded runs on several cores swing widely"]

    def paired_rate_ratio(ours: str, other: str) -> Optional[float]:
        a, b = results.get(ours, {}), results.get(other, {})
        if "runs" not in a or "runs" not in b:
            return None
        return median([x["rate"] / y["rate"] for x, y in zip(a["runs"], b["runs"])])  # same rep: back to back

    for ours, other, limit, what, peer_text in (
            ("memory", "telebot StateMemoryStorage", 0.9, "MemoryStore end to end vs telebot StateMemoryStorage",
             "StateMemoryStorage"),
            ("sqlite NORMAL", RAW_SQLITE, 0.8, "SQLiteStore end to end vs the raw sqlite3 floor",
             "raw BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT")):
        ratio = paired_rate_ratio(ours, other)
        r, o = results.get(ours, {}), results.get(other, {})
        if ratio is None:
            target_row(env, "5 end to end", what, None, "updates/s", peer_text, None, f">= {limit:g}x", None,
                       r.get("na") or o.get("na") or "not measured")
            continue
        exact = "totals exact" if r.get("exact") else "TOTALS WRONG"
        target_row(env, "5 end to end", what, r["rate"], "updates/s", f"{peer_text} {fmt_rate(o['rate'])}/s",
                   ratio, f">= {limit:g}x", ratio >= limit and bool(r.get("exact")),
                   f"{plan.e2e_updates:,} updates, {plan.e2e_chats:,} chats, 8 workers, "
                   f"{'CPU ' + str(pinned) if pinned is not None else 'unpinned'}; {exact}")
        floor_note.append(f"{ours} / {other}: {fmt_ratio(ratio)} (median of per-run ratios; target >= {limit:g}x)")
    raw_rate = results.get(RAW_SQLITE, {}).get("rate")
    if raw_rate and base:
        floor_note.append(f"the raw sqlite3 floor / baseline: {fmt_ratio(raw_rate / base)}.")
    table(f"5. End to end: TeleBot(threaded, num_threads=8, use_class_middlewares).process_new_updates, "
          f"{plan.e2e_chats:,} chats (median of {plan.e2e_reps} runs)",
          ["handler", "updates/run", "updates/s", "min-max of runs", "us/update", "vs baseline",
           "totals (sum of counts == updates)"],
          rows, ["session rows: sessions.setup(bot) + handler doing session['count'] += 1"
                 " (each chat's updates run in update_id order, one at a time);"
                 " slow stores get fewer updates per run (time budget).",
                 "baseline: plain handler incrementing a dict without a lock; peer: bot.retrieve_data increment.",
                 "floor: the handler itself runs BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT on the same table "
                 "through its thread's own connection (msgspec, no lock, no session layer); its threads "
                 "collide in SQLite's busy handler, which is part of what a bare SQLite bot pays."] + floor_note)


# ---------------------------------------------------------------------------------------
# section 6: several processes on one store
# ---------------------------------------------------------------------------------------

def _mp_worker(conn: Any) -> None:
    """A child process: on ("run", ...) open the store (cached), say ready, wait for the start, work."""
    managers: Dict[str, Sessions] = {}
    while True:
        message = conn.recv()
        if message[0] == "quit":
            break
        _, url, names, hot, hot_share, seed = message
        if url.startswith("raw-"):
            _mp_raw(conn, url, names, hot, hot_share, seed)
            continue
        try:
            sessions = managers.get(url)
            if sessions is None:
                sessions = managers[url] = Sessions(from_url(url), initial=lambda: {"count": 0}, lock_timeout=60)
            rng = random.Random(seed)
            with sessions.open(rng.choice(names)):  # warm-up: connection, lock file
                session["count"] += 1
            conn.send(("ready",))
            _, start_at, duration = conn.recv()
            while time.monotonic() < start_at:
                pass
            start = time.monotonic()
            cpu0 = time.process_time()
            end_at = start_at + duration
            ops = hot_ops = errors = 0
            choice, rand = rng.choice, rng.random
            while time.monotonic() < end_at:
                is_hot = rand() < hot_share
                try:
                    with sessions.open(hot if is_hot else choice(names)):
                        session["count"] += 1
                    ops += 1
                    hot_ops += is_hot
                except Exception:  # noqa: BLE001 - counted; totals will say if anything was lost
                    errors += 1
            conn.send(("done", start, time.monotonic(), ops, hot_ops, errors, 1, time.process_time() - cpu0))
        except Exception as exc:  # noqa: BLE001
            conn.send(("error", short_reason(exc)))


def _mp_raw(conn: Any, url: str, names: List[str], hot: str, hot_share: float, seed: int) -> None:
    """``_mp_worker`` for the floors: the same increments with bare ``sqlite3`` on the same table,
    no lock but SQLite's. ``raw-txn:`` runs ``BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT``;
    ``raw-auto:`` a ``SELECT``, then ``UPDATE ... WHERE record=?`` (SQLiteStore's two autocommit
    statements), again from the read when another process changed the row in between."""
    mode, path = url.split(":", 1)
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
        db.execute("PRAGMA synchronous=NORMAL")
        decode, encode = msgspec.json.decode, msgspec.json.encode
        rng = random.Random(seed)
        keys = ["session:" + n for n in names]  # the stored keys of a default manager
        hot_key = "session:" + hot

        def increment(key: str) -> None:
            while True:
                if mode == "raw-txn":
                    raw_increment(db, key)
                    return
                raw = db.execute("SELECT record FROM sessions WHERE key=?", (key,)).fetchone()[0]
                record = decode(raw)
                record["data"]["count"] += 1
                if db.execute("UPDATE sessions SET record=?, written=? WHERE key=? AND record=?",
                              (encode(record), time.time(), key, raw)).rowcount == 1:
                    return

        increment(rng.choice(keys))  # warm-up
        conn.send(("ready",))
        _, start_at, duration = conn.recv()
        while time.monotonic() < start_at:
            pass
        start, cpu0 = time.monotonic(), time.process_time()
        end_at = start_at + duration
        ops = hot_ops = 0
        choice, rand = rng.choice, rng.random
        while time.monotonic() < end_at:
            is_hot = rand() < hot_share
            increment(hot_key if is_hot else choice(keys))
            ops += 1
            hot_ops += is_hot
        db.close()
        conn.send(("done", start, time.monotonic(), ops, hot_ops, 0, 1, time.process_time() - cpu0))
    except Exception as exc:  # noqa: BLE001
        conn.send(("error", short_reason(exc)))


def section_multiprocess(env: Env) -> None:
    plan = env.plan
    ctx = multiprocessing.get_context("spawn")
    n_workers = max(plan.mp_procs)
    log(f"[6] starting {n_workers} worker processes")
    workers = []
    for _ in range(n_workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_mp_worker, args=(child,), daemon=True)
        proc.start()
        workers.append((proc, parent))
    stores = [("sqlite NORMAL", "sqlite"), ("raw sqlite3, two statements (floor)", "raw-auto"),
              ("raw sqlite3, BEGIN IMMEDIATE (floor)", "raw-txn"), ("json fsync", "json"), ("redis", "redis")]
    results: Dict[str, Any] = {}
    hot_share = 0.2
    try:
        for name, kind in stores:
            if kind == "redis":
                if env.redis.url is None:
                    results[name] = {"na": env.redis.reason}
                    continue
                url = f"{env.redis.url}?prefix=bench-mp:"
            elif kind == "sqlite":
                url = "sqlite:" + os.path.join(env.fresh_dir("mp-sqlite"), "sessions.db")
            elif kind.startswith("raw-"):
                url = "sqlite:" + os.path.join(env.fresh_dir("mp-" + kind), "sessions.db")
            else:
                url = "json:" + os.path.join(env.fresh_dir("mp-json"), "sessions")
            try:
                verifier = from_url(url)
            except Exception as exc:  # noqa: BLE001
                results[name] = {"na": short_reason(exc)}
                continue
            results[name] = {}
            all_runs: Dict[int, List[Dict[str, Any]]] = {procs: [] for procs in plan.mp_procs}
            for rep in range(plan.mp_reps):  # 1, 2, 4 processes interleaved: drift hits them alike
                for procs in plan.mp_procs:
                    runs = all_runs[procs]
                    tag = f"p{procs}r{rep}-"
                    names = [f"{tag}{i}" for i in range(plan.mp_keys)]
                    hot = tag + "hot"
                    log(f"[6] {name}: {procs} process(es), run {rep + 1}/{plan.mp_reps}")
                    probe = Sessions(verifier)  # only for its namespace: the workers' managers use the default
                    target = url
                    if kind.startswith("raw-"):  # the floors update existing rows
                        prefill(verifier, [stored_key(probe, k) for k in names + [hot]])
                        target = f"{kind}:{verifier.path}"
                    for i in range(procs):
                        workers[i][1].send(("run", target, names, hot, hot_share, 1000 * rep + i))
                    replies = [workers[i][1].recv() for i in range(procs)]
                    failed = [r for r in replies if r[0] != "ready"]
                    if failed:
                        raise RuntimeError(failed[0][1])
                    start_at = time.monotonic() + 0.05
                    for i in range(procs):
                        workers[i][1].send(("go", start_at, plan.mp_duration_s))
                    done = [workers[i][1].recv() for i in range(procs)]
                    failed = [r for r in done if r[0] != "done"]
                    if failed:
                        raise RuntimeError(failed[0][1])
                    ops = sum(r[3] for r in done)
                    hot_ops = sum(r[4] for r in done)
                    wall = max(r[2] for r in done) - min(r[1] for r in done)
                    warm = sum(r[6] for r in done)
                    counts = {k: v for k, v in zip(names + [hot], counts_of(
                        verifier, [stored_key(probe, k) for k in names + [hot]]).values())}
                    runs.append({"ops": ops, "rate": ops / wall, "wall_s": wall, "errors": sum(r[5] for r in done),
                                 "total": sum(counts.values()), "expected": ops + warm,
                                 "hot": counts[hot], "hot_expected": hot_ops,
                                 "cpu_s": sum(r[7] for r in done) if all(len(r) > 7 for r in done) else None})
            for procs, runs in all_runs.items():
                results[name][procs] = {
                    "runs": runs, "rate": median([r["rate"] for r in runs]),
                    "exact": all(r["total"] == r["expected"] and r["hot"] == r["hot_expected"] for r in runs),
                    "expected": sum(r["expected"] for r in runs), "total": sum(r["total"] for r in runs),
                    "errors": sum(r["errors"] for r in runs)}
            close_store(verifier)
    finally:
        for proc, pipe in workers:
            with contextlib.suppress(Exception):
                pipe.send(("quit",))
        for proc, pipe in workers:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
    env.results["multiprocess"] = {n: {str(k): v for k, v in r.items()} for n, r in results.items()}
    sq = results.get("sqlite NORMAL", {})
    for procs in plan.mp_procs[1:]:
        what = f"SQLite: {procs} processes vs 1, aggregate increments/s"
        if "na" in sq or procs not in sq or plan.mp_procs[0] not in sq:
            target_row(env, "6 processes", what, None, "updates/s", "1 process", None, ">= 1.0x", None,
                       sq.get("na", "not measured"))
            continue
        one, many = sq[plan.mp_procs[0]], sq[procs]
        ratio = median([m["rate"] / o["rate"] for o, m in zip(one["runs"], many["runs"])])
        cpu_one = [r["cpu_s"] for r in one["runs"] if r.get("cpu_s")]
        cpu_many = [r["cpu_s"] for r in many["runs"] if r.get("cpu_s")]
        cpu = (f"; CPU used {median(cpu_many) / plan.mp_duration_s:.2f} vs {median(cpu_one) / plan.mp_duration_s:.2f}"
               f" cores" if cpu_one and cpu_many else "")
        for floor_name, label in (("raw sqlite3, two statements (floor)", "bare two statements"),
                                  ("raw sqlite3, BEGIN IMMEDIATE (floor)", "bare BEGIN IMMEDIATE")):
            floor = results.get(floor_name, {})
            if procs in floor and plan.mp_procs[0] in floor:
                cpu += (f"; {label}: " + fmt_ratio(median([m["rate"] / o["rate"] for o, m in zip(
                    floor[plan.mp_procs[0]]["runs"], floor[procs]["runs"])])))
        target_row(env, "6 processes", what, many["rate"], "updates/s", f"1 process {fmt_rate(one['rate'])}/s",
                   ratio, ">= 1.0x", ratio >= 1.0 and many["exact"],
                   f"{plan.mp_keys} keys + a hot key with {hot_share:.0%} of updates; "
                   f"{'totals exact' if many['exact'] else 'TOTALS WRONG'}{cpu}")
    rows = []
    for name, per in results.items():
        if "na" in per:
            rows.append([name, f"n/a ({per['na']})"] + [""] * (2 * len(plan.mp_procs) + 1))
            continue
        one = per.get(plan.mp_procs[0], {}).get("rate")
        row = [name]
        checks = []
        cpu_per_update = []
        for procs in plan.mp_procs:
            r = per[procs]
            row += [fmt_rate(r["rate"]), fmt_ratio(r["rate"] / one) if one else "-"]
            checks.append("exact" if r["exact"] else f"{r['total'] - r['expected']:+,} off")
            if r["errors"]:
                checks[-1] += f" ({r['errors']} errors)"
            per_op = [run["cpu_s"] / run["ops"] * 1e6 for run in r["runs"] if run.get("cpu_s") and run["ops"]]
            cpu_per_update.append(f"{median(per_op):.0f}" if per_op else "-")
        row.append(" / ".join(cpu_per_update))
        row.append(", ".join(sorted(set(checks))) if len(set(checks)) == 1 else " / ".join(checks))
        rows.append(row)
    headers = ["store"]
    for procs in plan.mp_procs:
        headers += [f"{procs} proc/s", f"x{procs}"]
    headers.append("CPU us/update")
    table(f"6. Several processes on one store: aggregate increments/s ({plan.mp_keys} shared keys + one hot key "
          f"taking {hot_share:.0%} of ops; {plan.mp_duration_s:g} s per run, median of {plan.mp_reps})",
          headers + ["totals"], rows,
          [f"xN: aggregate vs 1 process (this machine has {os.cpu_count()} cores); totals: sum of counts and "
           "the hot key's count == increments done; CPU us/update: the processes' CPU time per update "
           f"at {' / '.join(str(p) for p in plan.mp_procs)} processes.",
           "floors: the same increments with bare sqlite3 on the same table and no lock but SQLite's: "
           "BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT (processes take turns whole transactions), or a SELECT "
           "then UPDATE ... WHERE record=? (SQLiteStore's two statements, retried when the row changed)."])


# ---------------------------------------------------------------------------------------
# section 7: durability settings
# ---------------------------------------------------------------------------------------

def section_durability(env: Env) -> None:
    micro = env.results.get("micro", {})
    overhead = micro.get("overhead_ns", {})
    floors = env.results.get("floors_ns", {})
    e2e = env.results.get("e2e", {})
    buys = {
        "json fsync": ("fsync=True (default)", "floor atomic fsync", "a returned handler's write survives power loss"),
        "json no-fsync": ("fsync=False", "floor atomic no-fsync",
                          "old-or-new on process crash; power loss may drop recent writes"),
        "shelve": ("fsync=True (default)", None, "values, then the index line, flushed: survives power loss"),
        "shelve no-fsync": ("fsync=False", None,
                            "old-or-new on process crash; power loss may drop recent writes"),
        "sqlite OFF": ("synchronous=OFF", "floor sqlite OFF",
                       "safe on process crash; OS crash/power loss may corrupt the DB"),
        "sqlite NORMAL": ("synchronous=NORMAL (default)", "floor sqlite NORMAL",
                          "never corrupt; power loss may drop the last commits"),
        "sqlite FULL": ("synchronous=FULL", "floor sqlite FULL", "every committed update survives power loss"),
    }
    rows = []
    cheapest = {}
    for name in buys:
        if name in overhead:
            family = name.split()[0]
            cheapest[family] = min(cheapest.get(family, float("inf")), overhead[name]["rmw_ns"])
    for name, (setting, floor, text) in buys.items():
        family = name.split()[0]
        if name not in overhead:
            rows.append([family, setting, "n/a", "", "", "", text])
            continue
        rmw = overhead[name]["rmw_ns"]
        e2e_rate = e2e.get(name, {}).get("rate")
        rows.append([family, setting, fmt_us(rmw), fmt_ratio(rmw / cheapest[family]),
                     fmt_us(floors.get(floor)) if floor else "-",
                     fmt_rate(e2e_rate) if e2e_rate else "-", text])
    table("7. Durability settings: cost of each store's sync policy (us per increment from section 1; "
          "updates/s from section 5)",
          ["store", "setting", "us/incr", "vs cheapest", "bare floor us", "e2e upd/s", "what it buys"], rows,
          ["fsync=False drops only the fsync: the temp file + os.replace (atomicity) stay, and on ext4 a replace over"
           " an existing file",
           "starts writeback by itself (auto_da_alloc); the two json floor rows show what the fsync alone costs here."])


# ---------------------------------------------------------------------------------------
# --profile: where the per-update time goes
# ---------------------------------------------------------------------------------------

def profile_store(env: Env, which: str, ops: int) -> None:
    import cProfile
    import pstats

    matches = [s for s in STORES if s[0].replace(" ", "-") == which or s[0] == which or s[1] == which]
    if not matches:
        raise SystemExit(f"--profile: unknown store {which!r}; use one of "
                         f"{', '.join(s[0].replace(' ', '-') for s in STORES)}")
    name, kind, options = matches[0]
    store = env.make_store(kind, f"profile-{name}", **options)
    sessions = Sessions(store, initial=lambda: {"count": 0})
    rmw = session_handlers(sessions)[1]
    messages = make_messages([1_000_001 + i for i in range(env.plan.keys)])
    run = cycler(rmw, messages)
    run(len(messages) * 3)  # create and warm
    profiler = cProfile.Profile()
    profiler.enable()
    t0 = now_ns()
    run(ops)
    elapsed = now_ns() - t0
    profiler.disable()
    close_store(store)
    print(f"\n== cProfile of {ops:,} increments through with_session, store {name} "
          f"({fmt_us(elapsed / ops)} us/op under the profiler)")
    pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(18)


# ---------------------------------------------------------------------------------------
# --breakdown: the per-update cost by step, from cProfile self times
# ---------------------------------------------------------------------------------------

STEPS = ["lock", "read", "decode", "bind", "handler", "encode", "check", "compare + record", "write", "unlock",
         "manager (rest)"]

_STEP_OF = {  # (file, function) -> step; anything else takes its caller's step
    ("manager.py", "_run"): "manager (rest)", ("manager.py", "load"): "manager (rest)",
    ("manager.py", "close"): "compare + record",  # (close makes the record: change detection, the bytes)
    ("manager.py", "__init__"): "bind", ("manager.py", "key_of"): "bind", ("manager.py", "_checked_key"): "bind", ("manager.py", "read_record"): "decode",
    ("records.py", "read_record"): "decode", ("records.py", "encode_json"): "encode",
    ("records.py", "build_record"): "compare + record",
    ("keys.py", None): "bind", ("context.py", None): "bind",
    ("memory.py", "acquire"): "lock", ("memory.py", "acquire_and_load"): "lock",  # (and a dict lookup)
    ("memory.py", "release"): "unlock", ("memory.py", "load_locked"): "read",
    ("memory.py", "load"): "read", ("memory.py", "save"): "write", ("memory.py", "save_and_release"): "write",
    ("base.py", "acquire"): "lock", ("base.py", "_lock_external"): "lock", ("base.py", "_thread_locks"): "lock",
    ("base.py", "_process_lock_file"): "lock", ("base.py", "release"): "unlock",
    ("base.py", "_unlock_external"): "unlock", ("base.py", "load_locked"): "read",
    ("base.py", "acquire_and_load"): "lock",
    ("base.py", "save_and_release"): "write",
    ("locking.py", "acquire"): "lock", ("locking.py", "lock_at"): "lock", ("locking.py", "key_offset"): "lock",
    ("locking.py", "release"): "unlock", ("locking.py", "unlock_at"): "unlock",
    ("locking.py", "lock_writer"): "write", ("locking.py", "unlock_writer"): "write",
    ("locking_portable.py", "take_mutex"): "write",
    ("sqlite.py", "load"): "read", ("sqlite.py", "save"): "write", ("sqlite.py", "acquire"): "lock",
    ("sqlite.py", "release"): "unlock", ("sqlite.py", "_write"): "write",
    ("jsonfile.py", "load"): "read", ("jsonfile.py", "save"): "write",
    ("bench.py", "increment"): "handler",
}


def _step_of(func: Tuple[str, int, str], caller: Optional[Tuple[str, int, str]], stats: Dict[Any, Any],
             depth: int = 0) -> str:
    base, name = os.path.basename(func[0]), func[2]
    if func[0] == "~" and "ContextVar" in name:
        return "bind"
    if caller is not None and func[0] == "~" and os.path.basename(caller[0]) == "manager.py":
        if "decode" in name:
            return "check" if caller[2] == "close" else "decode"
        if "encode" in name and "Encoder" in name:
            return "encode" if caller[2] == "close" else "decode"  # in load: the baseline
    step = _STEP_OF.get((base, name)) or _STEP_OF.get((base, None))
    if step is not None:
        return step
    if caller is None or depth > 20 or caller not in stats:
        return "manager (rest)"
    callers = stats[caller][4]
    parent = max(callers, key=lambda c: callers[c][3]) if callers else None  # its main caller
    return _step_of(caller, parent, stats, depth + 1)


def breakdown(env: Env, which: str, ops: int) -> Dict[str, Any]:
    """cProfile ``ops`` increments through ``with_session`` and group self time by step; the steps'
    shares scale the unprofiled overhead measured just before (profiling inflates many small calls)."""
    import cProfile
    import pstats

    matches = [s for s in STORES if s[0].replace(" ", "-") == which or s[0] == which or s[1] == which]
    if not matches:
        raise SystemExit(f"--breakdown: unknown store {which!r}; use one of "
                         f"{', '.join(s[0].replace(' ', '-') for s in STORES)}")
    name, kind, options = matches[0]
    store = env.make_store(kind, f"breakdown-{name}", **options)
    sessions = Sessions(store, initial=lambda: {"count": 0})
    rmw = session_handlers(sessions)[1]
    messages = make_messages([1_000_001 + i for i in range(env.plan.keys)])
    run = cycler(rmw, messages)
    plain = {"count": 0}

    def undecorated(message: Any) -> None:
        plain["count"] += 1

    base_run = cycler(undecorated, messages)
    run(len(messages) * 3)
    n = calibrate(run, 0.05, 20)[0]
    pairs = [(timed(run, n), timed(base_run, n)) for _ in range(7)]
    overhead_ns = median([a - b for a, b in pairs])
    profiler = cProfile.Profile()
    profiler.enable()
    run(ops)
    profiler.disable()
    close_store(store)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    totals = {step: 0.0 for step in STEPS}
    for func, (cc, nc, tt, ct, callers) in stats.items():
        if func[2] in ("run", "<module>") and os.path.basename(func[0]) in ("bench.py", "<string>"):
            continue
        if "disable" in func[2]:
            continue
        if func[0] == "~" and callers:
            for caller, (_, _, c_tt, _) in callers.items():
                totals[_step_of(func, caller, stats)] += c_tt
        else:
            parent = max(callers, key=lambda c: callers[c][3]) if callers else None
            totals[_step_of(func, parent, stats)] += tt
    profiled = sum(totals.values())
    rows = []
    for step in STEPS:
        share = totals[step] / profiled if profiled else 0.0
        rows.append([step, f"{100 * share:.1f}%", fmt_us(share * overhead_ns)])
    rows.append(["total", "100%", fmt_us(overhead_ns)])
    table(f"Per-update cost of an increment, store {name}: cProfile self time by step "
          f"({ops:,} increments; us = share x the unprofiled overhead, {fmt_us(overhead_ns)} us, measured here)",
          ["step", "share", "~us"], rows,
          ["lock/unlock: thread + process key locks; read: the store's load; decode: the record and its baseline;",
           "bind: key, handle (its own frame), context variable, the session proxy's item access; handler: the handler's own code;",
           "encode/check: msgspec encode of the session and the decode that checks it reads back equal;",
           "compare + record: change detection and the record's bytes; write: the store's save (SQLite: writer lock,"
           " UPDATE); manager (rest): the remaining bytecode of the session scope."])
    return {"store": name, "overhead_ns": overhead_ns, "shares": {k: v / profiled for k, v in totals.items()}}


# ---------------------------------------------------------------------------------------
# plugins: benchmarks/bench_*.py of the other features
# ---------------------------------------------------------------------------------------

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROW_KEYS = ("name", "value", "unit", "compare_to", "ratio", "target", "passed", "note")


def plugin_paths() -> List[str]:
    return sorted(glob.glob(os.path.join(BENCH_DIR, "bench_*.py")))


def _load_plugin(path: str) -> Any:
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_telesession_bench_{stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _clean_row(row: Any) -> Dict[str, Any]:
    row = dict(row) if isinstance(row, dict) else {"name": repr(row)}
    out = {key: row.get(key) for key in ROW_KEYS}
    out["name"] = str(out["name"] or "?")
    out["unit"] = str(out["unit"] or "")
    out["compare_to"] = str(out["compare_to"] or "")
    out["note"] = str(out["note"] or "")
    for key in ("value", "ratio"):
        try:
            out[key] = None if out[key] is None else float(out[key])
        except (TypeError, ValueError):
            out[key] = None
    out["passed"] = None if out["passed"] is None else bool(out["passed"])
    return out


def section_plugins(env: Env, wanted: Optional[set]) -> None:
    """Import every ``benchmarks/bench_*.py``, run it, print its rows; rows with a target join the summary."""
    results: Dict[str, Any] = env.results.setdefault("plugins", {})
    for path in plugin_paths():
        stem = os.path.splitext(os.path.basename(path))[0]
        t0 = time.monotonic()
        try:
            module = _load_plugin(path)
            section = str(getattr(module, "SECTION", stem[len("bench_"):]))
        except Exception as exc:  # noqa: BLE001 - a broken plugin is a row, not a crash
            module, section = None, stem[len("bench_"):]
            rows = [_clean_row({"name": f"{stem}: import failed", "note": f"ERROR {short_reason(exc)}"})]
        if wanted is not None and section not in wanted and stem not in wanted:
            continue
        if module is not None:
            log(f"[plugin {section}] {os.path.basename(path)}")
            try:
                rows = [_clean_row(r) for r in module.run(env.plan.quick, env.fresh_dir(f"plugin-{section}"))]
            except Exception as exc:  # noqa: BLE001
                log(f"[plugin {section}] failed: {traceback.format_exc()}")
                rows = [_clean_row({"name": f"{section}: run failed", "note": f"ERROR {short_reason(exc)}"})]
        took = time.monotonic() - t0
        results[section] = {"file": os.path.basename(path), "rows": rows, "seconds": round(took, 1)}
        printed = []
        for r in rows:
            printed.append([r["name"], fmt_value(r["value"], r["unit"]), r["compare_to"] or "-", fmt_ratio(r["ratio"]),
                            r["target"] or "-", status(r["passed"]) if r["target"] else "info", r["note"]])
            if r["target"] or r["note"].startswith("ERROR"):
                target_row(env, f"plugin {section}", r["name"], r["value"], r["unit"], r["compare_to"], r["ratio"],
                           r["target"], r["passed"], r["note"])
        table(f"plugin {section} ({os.path.basename(path)}, {took:.1f} s)",
              ["what", "figure", "compared with", "ratio", "target", "status", "note"], printed)


def print_targets(env: Env) -> None:
    rows = []
    for t in env.targets:
        rows.append([t["section"], t["name"], fmt_value(t["value"], t["unit"]), t["compare_to"] or "-",
                     fmt_ratio(t["ratio"]), t["target"] or "-", status(t["passed"]), t["note"]])
    counts = {s: sum(1 for t in env.targets if status(t["passed"]) == s) for s in ("PASS", "FAIL", "n/a")}
    table("Targets: every target with its figure, the floor or peer, the ratio (all measured in this run)",
          ["section", "target", "figure", "compared with", "ratio", "target", "status", "note"], rows,
          [f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['n/a']} n/a"
           + ("  (a --quick run: smaller samples, read the figures of a full run)" if env.plan.quick else "")])
    env.results["targets"] = env.targets
    env.results["target_counts"] = counts


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------

def machine(env: Env, started: datetime.datetime) -> Dict[str, Any]:
    try:
        from importlib.metadata import version

        telebot_version = version("pyTelegramBotAPI")
    except Exception:  # noqa: BLE001
        telebot_version = "?"
    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {
        "date": started.isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version() + " " + platform.python_implementation(),
        "telebot": telebot_version,
        "telesession": getattr(telesession, "__version__", "?"),
        "sqlite": sqlite3.sqlite_version,
        "redis_server": env.redis.version if env.redis.url else f"n/a ({env.redis.reason})",
        "platform": platform.platform(),
        "temp_dir": env.base,
        "filesystem": filesystem_of(env.base),
        "mode": "quick" if env.plan.quick else "full",
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller run, under 40 s")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--dir", metavar="DIR", help="where temporary stores live (default: the system temp dir)")
    parser.add_argument("--only", metavar="SECTIONS", default="1,4,5,6,7,plugins",
                        help="comma-separated sections to run (1 covers 1-3; 'plugins': every bench_*.py, or a "
                             "plugin's SECTION name); default all")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin section 5 (end to end) to one core")
    parser.add_argument("--e2e", metavar="NAMES",
                        help="section 5 with only the configurations whose name contains one of these "
                             "comma-separated words ('sqlite': SQLiteStore and its raw floor)")
    parser.add_argument("--e2e-reps", type=int, metavar="N",
                        help="section 5: rounds of every configuration (default 5, --quick 3)")
    parser.add_argument("--profile", metavar="STORE",
                        help="instead of the benchmark, cProfile the increment path of one store "
                             "(memory, json-fsync, json-no-fsync, shelve, sqlite-NORMAL, redis, ...)")
    parser.add_argument("--breakdown", metavar="STORE", action="append",
                        help="instead of the benchmark, the per-update cost of one store by step (repeatable)")
    parser.add_argument("--profile-ops", type=int, default=20_000, metavar="N")
    args = parser.parse_args(argv)

    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    plan = Plan(args.quick)
    base = tempfile.mkdtemp(prefix="telesession-bench-", dir=args.dir)
    redis_server = RedisServer(base)
    env = Env(plan, base, redis_server)
    env.pin = not args.no_pin
    if args.e2e is not None:
        env.e2e_only = [word.strip().lower() for word in args.e2e.split(",") if word.strip()]
        names = (["no sessions (baseline)", "telebot StateMemoryStorage"]
                 + [n for n, _, _ in STORES if n not in E2E_SKIPPED] + [RAW_SQLITE])
        if not any(word in name.lower() for name in names for word in env.e2e_only):
            parser.error(f"--e2e {args.e2e!r} names no configuration of section 5: {', '.join(names)}")
    if args.e2e_reps is not None:
        if args.e2e_reps < 1:
            parser.error("--e2e-reps must be 1 or more")
        plan.e2e_reps = args.e2e_reps
    if (args.e2e is not None or args.e2e_reps is not None) and "5" not in {s.strip() for s in args.only.split(",")}:
        parser.error("--e2e and --e2e-reps belong to section 5: add 5 to --only")
    env.results["e2e_options"] = {"only": env.e2e_only, "reps": plan.e2e_reps}
    try:
        sections = {{"2": "1", "3": "1"}.get(s.strip(), s.strip()) for s in args.only.split(",") if s.strip()}
        special = " ".join([args.profile or ""] + (args.breakdown or []))
        needs_redis = ((args.profile is None and not args.breakdown and sections & {"1", "4", "5", "6"})
                       or "redis" in special)
        if needs_redis:
            redis_server.start()
        if args.profile:
            profile_store(env, args.profile, args.profile_ops)
            return 0
        if args.breakdown:
            out = [breakdown(env, which, args.profile_ops) for which in args.breakdown]
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"breakdown": out}, f, indent=1, default=str)
            return 0
        info = machine(env, started)
        env.results["machine"] = info
        print(f"telesession benchmark ({info['mode']} run)")
        for key in ("date", "nproc", "cpu", "python", "telebot", "telesession", "sqlite", "redis_server",
                    "platform", "filesystem"):
            print(f"  {key:<13} {info[key]}")
        print("  all figures: medians of repetitions in this run; ratios against baselines of this run")
        gc.collect()
        timings = env.results["section_s"] = {}
        for number, function in (("1", section_micro), ("4", section_scaling), ("5", section_e2e),
                                 ("6", section_multiprocess), ("7", section_durability)):
            if number in sections and (number != "7" or "micro" in env.results):
                t0 = time.monotonic()
                function(env)
                timings[number] = round(time.monotonic() - t0, 1)
                log(f"[{number}] took {timings[number]:.1f} s")
        plugin_names = sections - {"1", "4", "5", "6", "7"}
        if plugin_names:
            t0 = time.monotonic()
            section_plugins(env, None if "plugins" in plugin_names else plugin_names)
            timings["plugins"] = round(time.monotonic() - t0, 1)
        print_targets(env)
        total = time.monotonic() - t_start
        env.results["runtime_s"] = total
        print(f"\nTotal runtime {total:.0f} s.")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(env.results, f, indent=1, default=str)
            print(f"Results written to {args.json}.")
        return 0
    finally:
        redis_server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
