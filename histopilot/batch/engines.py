"""Where a cohort's items run: a process pool on this machine, or Ray Data on a cluster.

Both engines take the same items and the same :class:`~histopilot.batch.tasks.CohortWorker`
and hand every :class:`~histopilot.batch.tasks.Outcome` to one callback in the driver, as it
arrives; neither writes anything itself.

- ``local``: a pool of spawned processes, each holding its own worker (and models). At most
  one item per process is in flight. When a process dies (killed, out of memory, a reader
  crashing on a corrupt file) the pool is restarted and the items it held are tried again one
  at a time; an item that kills its process on its own is recorded as failed.
- ``ray``: Ray Data's ``map_batches`` with the worker as a stateful actor class, one item per
  batch, ``concurrency`` actors with ``num_gpus`` each. Ray restarts a dead actor and retries
  its item; results stream back to the driver in completion order.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any, Literal

from histopilot.batch.manifest import CohortItem
from histopilot.batch.tasks import BatchOptions, CohortWorker, Outcome
from histopilot.errors import ConfigError, HistopilotError
from histopilot.privacy import configure_logging

Engine = Literal["local", "ray"]
#: Retries of an item whose Ray actor died (Ray restarts the actor each time).
RAY_RETRIES = 2
ENGINES: tuple[Engine, ...] = ("local", "ray")
OnOutcome = Callable[[CohortItem, Outcome], None]
log = logging.getLogger(__name__)


def run_local(
    items: list[CohortItem], options: BatchOptions, *, workers: int, on_outcome: OnOutcome
) -> None:
    """Process ``items`` on ``workers`` processes of this machine."""
    waiting = deque(items)
    suspects: deque[CohortItem] = deque()  # held by a process that died: each retried alone
    deaths_alone = 0  # in a row: workers that die whatever they are given
    threads = max(1, (os.cpu_count() or 1) // workers)
    while waiting or suspects:
        running: dict[Future, CohortItem] = {}
        alone: CohortItem | None = None  # the suspect now running on its own
        with _pool(options, workers, threads) as pool:
            try:
                while waiting or suspects or running:
                    if suspects and not running:
                        alone = suspects.popleft()
                        running[_submit(pool, alone, suspects)] = alone
                    while not suspects and alone is None and waiting and len(running) < workers:
                        item = waiting.popleft()
                        running[_submit(pool, item, waiting)] = item
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        outcome = future.result()
                        on_outcome(running.pop(future), outcome)
                    alone, deaths_alone = None, 0
            except BrokenProcessPool:
                if alone is not None and alone in running.values():
                    on_outcome(alone, _died(alone))
                    deaths_alone += 1
                    if deaths_alone >= MAX_DEATHS_IN_A_ROW:
                        raise HistopilotError(
                            f"{deaths_alone} worker processes in a row died, each on a "
                            "different item: the workers cannot run here (see the log above for "
                            "the first error, e.g. a model that does not load or too little "
                            "memory). Finished items are kept; rerun to go on."
                        ) from None
                else:
                    suspects.extend(running.values())
                    log.warning(
                        "a worker process died; retrying its %d item(s) one at a time",
                        len(running),
                    )


#: Items in a row whose worker died on them alone before the run gives up on the workers.
MAX_DEATHS_IN_A_ROW = 3


def _submit(pool: ProcessPoolExecutor, item: CohortItem, source: deque) -> Future:
    """Submit ``item``; if the pool broke meanwhile, it goes back to ``source`` first."""
    try:
        return pool.submit(_work, item)
    except BrokenProcessPool:
        source.appendleft(item)
        raise


def _died(item: CohortItem, how: str = "on its own") -> Outcome:
    return Outcome(
        id=item.id,
        status="failed",
        seconds=0.0,
        worker="-",
        error=f"the worker process died while processing this item {how} (a crash in a "
        "reader or model, or out of memory); check the file, or give the workers more memory",
    )


def _pool(options: BatchOptions, workers: int, threads: int) -> ProcessPoolExecutor:
    # spawn, not fork: the driver may hold threads (torch, progress bars) that fork would copy
    # in an unknown state.
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_start_worker,
        initargs=(options, threads),
    )


_worker: CohortWorker | None = None


def _start_worker(options: BatchOptions, threads: int) -> None:
    global _worker
    import torch

    torch.set_num_threads(threads)  # the machine's cores shared out, as Ray does
    configure_logging()  # a spawned process starts unconfigured: its errors name items
    _worker = CohortWorker(options)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose driver was killed exits too, instead of holding its models (and GPU
    memory) as an orphan."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _work(item: CohortItem) -> Outcome:
    assert _worker is not None
    return _worker(item)


def run_ray(
    items: list[CohortItem],
    options: BatchOptions,
    *,
    workers: int | None,
    on_outcome: OnOutcome,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
) -> int:
    """Process ``items`` on ``workers`` Ray actors: on the cluster at ``address``, on the
    cluster this process is already connected to, or on a local one started here."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ConfigError("the ray engine needs Ray Data: pip install 'histopilot[ray]'") from error
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our lines report each item
    # Ray reports cluster usage to its developers unless told not to; a RAY_USAGE_STATS_ENABLED
    # the user set stands. (A cluster started with `ray start` follows its head node's setting.)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        if not workers:
            resources = ray.cluster_resources()
            if gpus_per_worker:
                workers = int(resources.get("GPU", 0) // gpus_per_worker)
                if not workers:
                    raise ConfigError(
                        f"the Ray cluster has {resources.get('GPU', 0):g} GPUs; "
                        f"--gpus-per-worker {gpus_per_worker:g} leaves no room for a worker."
                    )
            else:
                workers = int(resources.get("CPU", 1) // cpus_per_worker)
        workers = max(1, min(workers, len(items)))
        by_id = {item.id: item for item in items}
        # One block per item, so the items spread over the actors instead of queueing in
        # one block behind each other.
        dataset = ray.data.from_items(
            [{"item": item.model_dump_json()} for item in items], override_num_blocks=len(items)
        )
        # The options travel inside the class, not as constructor arguments in the object
        # store, so Ray can always rebuild an actor it restarts.
        worker_class = type("CohortActor", (_RayWorker,), {"options": pickle.dumps(options)})
        # An item whose actor dies is retried on a new actor a few times, then its block is
        # given up (every item is its own block), so one slide that crashes its reader cannot
        # hold the run forever.
        context.max_errored_blocks = len(items)
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for retries yet and warns about the generic one.
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            outcomes = dataset.map_batches(
                worker_class,
                max_task_retries=RAY_RETRIES,
                batch_size=1,
                concurrency=workers,
                num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker or None,
            )
        for row in outcomes.iter_rows():
            outcome: Outcome = pickle.loads(row["outcome"])
            on_outcome(by_id.pop(outcome.id), outcome)
        for item in by_id.values():  # never came back: their actors died every time
            on_outcome(item, _died(item, f"{RAY_RETRIES + 1} times"))
        return workers
    finally:
        if started_here:
            ray.shutdown()


class _RayWorker:
    """The worker as a Ray Data actor: built once per actor, called once per item. Subclassed
    per run with the run's pickled ``options``."""

    options: bytes

    def __init__(self) -> None:
        configure_logging()  # what an actor logs goes to the cluster's log files
        self.worker = CohortWorker(pickle.loads(self.options))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        outcomes = [self.worker(CohortItem.model_validate_json(raw)) for raw in batch["item"]]
        # Pickled: an outcome may carry a slide's embeddings, which Arrow would flatten.
        return {"outcome": [pickle.dumps(outcome) for outcome in outcomes]}


def run_engine(
    engine: Engine,
    items: Iterable[CohortItem],
    options: BatchOptions,
    *,
    workers: int | None,
    on_outcome: OnOutcome,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
) -> int:
    """Run ``items`` on ``engine``; returns how many workers it used (0: nothing to do).
    Without ``workers``: one per core here, or on Ray as many as the cluster's CPUs (or GPUs,
    with ``gpus_per_worker``) hold."""
    items = list(items)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    if engine == "local" and (address or gpus_per_worker or cpus_per_worker != 1.0):
        raise ConfigError(
            "--address, --gpus-per-worker and --cpus-per-worker are for the ray engine."
        )
    if not items:
        return 0
    if engine == "local":
        workers = min(workers or os.cpu_count() or 1, len(items))
        run_local(items, options, workers=workers, on_outcome=on_outcome)
        return workers
    return run_ray(
        items,
        options,
        workers=workers,
        on_outcome=on_outcome,
        address=address,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
    )
