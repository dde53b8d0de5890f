"""Crash safety: writers killed with SIGKILL at random instants never tear, lose or lock a session.

A child interpreter increments ``session["count"]`` of a few keys in a tight loop
and appends ``KEY VALUE`` to its own log only after the ``with`` block has
exited, so every logged value is known to be committed.  The test kills it at a
random moment, many times in a row, and after every kill checks, from this (a
different) process: the store opens, every key loads, each counter holds exactly
the committed increments (plus at most the one in flight when the kill came),
nothing went backwards, and the dead writer's locks are gone.
"""
import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest

from telesession import Sessions
from telesession.errors import LockTimeout, SessionError
from telesession.stores import from_url

from support import KILL_BEFORE_FILE_OPERATION  # noqa: E402  (tests/ is on sys.path)

KEYS = ["hot", "-1001234567890", "ключ/../x"]
KILLS = 25
MIN_KILLS = 20
BUDGET_SECONDS = 15.0
LOCK_TIMEOUT = 5.0

CHILD = r"""
import os, sys
from telesession import Sessions, session
from telesession.stores import from_url

url, log_path, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
sessions = Sessions(from_url(url), initial=lambda: {"count": 0}, lock_timeout=5.0)
log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
sys.stdout.write("ready\n")
sys.stdout.flush()
while True:
    for key in keys:
        with sessions.open(key):
            session["count"] += 1
            value = session["count"]
        # committed: the with block has exited, so the value is in the store
        os.write(log, ("%d %d\n" % (keys.index(key), value)).encode())
"""

CHECK_LOCKS = r"""
import sys, time
from telesession import Sessions
from telesession.stores import from_url

url, keys = sys.argv[1], sys.argv[2:]
sessions = Sessions(from_url(url), lock_timeout=float(%r))
for key in keys:
    start = time.monotonic()
    with sessions.open(key) as s:
        s["fresh-process"] = True
    assert time.monotonic() - start < 2.0, key
print("ok")
""" % LOCK_TIMEOUT


def _url(kind: str, tmp_path, request=None) -> str:
    if kind == "redis":  # a short lease: a killed writer's lock lives at most that long
        return f"{request.getfixturevalue('redis_url')}?prefix=crash-{tmp_path.name}:&lease=0.5"
    if kind == "json":
        return f"json:{tmp_path / 'sessions'}"
    if kind == "shelve":
        return f"shelve:{tmp_path / 'shelf' / 'sessions'}"
    return f"sqlite:{tmp_path / 'sessions.sqlite'}"


