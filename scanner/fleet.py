"""Fleet scans on Dask (``vmleak scan --dask ADDRESS`` or ``--dask local:N``).

The client (the ``vmleak`` process) walks the directories, reads and writes the state
database and decides what to scan, exactly as a local run; each unit of work
(``scanner.units``) is a Dask task run by a worker that sees the same paths (shared storage).
The detectors and the fingerprint key reach each worker once per run, as a worker plugin
(also given to workers that join later); tasks carry only an image spec or a layout and a
unit. What comes back is findings as a local run has them: masked, with keyed fingerprints,
full values only under ``--unmask``.

Faults: a worker killed mid-task has its tasks rerun elsewhere by Dask (a task whose workers
die ``distributed.scheduler.allowed-failures`` + 1 times becomes an input error of its
image); the scheduler gone ends the run after what came back was committed (exit 2); a
worker that cannot read a path reports that image's error like a local run.

Needs the ``dask`` extra (``pip install 'vmleak[dask]'``) on the client and every worker.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

try:
    import dask
    from distributed import Client, LocalCluster, as_completed
    from distributed.diagnostics.plugin import WorkerPlugin
    from distributed.scheduler import KilledWorker
except ImportError:  # pragma: no cover - only without the extra
    raise ValueError("--dask needs Dask: pip install 'vmleak[dask]'") from None

from scanner import runner
from scanner.engine import ScanConfig
from scanner.runner import BackendLost

DEFAULT_TIMEOUT = 30.0  # seconds to reach the scheduler and to see a first worker
LOCAL = "local:"  # --dask local:N: a LocalCluster of N worker processes on this machine
#: Dask settings of the workers ``local:N`` starts (README "Fleet scans on Dask" gives them for
#: workers started by hand). Dask's nannies set MALLOC_TRIM_THRESHOLD_ for their workers, which
#: turns off glibc's adaptive mmap threshold: every large numpy temporary is then mapped and
#: unmapped again, about 3x the CPU time of a scan (measured: benchmarks/README.md). The
#: statistical profiler (every 10 ms), the event-loop health tick (20 ms) and the system
#: monitor (500 ms) wake each worker's event loop, which then takes the GIL from the scanning
#: thread: about 10% of the workers' CPU time with the defaults.
WORKER_CONFIG: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "5s",
}
NOTE_EVERY = 2.0  # seconds between two looks at the cluster's workers for the progress bar


def _quiet_dask() -> None:
    """Silence Dask's loggers in this process: it logs tracebacks for each failed reconnection
    or lost worker, and the run's one-line errors say what matters. Its configuration gives
    some loggers (``distributed.client``) their own level, so each is set."""
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] == "distributed"]
    for name in ["distributed", *names]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


class Install(WorkerPlugin):
    """Installs one run's configuration (detectors, fingerprint key) in a worker, once."""

    def __init__(self, token: str, config: ScanConfig) -> None:
        self.token = token
        self.config = config

    def setup(self, worker: Any) -> None:
        runner.install(self.token, self.config)

    def teardown(self, worker: Any) -> None:
        runner.uninstall(self.token)


class DaskBackend:
    """Runs a scan's units on a Dask cluster (``runner.Backend``): ``address`` of a scheduler,
    or ``local:N`` for a LocalCluster of N single-threaded worker processes (listening on
    127.0.0.1 only). ``timeout``: seconds to connect and to wait for a worker."""

    def __init__(self, address: str, config: ScanConfig, timeout: float = DEFAULT_TIMEOUT) -> None:
        _quiet_dask()
        self.address = address
        self.cluster: LocalCluster | None = None
        if address.startswith(LOCAL):
            n = address[len(LOCAL) :]
            if not n.isdigit() or not 1 <= int(n) <= 256:
                raise ValueError(f"--dask {address}: want local:N with N workers, 1 to 256")
            with dask.config.set(WORKER_CONFIG):
                self.cluster = self._local(int(n))
            target: Any = self.cluster
        else:
            target = address
        try:
            self.client = Client(target, timeout=timeout)
        except (OSError, TimeoutError) as err:
            self._close_cluster()
            raise OSError(f"cannot reach the Dask scheduler at {address}: {err}") from None
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            self.close()
            raise OSError(f"the Dask scheduler at {address} has no worker") from None
        self.token = uuid.uuid4().hex
        self.plugin = f"vmleak-{self.token}"
        self.client.register_plugin(Install(self.token, config), name=self.plugin)
        self.pending = as_completed(with_results=True, raise_errors=False)
        self._noted = (-NOTE_EVERY, "")
        slots = self.slots()
        self.pieces = slots * 2 if slots > 1 else 1

    @staticmethod
    def _local(n: int) -> LocalCluster:
        return LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            # the scheduler's HTTP server (health routes; the dashboard when bokeh is there) on
            # a free loopback port: its default, 8787 on all interfaces, may be taken (a warning)
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.CRITICAL,
        )

    def slots(self) -> int:
        """Threads of the cluster's workers now."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        return sum(w.get("nthreads", 1) for w in workers.values())

    @property
    def note(self) -> str:
        """The cluster's workers, asked of the scheduler at most every NOTE_EVERY seconds."""
        now = time.monotonic()
        if now - self._noted[0] >= NOTE_EVERY:
            n = len(self.client.scheduler_info(n_workers=-1)["workers"])
            self._noted = (now, f"dask {self.address}: {n} worker(s)")
        return self._noted[1]

    def submit(self, fn: Any, args: tuple, label: str) -> Any:
        # an image's later units before other images' first: images complete (and are
        # committed) early, and their layouts leave the client soon
        fut = self.client.submit(
            fn,
            self.token,
            *args,
            key=f"{label}-{self.token[:8]}",
            pure=False,
            priority=0 if fn is runner.open_task else 1,
        )
        self.pending.add(fut)
        return fut

    def completed(self, handles: set[Any]) -> Iterator[tuple[Any, Any, BaseException | None]]:
        for fut, value in self.pending.next_batch(block=True):
            if fut.status == "finished":
                yield fut, value, None
            elif fut.status == "error":
                yield fut, None, value
            else:  # cancelled: what the client does to every future when the scheduler goes
                raise BackendLost(f"lost the Dask scheduler at {self.address}")

    def explain(self, error: BaseException) -> str | None:
        if isinstance(error, KilledWorker):
            return "the Dask workers running it died (out of memory?)"
        return None

    def close(self) -> None:
        try:
            if self.client.status == "running":
                if getattr(self, "plugin", None):
                    self.client.unregister_worker_plugin(self.plugin)
                self.client.close(timeout=5)
            else:
                self.client.close(timeout=1)
        except Exception:  # noqa: BLE001 - the scheduler may be gone; nothing is left to do
            pass
        self._close_cluster()

    def _close_cluster(self) -> None:
        if self.cluster is not None:
            self.cluster.close(timeout=10)
            self.cluster = None
