"""Fairness: how long an idle chat waits while another chat has a slow handler and a backlog,
and what per-key scheduling costs in throughput.

Three designs, each in its own process so they are measured alike:

- ``no sessions``: a plain ``TeleBot(num_threads=4)``, the floor;
- ``per-key scheduling``: ``sessions.setup(bot)`` of this checkout;
- ``old design (d54e06f)``: ``sessions.setup(bot)`` of commit d54e06f, where every queued
  update of a busy chat blocked a worker on the chat's lock (``git archive`` of that commit
  into a temp dir; ``n/a`` when git or the commit is missing).

Latency: chat 1 gets a handler that sleeps ``SLOW_S`` and 5 more updates behind it; then 5
idle chats send one update each; the row is the slowest idle chat's wait (ms).
Throughput: ``N`` updates over 100 chats (memory and SQLite stores, 8 workers, an increment),
configurations interleaved, median of the runs; the ratio is old / new updates per second.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

from plugin_rows import row

SECTION = "fairness"
OLD_COMMIT = "d54e06f"
SLOW_S = 1.0
TOKEN = "123456:BENCH"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------- child side


def _bot(threads: int, mode: str, store: Optional[str] = None) -> Any:
    import telebot

    from telesession import Sessions

    bot = telebot.TeleBot(TOKEN, threaded=True, num_threads=threads, use_class_middlewares=True)
    sessions = None
    if mode != "baseline":
        sessions = Sessions(store, initial=lambda: {"count": 0})
        sessions.setup(bot)
    return bot, sessions


def _updates(chats: List[int], texts: Optional[List[str]] = None, start: int = 1) -> List[Any]:
    from telebot import types

    out = []
    for i, chat in enumerate(chats):
        out.append(types.Update.de_json({"update_id": start + i, "message": {
            "message_id": start + i, "date": 0, "text": texts[i] if texts else "hi",
            "chat": {"id": chat, "type": "private"}, "from": {"id": chat, "is_bot": False, "first_name": "u"}}}))
    return out


def child_latency(mode: str) -> Dict[str, Any]:
    bot, sessions = _bot(4, mode)
    done: Dict[int, float] = {}
    cond = threading.Condition()
    started = threading.Event()

    @bot.message_handler(func=lambda m: True)
    def handle(message: Any) -> None:
        if message.text == "slow":
            started.set()
            time.sleep(SLOW_S)
        if sessions is not None:
            sessions.current["count"] += 1
        with cond:
            done.setdefault(message.chat.id, time.monotonic())
            cond.notify_all()

    try:
        bot.process_new_updates(_updates([1], ["slow"]))
        started.wait(10)
        bot.process_new_updates(_updates([1] * 5, ["x"] * 5, start=10))
        idle = list(range(2, 7))
        t0 = time.monotonic()
        bot.process_new_updates(_updates(idle, start=100))
        with cond:
            cond.wait_for(lambda: all(c in done for c in idle), timeout=60)
        waits = [done[c] - t0 for c in idle if c in done]
        time.sleep(SLOW_S + 0.5)  # let the backlog finish before the pool goes
        return {"max_ms": max(waits) * 1000, "median_ms": statistics.median(waits) * 1000}
    finally:
        bot.worker_pool.close()


def child_throughput(mode: str, n: int, store: str) -> Dict[str, Any]:
    import random

    bot, sessions = _bot(8, mode, None if store == "memory" else store)
    finished = threading.Semaphore(0)
    counts: Dict[int, int] = {}

    @bot.message_handler(func=lambda m: True)
    def handle(message: Any) -> None:
        if sessions is not None:
            sessions.current["count"] += 1
        else:
            counts[message.chat.id] = counts.get(message.chat.id, 0) + 1
        finished.release()

    rng = random.Random(3)
    try:
        warm = _updates([rng.randrange(100) + 1 for _ in range(500)], start=1)
        timed = _updates([rng.randrange(100) + 1 for _ in range(n)], start=10_000)
        bot.process_new_updates(warm)
        for _ in warm:
            finished.acquire()
        t0 = time.perf_counter()
        bot.process_new_updates(timed)
        for _ in timed:
            finished.acquire()
        elapsed = time.perf_counter() - t0
        total = None
        if sessions is not None:
            total = 0
            for chat in range(1, 101):
                with sessions.open(str(chat)) as s:
                    total += s["count"]
        return {"rate": n / elapsed, "total": total, "expected": len(warm) + n}
    finally:
        bot.worker_pool.close()


def _child_main(argv: List[str]) -> None:
    kind, mode = argv[0], argv[1]
    import telesession

    result = child_latency(mode) if kind == "latency" else child_throughput(mode, int(argv[2]), argv[3])
    result["telesession"] = os.path.dirname(telesession.__file__)
    print(json.dumps(result))


# --------------------------------------------------------------------------- parent side


def _old_tree(workdir: str) -> Optional[str]:
    """The library as of OLD_COMMIT, unpacked under workdir; None when it cannot be had."""
    target = os.path.join(workdir, f"telesession-{OLD_COMMIT}")
    if os.path.isdir(os.path.join(target, "telesession")):
        return target
    os.makedirs(target, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", ROOT, "archive", OLD_COMMIT, "telesession"],
                                 check=True, capture_output=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", target], input=archive, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return target


def _run_child(args: List[str], pythonpath: Optional[str]) -> Dict[str, Any]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    else:
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if pythonpath and not result["telesession"].startswith(pythonpath):
        raise RuntimeError(f"the child imported {result['telesession']}, not the old tree")
    return result


def run(quick: bool, workdir: str) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    old = _old_tree(workdir)
    designs = [("no sessions", "baseline", None), ("per-key scheduling", "setup", None)]
    if old is not None:
        designs.append((f"old design ({OLD_COMMIT})", "setup", old))

    latency: Dict[str, float] = {}
    for label, mode, path in designs:
        try:
            latency[label] = _run_child(["latency", mode], path)["max_ms"]
        except Exception as exc:  # noqa: BLE001
            rows.append(row(f"idle chat wait, {label}", float("nan"), "ms", note=f"n/a ({exc})"))
    note = f"chat 1: a {SLOW_S:.0f} s handler + 5 queued updates; 5 idle chats; slowest idle chat; 4 workers"
    for label, value in latency.items():
        if label == "per-key scheduling":
            rows.append(row(f"idle chat wait, {label}", value, "ms", "no sessions",
                             None, "≤ 100 ms", value <= 100, note))
        else:
            rows.append(row(f"idle chat wait, {label}", value, "ms", "", None, None, None, note))

    stores = [("memory", "memory", 3000 if quick else 20000),
              ("SQLite", "sqlite:" + os.path.join(workdir, "fair-{}.db"), 1000 if quick else 5000)]
    reps = 3 if quick else 5
    for store_label, store, n in stores:
        rates: Dict[str, List[float]] = {label: [] for label, _, _ in designs}
        exact = True
        failed: Dict[str, str] = {}
        for rep in range(reps):  # interleaved: drift hits every design alike
            for i, (label, mode, path) in enumerate(designs):
                if label in failed or (mode == "baseline" and store_label != "memory"):
                    continue
                try:
                    result = _run_child(["throughput", mode, str(n), store.format(f"{rep}-{i}")], path)
                except Exception as exc:  # noqa: BLE001
                    failed[label] = str(exc)
                    continue
                rates[label].append(result["rate"])
                if result["total"] is not None and result["total"] != result["expected"]:
                    exact = False
        median = {label: statistics.median(r) for label, r in rates.items() if r}
        tnote = f"{n:,} updates over 100 chats, {store_label} store, 8 workers, median of {reps}"
        if "no sessions" in median:
            rows.append(row("throughput, no sessions", median["no sessions"], "updates/s",
                             note=tnote.replace(f", {store_label} store", "")))
        new = median.get("per-key scheduling")
        base = median.get(f"old design ({OLD_COMMIT})")
        if new is not None:
            ratio = base / new if base else None
            rows.append(row(f"throughput, {store_label}, per-key scheduling", new, "updates/s",
                             f"old design ({OLD_COMMIT})" if base else "", ratio,
                             "≤ 1.05×" if ratio is not None else None,
                             (ratio <= 1.05) if ratio is not None else None,
                             tnote + ("; totals exact" if exact else "; TOTALS WRONG")))
        if base is not None:
            rows.append(row(f"throughput, {store_label}, old design ({OLD_COMMIT})", base, "updates/s", note=tnote))
        for label, reason in failed.items():
            rows.append(row(f"throughput, {store_label}, {label}", float("nan"), "updates/s", note=f"n/a ({reason})"))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for r in run("--quick" in sys.argv, tmp):
                ratio = "" if r["ratio"] is None else f"  ratio {r['ratio']:.3f} vs {r['compare_to']}"
                verdict = "" if r["passed"] is None else ("  PASS" if r["passed"] else "  FAIL")
                print(f"{r['name']}: {r['value']:.1f} {r['unit']}{ratio}"
                      f"{'  target ' + r['target'] if r['target'] else ''}{verdict}  ({r['note']})")