def _read_log(path: str) -> list:
    """``(key index, value)`` per complete line; a line cut by the kill is ignored."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the last element is "" or a torn line
    return [tuple(int(x) for x in line.split()) for line in lines]


def _wait_ready(proc: subprocess.Popen, timeout: float) -> bool:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return bool(ready) and proc.stdout.readline() == b"ready\n"


def _check(url: str, counts: dict, logged: list) -> dict:
    """Open the store afresh, load every key under its lock; return the counters."""
    store = from_url(url)  # must open without error after the kill
    try:
        sessions = Sessions(store, initial=lambda: {"count": 0}, lock_timeout=LOCK_TIMEOUT)
        after = {}
        for i, key in enumerate(KEYS):
            start = time.monotonic()
            try:
                with sessions.open(key) as s:  # CorruptSessionError or LockTimeout would fail here
                    after[i] = s["count"]
            except LockTimeout:
                pytest.fail(f"the killed writer's lock on {key!r} lingers")
            assert time.monotonic() - start < LOCK_TIMEOUT
        assert set(store.keys()) == {"session:" + KEYS[i] for i, n in after.items() if n > 0}
    finally:
        if hasattr(store, "close"):
            store.close()
    in_flight = 0
    for i in range(len(KEYS)):
        mine = [v for k, v in logged if k == i]
        before = counts[i]
        # logged values are exactly the next committed values, in order
        assert mine == list(range(before + 1, before + 1 + len(mine))), (KEYS[i], before, mine[:5])
        # never backwards, never below what was known committed ...
        assert after[i] >= before + len(mine), (KEYS[i], before, len(mine), after[i])
        # ... and nothing invented: at most the increment in flight at the kill
        assert after[i] <= before + len(mine) + 1, (KEYS[i], before, len(mine), after[i])
        in_flight += after[i] - before - len(mine)
    assert in_flight <= 1, "more than one unlogged commit: one writer commits one key at a time"
    return after


@pytest.mark.parametrize("kind", ["json", "shelve", "sqlite"])
def test_sigkill_at_random_moments_never_loses_tears_or_locks(kind, tmp_path):
    url = _url(kind, tmp_path)
    rng = random.Random()
    counts = {i: 0 for i in range(len(KEYS))}
    kills = progressed = 0
    deadline = time.monotonic() + BUDGET_SECONDS
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH")])))
    while kills < KILLS and time.monotonic() < deadline:
        log_path = str(tmp_path / f"log-{kills}.txt")
        proc = subprocess.Popen([sys.executable, "-c", CHILD, url, log_path, *KEYS],
                                stdout=subprocess.PIPE, env=env)
        try:
            if kills % 5 == 4:  # now and then, kill it while it starts up and opens the store
                time.sleep(rng.uniform(0.0, 0.08))
            else:
                assert _wait_ready(proc, 30.0), "the writer did not start"
                time.sleep(rng.uniform(0.02, 0.2))
            assert proc.poll() is None, f"the writer died by itself: {proc.returncode}"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        kills += 1
        logged = _read_log(log_path)
        after = _check(url, counts, logged)
        progressed += sum(after.values()) > sum(counts.values())
        counts = after

    print(f"\n{kind}: {kills} SIGKILLs survived, counters {counts}")
    assert kills >= MIN_KILLS, f"only {kills} kills within {BUDGET_SECONDS} s"
    assert progressed >= kills // 2, f"the writers made progress in only {progressed} of {kills} runs"
    assert sum(counts.values()) > 0

    # A brand-new process takes every key at once: no lock of the dead writers lingers.
    done = subprocess.run([sys.executable, "-c", CHECK_LOCKS, url, *KEYS], env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 0 and done.stdout == b"ok\n", done.stderr.decode()[-2000:]
    sessions = Sessions(from_url(url), lock_timeout=LOCK_TIMEOUT)
    for i, key in enumerate(KEYS):
        with sessions.open(key) as s:
            assert s == {"count": counts[i], "fresh-process": True}


# ---- a crash at every instant of a save, deterministically ----------------------------------
# An audit hook (sys.addaudithook) sees every file operation Python performs: open, rename and
# replace, remove, chmod, truncate, mkdir.  The child first counts those of one save ("hot" from
# "a" * 9 to "b" * 10), then, once per operation, runs the same save and SIGKILLs itself just
# before the n-th: every write before it has completed, nothing after it has begun.  This is
# independent of how a store or the dbm module under shelve is written.  The contract: after
# each crash "hot" is its old or its new value, "other" is untouched, and the store works.

TRAP = KILL_BEFORE_FILE_OPERATION + r"""
from telesession import Sessions
from telesession.stores import from_url

url = sys.argv[1]
sessions = Sessions(from_url(url))
with sessions.open("hot") as s:
    s["text"] = "b" * 10
    armed = True  # the save happens as the block exits
armed = False
print(len(seen))
"""


def _trap(url: str, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRAP, url, str(kill_at)], capture_output=True, timeout=60)


# SQLite does its file operations in C, below the audit hooks (a save shows none): the random
# SIGKILLs above cover it.
@pytest.mark.parametrize("kind", ["json", "shelve"])
def test_a_crash_before_any_file_operation_of_a_save_leaves_old_or_new(kind, tmp_path):
    url = _url(kind, tmp_path / "probe")
    _seed_crash_store(url)
    counted = _trap(url, 0)
    assert counted.returncode == 0, counted.stderr.decode()[-2000:]
    operations = int(counted.stdout)
    assert operations >= 2, "a save that performs no file operation?"

    broken = []
    for n in range(1, operations + 1):
        url = _url(kind, tmp_path / f"kill-{n}")
        _seed_crash_store(url)
        done = _trap(url, n)
        assert done.returncode == -signal.SIGKILL, (n, done.returncode, done.stderr.decode()[-2000:])
        try:
            sessions = Sessions(from_url(url), lock_timeout=LOCK_TIMEOUT)  # opens; no lingering lock
            with sessions.open("hot") as s:
                hot = s.get("text")
            with sessions.open("other") as s:
                other = s.get("text")
            if hot not in ("a" * 9, "b" * 10) or other != "untouched":
                broken.append((n, f"hot={hot!r} other={other!r}"))
                continue
            with sessions.open("hot") as s:  # and the store keeps working
                s["text"] = "c"
            with Sessions(from_url(url)).open("hot") as s:
                assert s["text"] == "c"
        except SessionError as exc:
            broken.append((n, f"{type(exc).__name__}: {exc}"))
    assert not broken, f"{len(broken)} of {operations} crash points broke the store: {broken}"


def _seed_crash_store(url: str) -> None:
    store = from_url(url)
    sessions = Sessions(store)
    with sessions.open("other") as s:
        s["text"] = "untouched"
    with sessions.open("hot") as s:
        s["text"] = "a" * 9
    if hasattr(store, "close"):
        store.close()
