"""``MemoryStore``: sessions in a dict of this process, for tests and throwaway bots."""
import threading
from typing import Dict, Iterator, Optional, Tuple

from .base import Store

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Records in a dict; lost when the process ends.

    It keeps serialized records, not live objects, so a handler can never change
    stored state after its lock is gone, and values behave exactly as in the
    persistent stores (what does not survive JSON fails here too).
    """

    def __init__(self) -> None:
        self._records: Dict[str, bytes] = {}
        self._mutex = threading.Lock()
        self.location = ("memory", id(self))

    def load(self, key: str) -> Optional[bytes]:
        return self._records.get(key)

    def save(self, key: str, record: bytes, *, previous: Optional[bytes] = None,
             ttl: Optional[float] = None) -> None:
        self._records[key] = record

    def delete(self, key: str, *, previous: Optional[bytes] = None) -> None:
        self._records.pop(key, None)

    def keys(self, prefix: str = "") -> Iterator[str]:
        with self._mutex:
            return iter([k for k in list(self._records) if k.startswith(prefix)])

    def records(self, prefix: str = "") -> Iterator[Tuple[str, bytes]]:
        with self._mutex:
            return iter([(k, r) for k, r in list(self._records.items()) if k.startswith(prefix)])

    def describe(self, key: str) -> str:
        return f"memory store record {key!r}"

    def __repr__(self) -> str:
        return "MemoryStore()"
