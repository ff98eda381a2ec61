"""A process pool that knows which task each worker process is running.

A worker can be killed by a signal while it scans: SIGBUS when an image file it has mapped is
truncated on the datastore during the scan (a snapshot deleted or rewritten), SIGKILL from the
out-of-memory killer. ``concurrent.futures.ProcessPoolExecutor`` cannot say which task a dead
worker ran: it fails every pending task with ``BrokenProcessPool`` and cannot run anything
after. Here each worker runs one task at a time over its own pipe, so a death fails only the
task that worker was running (:class:`WorkerDied`), the worker is replaced, and the other
tasks go on.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any


class WorkerDied(Exception):
    """The worker process running a task ended before answering: ``exitcode`` as
    ``multiprocessing`` gives it (``-N``: killed by signal N)."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(exitcode)
        self.exitcode = exitcode

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed the worker (``SIGBUS``), or None."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    def __str__(self) -> str:
        if self.signal:
            return f"killed by {self.signal}"
        return f"exited with status {self.exitcode}"


class RemoteTraceback(Exception):
    """The traceback, in the worker, of an exception a task raised (set as its cause)."""

    def __str__(self) -> str:
        return str(self.args[0])


PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when its parent thread ends


def _die_with(driver: int) -> None:
    """End this worker when the driver process ``driver`` dies, even by SIGKILL (Linux): an
    orphan would go on scanning, holding what it inherited by fork, the state database's run
    lock among it, so that the next run waits for it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != driver:  # died before the request was made
        os._exit(1)


def _serve(
    conn: Connection, driver: int, initializer: Callable[..., None], initargs: tuple
) -> None:
    """A worker's loop: run each (function, arguments) received, send back (True, result) or
    (False, exception, traceback text); end on None or when the driver is gone."""
    _die_with(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    initializer(*initargs)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args = job
        try:
            reply: tuple = (True, fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the driver
            reply = (False, exc, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - a result or exception that does not pickle
            conn.send((False, RuntimeError(f"cannot send the result back: {exc!r}"),
                       traceback.format_exc()))  # fmt: skip


class _Worker:
    def __init__(self, ctx: Any, initializer: Callable[..., None], initargs: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(child, os.getpid(), initializer, initargs), daemon=True
        )
        self.proc.start()
        child.close()  # the worker's end lives in the worker only: its death is EOF here
        self.task: Future | None = None

    def close(self, kill: bool = False) -> None:
        if kill and self.proc.is_alive():
            self.proc.kill()
        self.conn.close()
        self.proc.join()


class Pool:
    """``size`` worker processes, started as work comes (each runs ``initializer(*initargs)``
    once). ``submit`` queues a task; ``wait`` blocks until at least one running task ends."""

    def __init__(self, size: int, initializer: Callable[..., None], initargs: tuple) -> None:
        self.size = size
        self.init = (initializer, initargs)
        self.ctx = multiprocessing.get_context()
        self.idle: list[_Worker] = []
        self.busy: list[_Worker] = []
        self.backlog: deque[tuple[Future, Callable[..., Any], tuple]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self.backlog.append((fut, fn, args))
        self._dispatch()
        return fut

    def _dispatch(self) -> None:
        while self.backlog and (self.idle or len(self.busy) < self.size):
            w = self.idle.pop() if self.idle else _Worker(self.ctx, *self.init)
            fut, fn, args = self.backlog[0]
            try:
                w.conn.send((fn, args))
            except OSError:  # died while idle (the OOM killer may pick any process)
                w.close(kill=True)
                continue
            self.backlog.popleft()
            w.task = fut
            self.busy.append(w)

    def wait(self) -> None:
        """Block until at least one running task has ended, and settle its future: its result,
        its exception (cause: the worker's traceback), or WorkerDied. Dead workers are
        replaced as the queued tasks need them."""
        if not self.busy:
            return
        ready = set(wait([x for w in self.busy for x in (w.conn, w.proc.sentinel)]))
        for w in [w for w in self.busy if w.conn in ready or w.proc.sentinel in ready]:
            fut, w.task = w.task, None
            assert fut is not None
            self.busy.remove(w)
            try:
                if not w.conn.poll():
                    raise EOFError  # the process ended with nothing sent
                reply = w.conn.recv()
            except (EOFError, OSError):
                w.close(kill=True)
                fut.set_exception(WorkerDied(w.proc.exitcode))
                continue
            self.idle.append(w)
            if reply[0]:
                fut.set_result(reply[1])
            else:
                reply[1].__cause__ = RemoteTraceback(reply[2])
                fut.set_exception(reply[1])
        self._dispatch()

    def shutdown(self) -> None:
        """Stop every worker: idle ones are told to end, running ones are killed."""
        for w in self.idle:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.close()
        for w in self.busy:
            w.close(kill=True)
        self.idle, self.busy = [], []
