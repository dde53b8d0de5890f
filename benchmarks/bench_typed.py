"""Typed sessions: µs per update of a dataclass session against the same session as a dict.

A typed session is decoded into its dataclass and checked against the field types on
load (``msgspec.convert``), and encoded from it on save; a dict session is decoded and
encoded as plain JSON. Both run the same handler through ``with_session`` on the same
store in the same run, timed in alternating rounds; the ratio is the median of the
rounds' ratios of (update - undecorated handler). Two sessions: a counter (one field)
and a form (six fields, a list, a nested dict), on ``MemoryStore`` (the session
layer alone) and ``SQLiteStore`` (what a bot on one host pays).

    python3 benchmarks/bench_typed.py [--quick]
"""
import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List

from plugin_rows import print_rows, row

SECTION = "typed"

# On a store a bot uses (SQLite here), a typed update may cost at most this many times the same
# update on a dict; on MemoryStore the ratio is shown as information: it is the typing work
# (decode into the class with type checks, encode, read-back check) over the bare session layer.
TARGET = 1.5


@dataclasses.dataclass
class Counter:
    count: int = 0


@dataclasses.dataclass
class Form:
    step: str = "start"
    name: str = ""
    age: int = 0
    items: List[str] = dataclasses.field(default_factory=list)
    prices: Dict[str, float] = dataclasses.field(default_factory=dict)
    visits: int = 0


def _form_dict() -> Dict[str, Any]:
    return {"step": "start", "name": "", "age": 0, "items": [], "prices": {}, "visits": 0}


def _messages(n: int) -> List[Any]:
    import telebot

    return [telebot.types.Message.de_json(json.dumps({
        "message_id": i, "date": 0, "text": "x", "chat": {"id": 1000 + i, "type": "private"},
        "from": {"id": 1000 + i, "is_bot": False, "first_name": "u"}})) for i in range(n)]


def _handlers(sessions: Any, typed: bool, form: bool) -> Callable[[Any], None]:
    from telesession import session

    if form and typed:
        def handler(message: Any) -> None:
            session.visits += 1
            if session.visits == 1:
                session.step, session.name, session.age = "menu", "Ann", 30
                session.items.extend(["tea", "cake"])
                session.prices.update({"tea": 2.5, "cake": 4.0})
    elif form:
        def handler(message: Any) -> None:
            session["visits"] += 1
            if session["visits"] == 1:
                session["step"], session["name"], session["age"] = "menu", "Ann", 30
                session["items"].extend(["tea", "cake"])
                session["prices"].update({"tea": 2.5, "cake": 4.0})
    elif typed:
        def handler(message: Any) -> None:
            session.count += 1
    else:
        def handler(message: Any) -> None:
            session["count"] += 1
    return sessions.with_session(handler)  # type: ignore[no-any-return]


def _rounds(cases: Dict[str, Callable[[Any], None]], messages: List[Any], per_round: int,
            rounds: int) -> Dict[str, List[float]]:
    """µs per call of each case, one list entry per round; cases alternate within a round."""
    samples: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            start = time.perf_counter()
            for i in range(per_round):
                call(messages[i % len(messages)])
            samples[name].append((time.perf_counter() - start) / per_round * 1e6)
    return samples


def run(quick: bool, workdir: str) -> List[Dict[str, Any]]:
    from telesession import Sessions
    from telesession.stores import MemoryStore, SQLiteStore

    messages = _messages(100)
    rows: List[Dict[str, Any]] = []
    for store_name in ("memory", "sqlite"):
        per_round = (200 if quick else 2000) if store_name == "memory" else (50 if quick else 400)
        rounds = 5 if quick else 9
        with tempfile.TemporaryDirectory(dir=workdir) as d:
            def store() -> Any:
                if store_name == "memory":
                    return MemoryStore()
                return SQLiteStore(os.path.join(d, f"typed-{len(os.listdir(d))}.sqlite"))

            cases: Dict[str, Callable[[Any], None]] = {"plain": lambda message: None}
            made = []
            for kind in ("counter", "form"):
                for typed in (False, True):
                    initial: Any = (Form if kind == "form" else Counter) if typed else (
                        _form_dict if kind == "form" else (lambda: {"count": 0}))
                    sessions = Sessions(store(), initial=initial)
                    made.append(sessions)
                    handler = _handlers(sessions, typed, kind == "form")
                    for message in messages:  # every session exists: each round is load + change + save
                        handler(message)
                    cases[f"{kind} {'typed' if typed else 'dict'}"] = handler
            samples = _rounds(cases, messages, per_round, rounds)
            for sessions in made:
                sessions.store.close()
        plain = samples["plain"]
        for kind in ("counter", "form"):
            dict_over = [a - p for a, p in zip(samples[f"{kind} dict"], plain)]
            typed_over = [a - p for a, p in zip(samples[f"{kind} typed"], plain)]
            ratio = statistics.median(t / c for t, c in zip(typed_over, dict_over))
            typed_us, dict_us = statistics.median(typed_over), statistics.median(dict_over)
            gated = store_name != "memory"
            rows.append(row(f"{kind} session update, dataclass, {store_name}", typed_us, "µs/update",
                             f"the same as a dict {dict_us:.2f} µs", ratio, f"≤ {TARGET}×" if gated else None,
                             ratio <= TARGET if gated else None,
                             f"median of {rounds} paired rounds of {per_round}; 100 chats; typing costs "
                             f"{typed_us - dict_us:+.2f} µs"))
    return rows


if __name__ == "__main__":
    print_rows(run)
