#!/usr/bin/env python3
"""Benchmark plugin: the session codec, ``msgspec`` (what telesession uses) against the ``json`` module.

One row per session size: encode, read-back check and decode of a session, as
``telesession.records`` does them on every update, against the same three steps
with the standard library (what the records module used before).  Also an
example of the plugin interface that ``benchmarks/bench.py`` imports::

    SECTION = "codec"
    def run(quick: bool, workdir: str) -> list[dict]   # rows: name, value, unit, compare_to,
                                                        # ratio, target, passed, note
"""
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from telesession.records import build_record, encode_json, read_record  # noqa: E402

SECTION = "codec"

SESSIONS = {
    "small session {count}": {"count": 7},
    "typical session (12 fields, a list)": {
        "lang": "de", "step": "address", "count": 12, "name": "Zoë", "premium": False, "score": 3.5,
        "cart": [{"id": i, "qty": 1, "title": f"item {i}"} for i in range(5)], "tags": ["a", "b"],
        "last": 1764064000, "flags": {"beta": True}, "note": None, "city": "Köln"},
}


def _per_op_ns(fn: Callable[[], Any], quick: bool) -> float:
    n = 2_000 if quick else 20_000
    samples = []
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(samples)


def run(quick: bool, workdir: str) -> List[Dict[str, Any]]:
    rows = []
    dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
    loads = json.loads
    for label, data in SESSIONS.items():
        record = build_record("42", encode_json(data, "42", "bench"), 0, time.time())

        def ours() -> None:  # one update's codec work: read the record, encode + check the session
            read_record(record, "42", "bench")
            encode_json(data, "42", "bench")

        def stdlib() -> None:
            loads(record)
            text = dumps(data)
            loads(text) == data  # noqa: B015 - the read-back check

        ns, peer = _per_op_ns(ours, quick), _per_op_ns(stdlib, quick)
        rows.append({"name": f"decode + encode + check, {label}", "value": ns / 1000, "unit": "us/update",
                     "compare_to": f"json module {peer / 1000:.2f} us", "ratio": ns / peer, "target": None,
                     "passed": None, "note": f"{len(record)} byte record"})
    return rows


if __name__ == "__main__":
    for row in run("--quick" in sys.argv, "."):
        print(f"{row['name']}: {row['value']:.2f} {row['unit']} ({row['compare_to']}; {row['ratio']:.2f}x) {row['note']}")
