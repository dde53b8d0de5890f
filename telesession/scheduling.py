"""Per-key scheduling: the updates of one key run one at a time, in arrival order, and no worker waits.

Every key that has work in this process has a queue (a chain of jobs, as in grammY
runner's ``sequentialize``).  A job is one update's work; it may belong to several
keys (a chat-level and a user-level manager on one bot) and runs when it is first
in all of them.  A job whose key is busy is *parked* on the key's queue instead of
taking a worker thread; when the running job ends, its successor becomes *ready*.
Ready jobs of all keys wait in one FIFO queue that up to ``workers`` *runner*
tasks on the bot's worker pool take from, one job after another (no round trip
through the pool per update); on a bot without threads, the thread that freed a
key runs the jobs parked on it.  A key's queue is dropped as soon as it drains, so
memory is bounded by the work in flight, and ``max_pending`` caps what one key may
have parked.

This module knows nothing of telebot: ``telesession.middleware`` feeds it.
"""
import logging
import threading
import time
from collections import deque
from functools import partial
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

__all__ = ["KeyScheduler", "Job", "commands", "DEFAULT_MAX_PENDING"]

logger = logging.getLogger("telesession")

#: How many updates one key may have parked (waiting behind its running update) by default.
DEFAULT_MAX_PENDING = 1000

#: How long a runner may keep a pool worker before it goes to the back of the pool's queue.
KEEP_RUNNING = 0.02

#: Lock stripes: a key's queue is guarded by stripe ``hash(key) % STRIPES``, so threads working
#: on different keys (the dispatcher parking updates, workers freeing keys) rarely meet on a lock.
STRIPES = 64


