"""Knowing when a bot is idle: which updates it was handed and which handler tasks still run.

``FakeBotAPI.run_bot`` installs an ``IdleTracker`` on the bot it starts, and
``FakeBotAPI.wait_until_idle`` waits until the tracker reports nothing in flight.

How it works.  telebot hands each fetched batch to ``bot.process_new_updates`` (in
the polling thread), which queues every handler, class-middleware chain and
next-step handler through ``bot._exec_task(task, *args)``; with ``threaded=True``
that puts the task on the worker pool, otherwise it runs it at once.  The tracker
replaces both attributes on the bot object with thin wrappers:

- ``process_new_updates`` counts the batches being dispatched and reports the
  ``update_id`` of each update once the call returned (its tasks are queued by then);
- ``_exec_task`` counts a task as started when it is queued and as finished when it
  returns or raises, by handing telebot a wrapper of the task.  That wrapper copies the
  task's attributes (``__dict__``, so markers such as ``_telesession_guard`` stay
  visible) and sets ``__wrapped__``, and the arguments are passed unchanged, so another
  wrapper of ``_exec_task`` -- the per-key scheduler that ``sessions.setup(bot)``
  installs -- still sees the same task and message.

It composes with such a wrapper in either order.  Installed after ``setup(bot)``
(the usual order), the tracker is outermost and counts every task as it is
submitted, including one the scheduler holds back behind another of the same key.
Installed before, the scheduler calls the tracker's wrapper whenever it submits
work to telebot; a task it appends to a chain that is already running is run by
that chain's task, which is counted until the chain drains.  Either way the bot is
idle exactly when no batch is being dispatched and every counted task finished.
On ``close`` the tracker removes its wrappers if they are still the outermost ones,
and otherwise leaves them in place as plain pass-throughs.
"""
import threading
import time
from typing import Any, Callable, Dict, List

__all__ = ["IdleTracker", "drain"]


def drain(bot: Any, timeout: float = 60.0) -> None:
    """Wait until every task queued on a threaded ``bot``'s worker pool so far has finished.

    telebot's ``tasks.join()`` never returns (workers never call ``task_done``), so
    queue one barrier task per worker: when all of them are inside the barrier,
    every task queued before them has finished, post_process included.
    A bot made with ``threaded=False`` has no pool: its updates ran in the threads that
    dispatched them, and only updates parked behind a busy key (fed from several threads)
    can still be waiting.
    Updates parked on a busy key (``sessions.setup``) reach the pool only when the
    key frees, so repeat until the bot's scheduler has no busy key left.
    """
    deadline = time.monotonic() + timeout
    scheduling = bot.__dict__.get("_telesession")
    if not getattr(bot, "threaded", True):
        while scheduling is not None and scheduling.scheduler.busy_keys():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bot still has {scheduling.scheduler.busy_keys()} busy keys")
            time.sleep(0.005)
        return
    while True:
        workers = len(bot.worker_pool.workers)
        barrier = threading.Barrier(workers + 1, timeout=max(deadline - time.monotonic(), 0.1))
        for _ in range(workers):
            bot.worker_pool.put(barrier.wait)
        barrier.wait()
        if scheduling is None or scheduling.scheduler.busy_keys() == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the bot still has {scheduling.scheduler.busy_keys()} busy keys")


class IdleTracker:
    """Counts the batches a bot is dispatching and its handler tasks not yet finished.

    ``condition`` guards the counters and is notified on every change;
    ``on_handled(update_ids)`` is called under it when a batch was dispatched.
    """

    def __init__(self, bot: Any, condition: threading.Condition,
                 on_handled: Callable[[List[int]], None]) -> None:
        self.bot = bot
        self.tasks = 0  #: handler tasks queued or running
        self.dispatching = 0  #: ``process_new_updates`` calls in progress
        self.errors = 0  #: tasks that raised (telebot logs or re-raises them)
        self.active = True
        self._cond = condition
        self._on_handled = on_handled
        self._saved: Dict[str, Any] = {}
        self._wrappers: Dict[str, Any] = {}
        self._install("_exec_task", self._wrap_exec_task)
        self._install("process_new_updates", self._wrap_dispatch)

    @property
    def idle(self) -> bool:
        """Whether no batch is being dispatched and no counted task is queued or running."""
        return self.tasks == 0 and self.dispatching == 0

    def close(self) -> None:
        """Stop counting; restore the bot's attributes where our wrappers are still outermost."""
        self.active = False
        for name, wrapper in self._wrappers.items():
            if self.bot.__dict__.get(name) is wrapper:
                if name in self._saved:
                    setattr(self.bot, name, self._saved[name])
                else:
                    delattr(self.bot, name)  # back to the class's method

    # -- wrappers ---------------------------------------------------------------------

    def _install(self, name: str, make: Callable[[Any], Any]) -> None:
        if name in self.bot.__dict__:
            self._saved[name] = self.bot.__dict__[name]
        wrapper = make(getattr(self.bot, name))
        self._wrappers[name] = wrapper
        setattr(self.bot, name, wrapper)

    def _wrap_exec_task(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        tracker = self

        def exec_task(task: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not tracker.active or getattr(task, "_telesession_idle_tracker", None) is tracker:
                return inner(task, *args, **kwargs)
            started = [False]

            def counted(*a: Any, **kw: Any) -> Any:
                started[0] = True
                failed = True
                try:
                    result = task(*a, **kw)
                    failed = False
                    return result
                finally:
                    tracker._task_finished(failed)

            counted.__dict__.update(getattr(task, "__dict__", {}))
            counted.__wrapped__ = task  # type: ignore[attr-defined]
            counted._telesession_idle_tracker = tracker  # type: ignore[attr-defined]
            counted.__name__ = getattr(task, "__name__", "task")
            with tracker._cond:
                tracker.tasks += 1
            try:
                return inner(counted, *args, **kwargs)
            except BaseException:
                if not started[0]:  # never queued nor run: it will never finish
                    tracker._task_finished(False)
                raise

        exec_task.__wrapped__ = inner  # type: ignore[attr-defined]
        return exec_task

    def _wrap_dispatch(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        tracker = self

        def process_new_updates(updates: List[Any]) -> Any:
            if not tracker.active:
                return inner(updates)
            with tracker._cond:
                tracker.dispatching += 1
            try:
                return inner(updates)
            finally:
                ids = [u.update_id for u in updates if getattr(u, "update_id", None) is not None]
                with tracker._cond:
                    tracker.dispatching -= 1
                    tracker._on_handled(ids)
                    tracker._cond.notify_all()

        process_new_updates.__wrapped__ = inner  # type: ignore[attr-defined]
        return process_new_updates

    def _task_finished(self, failed: bool) -> None:
        with self._cond:
            self.tasks -= 1
            self.errors += failed
            self._cond.notify_all()
