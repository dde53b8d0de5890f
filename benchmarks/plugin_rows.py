"""What the ``bench_*.py`` plugins share: the row dict ``bench.py`` reads, and printing rows
when a plugin runs on its own (``python3 benchmarks/bench_X.py [--quick]``)."""
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional


def row(name: str, value: float, unit: str, compare_to: str = "", ratio: Optional[float] = None,
        target: Optional[str] = None, passed: Optional[bool] = None, note: str = "") -> Dict[str, Any]:
    """One result: ``target``/``passed`` set only where the plugin has a target (else "info")."""
    return {"name": name, "value": value, "unit": unit, "compare_to": compare_to, "ratio": ratio,
            "target": target, "passed": passed, "note": note}


def print_rows(run: Callable[[bool, str], List[Dict[str, Any]]]) -> None:
    """Run a plugin in a fresh work directory (``--quick`` from the command line) and print its rows."""
    with tempfile.TemporaryDirectory() as work:
        for r in run("--quick" in sys.argv, work):
            verdict = "" if r["passed"] is None else (" PASS" if r["passed"] else " FAIL")
            ratio = "" if r["ratio"] is None else f"  {r['ratio']:.2f}× {r['compare_to']}"
            target = "" if r["target"] is None else f" (target {r['target']})"
            print(f"{r['name']:<55} {r['value']:>9.2f} {r['unit']}{ratio}{target}{verdict}  {r['note']}")
