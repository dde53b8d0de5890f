"""Files written in full or not at all: a temporary file in the same directory replaces the target."""
import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator

__all__ = ["atomic_file"]


@contextmanager
def atomic_file(path: str, *, fsync: bool = True) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temporary file (mode 0600), flushed to disk (``fsync``) and
    renamed over ``path`` when the block ends; removed instead if the block raises."""
    target = os.path.abspath(path)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                    dir=os.path.dirname(target))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, target) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
