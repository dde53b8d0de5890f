"""telebot's states API: µs per ``with bot.retrieve_data(...)`` increment, StateStorage vs telebot's storages.

``StateStorage`` locks the key for the block, checks the data round-trips through JSON
and writes an atomic record; telebot's ``StateMemoryStorage`` deep-copies a dict and
``StatePickleStorage`` re-reads and rewrites its whole pickle file, neither with a lock.
The 8-thread rows show what that lock buys: exact totals, where telebot's memory
storage loses increments.

    python3 benchmarks/bench_states.py [--quick]
"""
import os
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List

from plugin_rows import print_rows, row

SECTION = "states"

TOKEN = "123456:BENCH"


def _bot(storage: Any) -> Any:
    import telebot

    return telebot.TeleBot(TOKEN, state_storage=storage)


def _increment(bot: Any, user: int) -> None:
    with bot.retrieve_data(user, user) as data:
        data["n"] = data.get("n", 0) + 1


def _per_increment_us(bot: Any, n: int, user: int = 1, others: int = 100) -> float:
    for other in range(1000, 1000 + others):  # a bot has more than one user
        bot.set_state(other, "idle", other)
    bot.set_state(user, "counting", user)
    for _ in range(min(50, n)):  # warm up: files created, caches filled
        _increment(bot, user)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            _increment(bot, user)
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def _threaded(bot: Any, threads: int, per_thread: int, user: int = 2) -> Dict[str, float]:
    bot.set_state(user, "counting", user)
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            with bot.retrieve_data(user, user) as data:
                value = data.get("n", 0)
                time.sleep(0)
                data["n"] = value + 1

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    with bot.retrieve_data(user, user) as data:
        total = data.get("n", 0)
    return {"us": elapsed / (threads * per_thread) * 1e6, "total": total}


def run(quick: bool, workdir: str) -> List[Dict[str, Any]]:
    from telebot.storage import StateMemoryStorage, StatePickleStorage

    from telesession import StateStorage

    n = 300 if quick else 3000
    makers: Dict[str, Callable[[str], Any]] = {
        "StateStorage(memory)": lambda d: StateStorage("memory://"),
        "StateStorage(sqlite)": lambda d: StateStorage(f"sqlite:{os.path.join(d, 'states.sqlite')}"),
        "telebot StateMemoryStorage": lambda d: StateMemoryStorage(),
        "telebot StatePickleStorage": lambda d: StatePickleStorage(file_path=os.path.join(d, "states.pkl")),
    }
    us: Dict[str, float] = {}  # 101 users' states in each storage, one of them incremented
    for name, make in makers.items():
        with tempfile.TemporaryDirectory(dir=workdir) as d:
            storage = make(d)
            us[name] = _per_increment_us(_bot(storage), n)
            if hasattr(storage, "close"):
                storage.close()
    rows = [
        row("retrieve_data increment, StateStorage(memory)", us["StateStorage(memory)"], "µs/increment",
             "telebot StateMemoryStorage", us["StateStorage(memory)"] / us["telebot StateMemoryStorage"],
             note="locked, JSON-checked; the peer takes no lock and loses increments under threads"),
        row("retrieve_data increment, StateStorage(sqlite)", us["StateStorage(sqlite)"], "µs/increment",
             "telebot StatePickleStorage", us["StateStorage(sqlite)"] / us["telebot StatePickleStorage"],
             target="≤ 1.0×",
             passed=us["StateStorage(sqlite)"] <= us["telebot StatePickleStorage"],
             note="durable, atomic, shared by processes; the peer rewrites one pickle file in place"),
        row("retrieve_data increment, telebot StateMemoryStorage", us["telebot StateMemoryStorage"],
             "µs/increment", note="peer"),
        row("retrieve_data increment, telebot StatePickleStorage", us["telebot StatePickleStorage"],
             "µs/increment", note="peer (101 states in the file; its cost grows with every state)"),
    ]
    threads, per = 8, (25 if quick else 100)
    want = threads * per
    for name in ("StateStorage(memory)", "telebot StateMemoryStorage"):
        with tempfile.TemporaryDirectory(dir=workdir) as d:
            result = _threaded(_bot(makers[name](d)), threads, per)
        exact = result["total"] == want
        rows.append(row(f"8 threads on one user, {name}", result["us"], "µs/increment",
                         passed=exact if name.startswith("StateStorage") else None,
                         target="exact" if name.startswith("StateStorage") else None,
                         note=f"total {result['total']:.0f} of {want}"
                              + ("" if exact else f" ({want - result['total']:.0f} lost)")))
    return rows


if __name__ == "__main__":
    print_rows(run)