class _Guard:
    """The stripes of a job with several keys, taken in index order (no deadlock), then ``multi``.

    A job of several keys is freed by predecessors under different stripes, so its
    ``waiting`` count and state also take the scheduler's ``multi`` lock (re-entrant).
    """

    __slots__ = ("locks",)

    def __init__(self, locks: List[Any]) -> None:
        self.locks = locks

    def __enter__(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        for lock in reversed(self.locks):
            lock.release()

_PENDING, _RUNNING, _DONE = 0, 1, 2
_NONE: List["Job"] = []  # no job to start (never appended to)


class Job:
    """One update's work on the queues of its keys: its tasks run one after another in one thread."""

    __slots__ = ("keys", "fn", "args", "more", "waiting", "state", "content", "owners", "pinned")

    def __init__(self, keys: Tuple[str, ...], fn: Optional[Callable[..., Any]] = None, args: Tuple[Any, ...] = (),
                 content: Any = None, owners: Any = None) -> None:
        self.keys = keys
        self.fn = fn  # its first task not yet taken is fn(*args) (no partial per update),
        self.args = args
        self.more: Optional[Deque[Callable[[], Any]]] = None  # the tasks after it, oldest first
        self.waiting = 0  # how many of its keys' queues it is not yet first in
        self.state = _PENDING
        self.content = content  # the caller's: the middleware's update,
        self.owners = owners  # and its middlewares, one per key
        #: A reservation keeps its place while its batch is still being dispatched: telebot may
        #: hand it another task (a reply callback, then the middlewares) after the first ran.
        self.pinned = False

    def __repr__(self) -> str:
        return f"<Job keys={self.keys} state={self.state} waiting={self.waiting} has_tasks={_has_tasks(self)}>"


def _has_tasks(job: Job) -> bool:
    return job.fn is not None or bool(job.more)


def _add_task(job: Job, task: Callable[[], Any]) -> None:
    """Append ``task`` to the job's tasks (in order: ``fn`` is always older than ``more``)."""
    if job.fn is None and not job.more:
        job.fn, job.args = task, ()
    elif job.more is None:
        job.more = deque((task,))
    else:
        job.more.append(task)


def _take(job: Job) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
    """The job's oldest task not yet taken (it has one), as ``(fn, args)``."""
    fn = job.fn
    if fn is not None:
        job.fn = None
        return fn, job.args
    return job.more.popleft(), ()  # type: ignore[union-attr]


class KeyScheduler:
    """Per-key queues of jobs; ``execute(fn, *args)`` hands a task to the worker pool (or runs it).

    ``inline()`` says whether ``execute`` runs its task in the calling thread (telebot's
    ``threaded=False``): then the thread that frees a key runs the jobs parked on it,
    one after another, instead of recursing.

    No lock is shared by all keys: a key's queue is guarded by one of ``STRIPES`` locks
    (by its hash), held for a few dictionary and deque operations, so the dispatching
    thread and the workers freeing other keys do not queue behind each other.
    ``workers`` bounds the runner tasks on the pool at once (the pool's size).
    """

    def __init__(self, execute: Callable[..., Any], inline: Callable[[], bool],
                 max_pending: int = DEFAULT_MAX_PENDING, workers: int = 1) -> None:
        if max_pending < 0:
            raise ValueError("max_pending must be >= 0")
        self._execute = execute
        self._inline = inline
        self.max_pending = max_pending
        self._stripes = tuple(threading.Lock() for _ in range(STRIPES))
        self._multi = threading.RLock()
        self._queues: Dict[str, Deque[Job]] = {}
        self._local = threading.local()
        #: Threaded bots: jobs that may run now, oldest first, taken by up to ``workers`` runner tasks.
        self._ready: Deque[Job] = deque()
        self._runners = 0
        self._runners_lock = threading.Lock()
        self.workers = workers

    def _guard(self, keys: Tuple[str, ...]) -> Any:
        """What guards the queues of ``keys`` and the state of a job of exactly these keys."""
        stripes = self._stripes
        if len(keys) == 1:
            return stripes[hash(keys[0]) % STRIPES]
        indexes = sorted({hash(k) % STRIPES for k in keys})
        return _Guard([stripes[i] for i in indexes] + [self._multi])

    # -- queries --------------------------------------------------------------------

    def busy_keys(self) -> int:
        """Keys with a running or parked job (0 when the bot is idle)."""
        return len(self._queues)

    def backlog(self, key: str) -> int:
        """Jobs queued on ``key``, the running one included."""
        queue = self._queues.get(key)
        return 0 if queue is None else len(queue)

    def held_here(self, keys: Sequence[str]) -> bool:
        """Whether this thread is running a job of one of ``keys`` (a re-entrant dispatch)."""
        held = self._local.__dict__.get("held")
        if not held:
            return False
        return any(k in running.keys for running in held for k in keys)

    def current(self) -> Optional[Job]:
        """The job this thread is running (the innermost), if any."""
        held = self._local.__dict__.get("held")
        return held[-1] if held else None

    # -- the queue ------------------------------------------------------------------

    def reserve(self, keys: Tuple[str, ...], content: Any = None, owners: Any = None) -> Optional[Job]:
        """A place in the queues of ``keys`` for an update whose tasks come later; ``None`` if a backlog is full."""
        job = Job(keys, content=content, owners=owners)
        job.pinned = True
        with self._guard(keys):
            if not self._enqueue(job):
                return None
        return job

    def run_inline(self, keys: Tuple[str], task: Callable[..., Any], args: Tuple[Any, ...], content: Any = None,
                   owners: Any = None) -> bool:
        """A bot without threads: run ``task(*args)`` for the one key of ``keys`` here and now if
        the key is free and this thread runs no job; ``False`` (nothing done) otherwise, for ``submit``.

        ``submit`` of a new job of one free key does the same in more steps.
        """
        local = self._local.__dict__
        if local.get("held") or local.get("todo") is not None:
            return False
        key = keys[0]
        job = Job(keys, None, (), content, owners)
        job.state = _RUNNING
        stripe = self._stripes[hash(key) % STRIPES]
        queues = self._queues
        with stripe:
            if key in queues:
                return False
            queues[key] = deque((job,))
        held = local.get("held")
        if held is None:
            held = self._local.held = []
        held.append(job)
        todo: Deque[Job] = deque()  # jobs the task frees (a nested dispatch): run after it, as _drain does
        self._local.todo = todo
        try:
            self._execute(task, *args)
        finally:
            held.pop()
            self._local.todo = None
            with stripe:
                job.state = _DONE
                queue = queues[key]
                if len(queue) == 1:
                    del queues[key]
                    ready = _NONE
                else:
                    ready = self._remove(job)  # updates other threads parked meanwhile
            for successor in (*todo, *ready):
                self._start(successor, own=False)
        return True

    def submit(self, job: Optional[Job], keys: Tuple[str, ...], task: Callable[..., Any],
               content: Any = None, owners: Any = None, args: Tuple[Any, ...] = ()) -> bool:
        """Run ``task(*args)`` as part of ``job`` (a reservation) or of a new job of ``keys``.

        It runs now if the job is first in all its queues, else when it gets there.
        ``False`` (and ``task`` dropped) when a key already has ``max_pending`` parked.
        """
        if job is None or job.state == _DONE:
            return not self.submit_jobs([Job(keys, task, args, content, owners)])
        with self._guard(job.keys):
            if job.state == _DONE:  # it ended meanwhile: the task is a new job's
                job = None
            else:
                _add_task(job, partial(task, *args) if args else task)
                start = job.state == _PENDING and job.waiting == 0
                if start:
                    job.state = _RUNNING
        if job is None:
            return self.submit(None, keys, task, content, owners, args)
        if start:
            self._start(job, own=True)
        return True

    def submit_jobs(self, jobs: Sequence[Job]) -> List[Job]:
        """Queue new jobs (made with their first task), in order; those dropped (a backlog was full).

        Every job takes its place before any is started, so the workers never meet the
        dispatcher halfway through a batch.  A free key costs one uncontended stripe lock.
        """
        started: List[Job] = []
        dropped: List[Job] = []
        stripes, queues, limit = self._stripes, self._queues, self.max_pending
        for job in jobs:
            keys = job.keys
            if len(keys) == 1:  # the common case
                key = keys[0]
                with stripes[hash(key) % STRIPES]:
                    queue = queues.get(key)
                    if queue is None:
                        queues[key] = deque((job,))
                        job.state = _RUNNING
                        started.append(job)
                    elif len(queue) > limit:
                        dropped.append(job)
                    else:
                        queue.append(job)
                        job.waiting = 1
                continue
            with self._guard(keys):
                if not self._enqueue(job):
                    dropped.append(job)
                elif job.waiting == 0:
                    job.state = _RUNNING
                    started.append(job)
        if started:
            self._start_all(started)
        return dropped

    def cancel(self, job: Job) -> None:
        """End a reservation: its batch is dispatched.  One that got no task (telebot dropped the
        update), or whose tasks all ran, leaves its queues and later jobs move up."""
        with self._guard(job.keys):
            job.pinned = False
            if job.state != _PENDING or _has_tasks(job):
                return
            job.state = _DONE
            ready = self._remove(job)
        for successor in ready:
            self._start(successor, own=False)

    def _enqueue(self, job: Job) -> bool:
        queues = self._queues
        for key in job.keys:
            queue = queues.get(key)
            if queue is not None and len(queue) > self.max_pending:
                return False
        waiting = 0
        for key in job.keys:
            queue = queues.get(key)
            if queue is None:
                queues[key] = deque((job,))
            else:
                queue.append(job)
                waiting += 1
        job.waiting = waiting
        return True

    def _remove(self, job: Job) -> List[Job]:
        """Take ``job`` off its queues (its guard held); the jobs that may run now."""
        ready = []
        for key in job.keys:
            queue = self._queues[key]
            first = queue[0] is job
            if first:
                queue.popleft()
            else:
                queue.remove(job)
            if not queue:
                del self._queues[key]
            elif first:
                successor = queue[0]
                if len(successor.keys) == 1:
                    successor.waiting -= 1
                    if successor.waiting == 0 and successor.state == _PENDING and (
                            successor.fn is not None or successor.more):
                        successor.state = _RUNNING
                        ready.append(successor)
                else:
                    with self._multi:  # its other keys' stripes are not ours
                        successor.waiting -= 1
                        if successor.waiting == 0 and successor.state == _PENDING and (
                            successor.fn is not None or successor.more):
                            successor.state = _RUNNING
                            ready.append(successor)
        return ready

    # -- running --------------------------------------------------------------------

    def _start(self, job: Job, own: bool) -> None:
        if not self._inline():
            self._ready.append(job)
            self._wake(1)
            return
        todo = getattr(self._local, "todo", None)
        if not own and todo is not None:
            todo.append(job)  # the loop in _drain below runs it when the current job is done
            return
        self._drain(job, own)

    def _start_all(self, jobs: List[Job]) -> None:
        """``_start`` of several jobs: on a threaded bot, one lock for all of them."""
        if len(jobs) == 1 or self._inline():
            for job in jobs:
                self._start(job, own=True)
            return
        self._ready.extend(jobs)
        self._wake(len(jobs))

    def _wake(self, wanted: int) -> None:
        """Put up to ``wanted`` more runners on the worker pool, as long as fewer than ``workers`` are."""
        with self._runners_lock:
            count = min(wanted, self.workers - self._runners)
            if count <= 0:
                return
            self._runners += count
        for started in range(count):
            try:
                self._execute(self._runner)
            except BaseException:  # the pool refused it: no runner is counted that does not exist
                with self._runners_lock:
                    self._runners -= count - started
                raise

    def _runner(self) -> None:
        """A worker pool task: run ready jobs one after another until none is left.

        Ready jobs of all keys wait in one FIFO queue, so a key with a backlog gets one turn
        per round, like every other key.  After ``KEEP_RUNNING`` seconds a runner with work left goes to the back of
        the pool's queue, so the bot's other tasks (handlers without sessions, listeners)
        get their turn.  A job that raises ends its runner with that exception, as
        telebot's worker expects of a task; another runner takes over the queue.
        """
        ready, run = self._ready, self._run
        deadline = time.monotonic() + KEEP_RUNNING
        while True:
            try:
                job = ready.popleft()
            except IndexError:
                with self._runners_lock:  # (_wake counts under this lock: no job is left behind)
                    if not ready:
                        self._runners -= 1
                        return
                continue
            try:
                run(job)
            except BaseException:
                with self._runners_lock:
                    self._runners -= 1
                if ready:
                    self._wake(1)
                raise
            if ready and time.monotonic() > deadline:
                try:
                    self._execute(self._runner)  # this runner, to the back of the pool's queue
                except BaseException:
                    with self._runners_lock:
                        self._runners -= 1
                    raise
                return

    def _drain(self, first: Job, own: bool) -> None:
        """Run ``first`` here, then every job it frees, in a loop (no recursion)."""
        saved = getattr(self._local, "todo", None)
        todo: Deque[Job] = deque()
        self._local.todo = todo
        error: Optional[BaseException] = None
        try:
            job: Optional[Job] = first
            while job is not None:
                try:
                    self._execute(self._run_here, job)
                except BaseException as exc:  # SystemExit too: the jobs it freed must still run
                    if (job is first and own) or not isinstance(exc, Exception):
                        if error is None:
                            error = exc  # the caller's own update: its exception goes where telebot sends it
                    else:
                        logger.error("an update of key %r, run for another thread that had parked it, "
                                     "raised %s: %s", job.keys[0], type(exc).__name__, exc, exc_info=exc)
                job = todo.popleft() if todo else None
        finally:
            self._local.todo = saved
        if error is not None:
            raise error

    def _run(self, job: Job) -> None:
        """Run the job's next task in a runner, free its keys, queue the jobs that may run now."""
        held = self._local.__dict__.get("held")
        if held is None:
            held = self._local.held = []
        held.append(job)
        error: Optional[BaseException] = None
        try:
            fn, args = job.fn, job.args  # a started job has a task, and only its runner takes them
            if fn is not None:
                job.fn = None
            else:
                fn, args = job.more.popleft(), ()  # type: ignore[union-attr]
            fn(*args)
        except BaseException as exc:
            error = exc
        finally:
            held.pop()
        with self._guard(job.keys):
            if job.fn is not None or job.more:  # more tasks came for the same update: it keeps its place
                ready = [job]
            elif job.pinned:  # its batch may still hand it a task: it keeps its place, idle
                job.state = _PENDING
                ready = _NONE
            else:
                job.state = _DONE
                ready = self._remove(job)
        if len(ready) == 1:
            self._ready.append(ready[0])  # this runner (or another) takes it next
        elif ready:
            self._start_all(ready)
        if error is not None:
            raise error

    def _held(self) -> List[Job]:
        held = self._local.__dict__.get("held")
        if held is None:
            held = self._local.held = []
        return held

    def _run_here(self, job: Job) -> None:
        """``_run`` for a bot without threads: every task of the job here, then its successors."""
        held = self._held()
        held.append(job)
        error: Optional[BaseException] = None
        ready: List[Job] = []
        task, args = _take(job)
        try:
            while True:
                try:
                    task(*args)
                except BaseException as exc:  # finish the job first; then let telebot see it
                    if error is None:
                        error = exc
                with self._guard(job.keys):
                    if not _has_tasks(job):
                        if job.pinned:  # its batch may still hand it a task: it keeps its place, idle
                            job.state = _PENDING
                        else:
                            job.state = _DONE
                            ready = self._remove(job)
                        break
                    task, args = _take(job)
        finally:
            held.pop()
            for successor in ready:
                self._start(successor, own=False)
        if error is not None:
            raise error


def commands(*names: str) -> Callable[[Any], bool]:
    """A ``bypass`` predicate: messages with one of these commands (``"stop"`` for ``/stop``) skip the queue."""
    wanted = {n.lstrip("/").lower() for n in names}

    def is_command(update: Any) -> bool:
        text = getattr(update, "text", None)
        if not isinstance(text, str) or not text.startswith("/"):
            return False
        word = text[1:].split(maxsplit=1)[0] if len(text) > 1 else ""
        return word.split("@", 1)[0].lower() in wanted

    is_command.__name__ = f"commands{tuple(sorted(wanted))!r}"
    return is_command
