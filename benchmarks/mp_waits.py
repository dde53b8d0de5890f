"""Where several processes on one SQLite file wait: section 6's workload, with every lock wait counted.

N spawned processes increment sessions of one ``SQLiteStore`` (200 keys plus one hot key
taking 20 % of the updates) for a few seconds.  Each process wraps ``RangeLockFile._wait``
(entered only when a lock byte was found taken by another process) and reports how often
it waited, how long, and how much CPU the waiting took, for the writer byte and for key
bytes; the aggregate throughput and the CPU time per update come with it.  Run it alone
on the machine::

    python benchmarks/mp_waits.py                 # 1, 2 and 4 processes, 3 rounds
    python benchmarks/mp_waits.py --procs 2,4 --rounds 5 --seconds 3
    python benchmarks/mp_waits.py --separate      # each process on a database of its own

``--separate`` is the ceiling: the same processes sharing nothing but the machine (no
lock byte, no write queue, no page cache invalidated by another process's commits).
"""
import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from telesession import Sessions, session  # noqa: E402
from telesession import locking  # noqa: E402
from telesession.stores.sqlite import SQLiteStore  # noqa: E402

HOT_SHARE = 0.2
KEYS = 200


def _worker(path: str, seed: int, start_at: float, seconds: float, results: Any) -> None:
    waits: Dict[str, List[float]] = {"writer": [0, 0.0, 0.0], "key": [0, 0.0, 0.0]}  # count, s, CPU s
    plain_wait = locking.RangeLockFile._wait

    def counted_wait(self: locking.RangeLockFile, offset: int, timeout: float, longest_sleep: float) -> bool:
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            return plain_wait(self, offset, timeout, longest_sleep)
        finally:
            tally = waits["writer" if offset == locking.WRITER_OFFSET else "key"]
            tally[0] += 1
            tally[1] += time.perf_counter() - started
            tally[2] += time.process_time() - cpu_started

    locking.RangeLockFile._wait = counted_wait  # type: ignore[method-assign]
    sessions = Sessions(SQLiteStore(path), initial=lambda: {"count": 0}, lock_timeout=60)
    rng = random.Random(seed)
    names = [f"k{i}" for i in range(KEYS)]
    with sessions.open("warm-up"):
        session["count"] += 1
    while time.monotonic() < start_at:
        pass
    cpu = time.process_time()
    ops = 0
    end_at = start_at + seconds
    while time.monotonic() < end_at:
        with sessions.open("hot" if rng.random() < HOT_SHARE else rng.choice(names)):
            session["count"] += 1
        ops += 1
    results.put((ops, time.process_time() - cpu, waits))


def run(processes: int, seconds: float, separate: bool = False) -> Dict[str, float]:
    """One round: ``processes`` workers on a fresh database (one each with ``separate``); totals checked."""
    directory = tempfile.mkdtemp(prefix="telesession-waits-")
    paths = [os.path.join(directory, f"sessions-{i if separate else 0}.sqlite") for i in range(processes)]
    for path in set(paths):
        SQLiteStore(path).close()  # created before the workers race to create it
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start_at = time.monotonic() + 1.5 + 0.3 * processes
    workers = [ctx.Process(target=_worker, args=(path, seed, start_at, seconds, results))
               for seed, path in enumerate(paths)]
    for worker in workers:
        worker.start()
    done: List[Tuple[int, float, Dict[str, List[float]]]] = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    ops = sum(r[0] for r in done)
    total = 0
    for path in set(paths):
        with SQLiteStore(path) as store:
            counts = Sessions(store)
            total += sum(counts.get(key, {"count": 0})["count"] for key in ["hot"] + [f"k{i}" for i in range(KEYS)])
    shutil.rmtree(directory)
    if total != ops:
        raise SystemExit(f"totals differ: {total} counted, {ops} done")
    row = {"per_s": ops / seconds, "cpu_us": sum(r[1] for r in done) / ops * 1e6}
    for kind in ("writer", "key"):
        count = sum(r[2][kind][0] for r in done)
        waited = sum(r[2][kind][1] for r in done)
        row[f"{kind}_waits"] = count / ops
        row[f"{kind}_us"] = waited / ops * 1e6
        row[f"{kind}_each_us"] = waited / count * 1e6 if count else 0.0
        row[f"{kind}_cpu_us"] = sum(r[2][kind][2] for r in done) / ops * 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--separate", action="store_true", help="one database per process (the ceiling)")
    args = parser.parse_args()
    counts = [int(n) for n in args.procs.split(",")]
    rows: Dict[int, List[Dict[str, float]]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:  # interleaved, so that drift hits every count alike
            rows[n].append(run(n, args.seconds, args.separate))
    print(f"{'procs':>5} {'updates/s':>10} {'CPU us/upd':>10} {'writer waits/upd':>16} "
          f"{'us each':>8} {'wait CPU us':>11} {'key waits/upd':>13} {'us each':>8} {'wait CPU us':>11}"
          f"   (medians of {args.rounds} rounds; totals exact"
          f"{'; a database per process' if args.separate else ''})")
    for n in counts:
        def med(field: str) -> float:
            return statistics.median(r[field] for r in rows[n])
        print(f"{n:>5} {med('per_s'):>10,.0f} {med('cpu_us'):>10.0f} {med('writer_waits'):>16.2f} "
              f"{med('writer_each_us'):>8.0f} {med('writer_cpu_us'):>11.1f} {med('key_waits'):>13.2f} "
              f"{med('key_each_us'):>8.0f} {med('key_cpu_us'):>11.1f}")


if __name__ == "__main__":
    main()
