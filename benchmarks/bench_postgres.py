#!/usr/bin/env python3
"""PostgresStore against a floor of the same SQL, scaling with the table, and several processes.

    python benchmarks/bench_postgres.py [--quick]

Starts its own PostgreSQL server (``tests/postgres_server.py``: Debian's binaries, a temporary
directory, a free loopback port; fsync off, so the disk is not measured) and stops it by PID.
Rows (each figure from this run, medians of rounds interleaved store/floor):

* ``postgres update``: one increment through ``Sessions.open`` (lock, load, decode, change,
  encode, conditional save, commit), against the floor: the same SQL statements run bare by
  psycopg on one connection, pipelined the same way (BEGIN + lock_timeout + advisory lock +
  SELECT; UPDATE + COMMIT), no pool, no records.
* ``postgres update at N sessions``: the same with 100 / 10,000 / 100,000 rows in the table
  (random keys), against 100 rows.
* ``postgres N processes``: updates/s of 1 / 2 / 4 processes on distinct keys (totals
  checked), against 1 process.
"""
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

SECTION = "postgres"

now_ns = time.perf_counter_ns


def _row(name: str, value: float, unit: str, compare_to: str = "", ratio: Optional[float] = None,
         target: Optional[str] = None, passed: Optional[bool] = None, note: str = "") -> Dict[str, Any]:
    return {"name": name, "value": round(value, 2), "unit": unit, "compare_to": compare_to,
            "ratio": None if ratio is None else round(ratio, 2), "target": target, "passed": passed, "note": note}


def _store_updates(sessions: Any, keys: List[str], n: int) -> float:
    """µs per increment through the manager."""
    from telesession import session

    start = now_ns()
    for i in range(n):
        with sessions.open(keys[i % len(keys)]):
            session["count"] += 1
    return (now_ns() - start) / n / 1000


def _floor_updates(conn: Any, table: str, seed: int, keys: List[str], n: int) -> float:
    """µs per increment as the same statements, bare (the record is a fixed small JSON)."""
    load = f"SELECT record FROM {table} WHERE key = %s AND (expires IS NULL OR expires > now())"
    update = (f"UPDATE {table} SET record = %b, written = now(), expires = now() + %s::float8 * interval '1 second' "
              f"WHERE key = %s AND record = %b")
    start = now_ns()
    for i in range(n):
        key = keys[i % len(keys)]
        with conn.pipeline():
            conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            conn.execute("SELECT set_config('lock_timeout', %s, true)", ("30000ms",))
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))", (key, seed))
            cur = conn.execute(load, (key,), binary=True)
        previous = bytes(cur.fetchone()[0])
        with conn.pipeline():
            conn.execute(update, (previous[:-1] + (b"1" if previous[-1:] == b"0" else b"0"), None, key, previous))
            conn.execute("COMMIT")
    return (now_ns() - start) / n / 1000


def _fill(conn: Any, table: str, n: int) -> None:
    from telesession.records import build_record

    now = time.time()
    with conn.cursor() as cur:
        with cur.copy(f"COPY {table} (key, record, written) FROM STDIN") as copy:
            for i in range(n):
                key = f"fill:{i}"
                copy.write_row((key, build_record(key, '{"count":0}', 0, now), "now"))


def _child(url: str, prefix: str, n: int, barrier: Any, out: Any) -> None:
    from telesession import Sessions, session
    from telesession.stores import from_url

    sessions = Sessions(from_url(url), initial=lambda: {"count": 0})
    keys = [f"{prefix}:{i}" for i in range(20)]
    with sessions.open(keys[0]):  # connect before the clock starts
        pass
    barrier.wait(60)
    start = time.perf_counter()
    for i in range(n):
        with sessions.open(keys[i % len(keys)]):
            session["count"] += 1
    out.put((start, time.perf_counter()))
    sessions.store.close()


def _processes(url: str, procs: int, per: int) -> float:
    """Total updates/s of ``procs`` processes on distinct keys; totals checked."""
    from telesession.stores import from_url
    from telesession.records import parse_record

    ctx = multiprocessing.get_context("fork")  # children open their own stores from the URL
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    prefix = f"p{procs}-{random.randrange(10**9)}"
    children = [ctx.Process(target=_child, args=(url, f"{prefix}-{c}", per, barrier, out)) for c in range(procs)]
    for c in children:
        c.start()
    spans = [out.get(timeout=300) for _ in children]
    for c in children:
        c.join(60)
    assert [c.exitcode for c in children] == [0] * procs
    store = from_url(url)
    total = sum(parse_record(raw, key, "bench")[0]["count"] for key, raw in store.records(f"session:{prefix}"))
    store.close()
    assert total == procs * per, (total, procs * per)
    return procs * per / (max(e for _, e in spans) - min(s for s, _ in spans))


