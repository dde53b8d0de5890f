#!/usr/bin/env python3
"""Read access over many SQLite sessions: ``Sessions.items()``/``keys()`` against a bare scan.

    python benchmarks/bench_read_access.py            # 100,000 sessions
    python benchmarks/bench_read_access.py --quick    # 10,000 sessions

What a broadcast costs: iterating every session of a manager (decoded, migrated, never
written back) through ``Sessions.items()``, in µs per session, against the floor of a
bare ``SELECT key, record FROM sessions`` over the same database (``sqlite3``, no
decoding).  Dict sessions and typed (dataclass) sessions are both measured; another
manager's sessions of the same size share the table, so the key-range scan is exercised.
With a ``redis-server`` on PATH, the same over Redis against a bare ``SCAN`` + ``MGET``.
Medians of several rounds; every figure comes from this run.
"""
import dataclasses
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from telesession import Sessions  # noqa: E402
from telesession.records import build_record  # noqa: E402
from telesession.stores import SQLiteStore  # noqa: E402

SECTION = "read access"

#: A whole broadcast over 100,000 sessions should take at most ~2 s on one core: 20 µs each.
TARGET_US = 20.0


@dataclasses.dataclass
class Prefs:
    lang: str = "en"
    count: int = 0
    tags: List[str] = dataclasses.field(default_factory=list)


def _fill(path: str, n: int) -> None:
    """``n`` sessions of the manager "session" and ``n`` of the manager "other", written in bulk."""
    SQLiteStore(path).close()  # the schema
    now = time.time()
    rows = []
    for name in ("session", "other"):
        for i in range(n):
            key = f"{name}:{i}"
            data = '{"lang":"%s","count":%d,"tags":["a","b"]}' % ("de" if i % 3 == 0 else "en", i)
            rows.append((key, build_record(key, data, 0, now), now))
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany("INSERT INTO sessions(key, record, written) VALUES (?, ?, ?)", rows)
    conn.close()


def _median_us(fn: Callable[[], int], rounds: int) -> float:
    """Median µs per item over ``rounds`` calls of ``fn`` (which returns how many items it saw)."""
    results = []
    for _ in range(rounds):
        started = time.perf_counter()
        seen = fn()
        results.append((time.perf_counter() - started) * 1e6 / max(seen, 1))
    return statistics.median(results)


def run(quick: bool, workdir: str) -> List[Dict[str, Any]]:
    n = 10_000 if quick else 100_000
    rounds = 3 if quick else 5
    path = os.path.join(workdir, "read_access.sqlite")
    _fill(path, n)
    store = SQLiteStore(path)
    dicts = Sessions(store)
    typed = Sessions(store, initial=Prefs)

    def floor() -> int:
        conn = sqlite3.connect(path)
        seen = 0
        for _key, _record in conn.execute("SELECT key, record FROM sessions WHERE key >= ? AND key < ?",
                                          ("session:", "session;")):
            seen += 1
        conn.close()
        return seen

    def records() -> int:
        return sum(1 for _ in store.records("session:"))

    def dict_items() -> int:
        seen = 0
        for _key, value in dicts.items():
            seen += value["lang"] == "de" or 1
        return seen

    def typed_items() -> int:
        seen = 0
        for _key, value in typed.items():
            seen += value.lang == "de" or 1
        return seen

    def keys() -> int:
        return sum(1 for _ in dicts.keys())

    assert floor() == records() == dict_items() == typed_items() == keys() == n
    base = _median_us(floor, rounds)
    rows = [{"name": f"bare SELECT key, record ({n:,} rows)", "value": base, "unit": "µs/session",
             "compare_to": "", "ratio": None, "target": None, "passed": None,
             "note": "sqlite3 cursor over the key range, no decoding: the floor"}]
    for name, fn, note in (
            ("Store.records(prefix)", records, "batched key-range pages of 1,000 rows"),
            ("Sessions.keys()", keys, "keys only, pages of 500"),
            ("Sessions.items(), dict sessions", dict_items, "decoded snapshots, ttl/version checked"),
            ("Sessions.items(), dataclass sessions", typed_items, "decoded and type-checked (msgspec)")):
        value = _median_us(fn, rounds)
        passed = value <= TARGET_US if name.startswith("Sessions.items") else None
        rows.append({"name": f"{name} ({n:,} sessions)", "value": value, "unit": "µs/session",
                     "compare_to": "bare SELECT", "ratio": value / base if base else None,
                     "target": f"≤ {TARGET_US:g} µs" if passed is not None else None,
                     "passed": passed, "note": note})
    store.close()
    rows.extend(_redis_rows(n, min(rounds, 3), workdir))
    return rows


def _redis_rows(n: int, rounds: int, workdir: str) -> List[Dict[str, Any]]:
    """The same over Redis, on a redis-server of our own (no rows when there is none)."""
    exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return []
    if exe is None:
        return []
    from telesession.stores import RedisStore

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(500):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        store = RedisStore(client, prefix="bench:")
        now = time.time()
        pipe = client.pipeline(transaction=False)
        for name in ("session", "other"):
            for i in range(n):
                key = f"{name}:{i}"
                data = '{"lang":"%s","count":%d,"tags":["a","b"]}' % ("de" if i % 3 == 0 else "en", i)
                pipe.set(store._session_key(key), build_record(key, data, 0, now))
                if len(pipe) >= 1000:
                    pipe.execute()
        pipe.execute()
        sessions = Sessions(store)

        def floor() -> int:
            seen = 0
            batch: List[bytes] = []
            for name in client.scan_iter(match=b"bench:s:{session:*", count=1000):
                batch.append(name)
                if len(batch) == 1000:
                    seen += sum(1 for r in client.mget(batch) if r is not None)
                    batch = []
            if batch:
                seen += sum(1 for r in client.mget(batch) if r is not None)
            return seen

        def items() -> int:
            return sum(1 for _ in sessions.items())

        assert floor() == items() == n
        base = _median_us(floor, rounds)
        value = _median_us(items, rounds)
        store.close()
        return [{"name": f"Redis SCAN + MGET ({n:,} keys)", "value": base, "unit": "µs/session",
                 "compare_to": "", "ratio": None, "target": None, "passed": None,
                 "note": "redis-py, batches of 1,000, no decoding: the floor"},
                {"name": f"Sessions.items() on Redis ({n:,} sessions)", "value": value, "unit": "µs/session",
                 "compare_to": "Redis SCAN + MGET", "ratio": value / base if base else None,
                 "target": f"≤ {TARGET_US:g} µs", "passed": value <= TARGET_US,
                 "note": "through RedisStore.records(prefix)"}]
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for row in run("--quick" in sys.argv, tmp):
            ratio = f"{row['ratio']:.1f}×" if row["ratio"] is not None else ""
            verdict = "" if row["passed"] is None else ("PASS" if row["passed"] else "FAIL")
            print(f"{row['name']:<56} {row['value']:8.2f} {row['unit']:<11} {ratio:>6}  "
                  f"{row['target'] or '':<9} {verdict:<4}  {row['note']}")