def run(quick: bool, workdir: str) -> List[Dict[str, Any]]:
    from postgres_server import start_postgres_server

    from telesession import Sessions
    from telesession.stores import from_url

    try:
        import psycopg  # noqa: F401  (the postgres extra)

        server = start_postgres_server()
    except (RuntimeError, ImportError) as exc:
        return [_row("postgres", 0.0, "", note=f"skipped: {exc}")]
    rows: List[Dict[str, Any]] = []
    try:
        url = f"{server.url}?table=bench"
        store = from_url(url)
        sessions = Sessions(store, initial=lambda: {"count": 0})
        keys = [f"k{i}" for i in range(100)]
        for key in keys:  # rows exist: every measured update is an UPDATE
            with sessions.open(key) as s:
                s["count"] = 0
        import psycopg

        conn = psycopg.connect(server.url, autocommit=True)
        floor_table = "bench_floor"
        from_url(f"{server.url}?table={floor_table}").close()
        from telesession.records import build_record

        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {floor_table} (key, record, written) VALUES (%s, %s, now())",
                            [(k, build_record(k, '{"count":0}', 0, time.time())) for k in keys])
        n, rounds = (300, 3) if quick else (2000, 5)
        _store_updates(sessions, keys, n // 3)  # warm up (prepared statements, pool)
        _floor_updates(conn, floor_table, store._seed, keys, n // 3)
        store_us, floor_us = [], []
        for _ in range(rounds):
            store_us.append(_store_updates(sessions, keys, n))
            floor_us.append(_floor_updates(conn, floor_table, store._seed, keys, n))
        s_med, f_med = statistics.median(store_us), statistics.median(floor_us)
        rows.append(_row("postgres update (Sessions.open, increment)", s_med, "µs/update",
                         "same SQL bare, one connection", s_med / f_med, "≤ 2.0×", s_med / f_med <= 2.0,
                         f"floor {f_med:.0f} µs; 2 round trips each; fsync off"))

        # scaling: the same update with N rows in the table, random keys among them; the sizes
        # are measured round by round, interleaved, so drift on a busy machine hits all alike
        sizes = [100, 10_000] if quick else [100, 10_000, 100_000]
        scaled: Dict[int, Any] = {}
        samples: Dict[int, List[str]] = {}
        timings: Dict[int, List[float]] = {size: [] for size in sizes}
        for size in sizes:
            table = f"bench_{size}"
            scaled[size] = Sessions(from_url(f"{server.url}?table={table}"), initial=lambda: {"count": 0})
            _fill(conn, table, size)
            conn.execute(f"ANALYZE {table}")
            rng = random.Random(size)
            samples[size] = [f"fill:{rng.randrange(size)}" for _ in range(n)]
            _store_updates(scaled[size], samples[size], n // 3)
        for _ in range(rounds):
            for size in sizes:
                timings[size].append(_store_updates(scaled[size], samples[size], n))
        base = statistics.median(timings[sizes[0]])
        for size in sizes:
            us = statistics.median(timings[size])
            if size == sizes[0]:
                rows.append(_row(f"postgres update at {size:,} sessions", us, "µs/update", note="random keys"))
            else:
                rows.append(_row(f"postgres update at {size:,} sessions", us, "µs/update", "100 sessions",
                                 us / base, "≤ 1.5×", us / base <= 1.5, "random keys; primary-key lookups"))
            scaled[size].store.close()

        # processes on distinct keys
        per = 300 if quick else 1500
        one = None
        for procs in (1, 2, 4):
            rate = _processes(url, procs, per)
            if one is None:
                one = rate
                rows.append(_row("postgres 1 process", rate, "updates/s", note="totals checked"))
            else:
                rows.append(_row(f"postgres {procs} processes", rate, "updates/s", "1 process", rate / one,
                                 None, None, "totals checked; 2 cores shared with the server"))
        conn.close()
        store.close()
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)
    return rows


if __name__ == "__main__":
    import tempfile

    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as workdir:
        for row in run(quick, workdir):
            status = "" if row["passed"] is None else ("PASS" if row["passed"] else "FAIL")
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x vs {row['compare_to']}"
            print(f"{row['name']:<48} {row['value']:>10.1f} {row['unit']:<10} {ratio:<40} "
                  f"{row['target'] or '':<8} {status:<4} {row['note']}")
