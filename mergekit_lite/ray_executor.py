"""The Ray executor: the same jobs as the local executor, spread over the workers of a Ray cluster.

The driver keeps the plan, the statistics and the atomic commit of the output folder; a worker
re-plans the recipe from the checkpoints' headers where it runs (reading inputs from where they
are: a shared file system path or the hub cache), runs the same per-job function as the local
executor (``execute.compute_tensor``) on a share of the output tensors, and writes them straight
into the output shards at their reserved offsets (``writer.write_at``). Model-wide statistics
(TIES thresholds, RAM+ counts) are reduced from the workers' partial states. A worker that dies
has its share re-run elsewhere (Ray's task retries); any failure leaves nothing committed.

Products call this through a small duck-typed interface (``passes``, ``run``, ``map``) and never
import it; the functions the workers run are named by the caller, so imports still go one way.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import MergeKitLiteError
from .execute import TaskVectorPasses, resolve_device
from .plan import Plan, plan as make_plan
from .progress import progress_bar
from .recipe import Recipe

INSTALL_HINT = "--executor ray needs Ray: pip install 'mergekit-lite[ray]'"
#: how many times Ray re-runs a share whose worker died (a crashed process, a lost node)
MAX_RETRIES = 3
#: shares per worker CPU: small enough to balance uneven tensors, large enough to amortise a task's start
SHARES_PER_CPU = 4
#: test-only: a JSON file {"tensor": NAME, "marker": PATH}; the first worker to run NAME creates PATH and
#: dies (os._exit) after writing the tensors before it in its share, so that Ray re-runs the share elsewhere
FAULT_ENV = "MERGEKIT_LITE_RAY_FAULT"


def import_ray() -> Any:
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MergeKitLiteError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild the driver's plan: the recipe, where relative paths start, the device,
    the model-wide statistics, and a key under which a worker keeps its plan between shares."""

    recipe: Recipe
    cwd: str
    device: str
    statistics: dict[str, Any]
    key: str
    #: the driver's torch threads: some kernels (LAPACK's SVD for TSV-C) give other last bits with another thread count
    threads: int = 1


_PLANS: dict[str, Plan] = {}


def worker_plan(spec: WorkerSpec) -> Plan:
    """The plan of ``spec``'s recipe in this worker process, built once per run and kept for its later shares."""
    cached = _PLANS.get(spec.key)
    if cached is None:
        if os.path.isdir(spec.cwd) and os.getcwd() != spec.cwd:
            os.chdir(spec.cwd)  # the recipe's relative paths, and an evaluator module, are found from the driver's folder
        for old in list(_PLANS):  # one run at a time per worker: close the checkpoints of earlier runs
            _PLANS.pop(old).close()
        cached = _PLANS[spec.key] = make_plan(spec.recipe)
    cached.model_statistics = spec.statistics
    return cached


@dataclass(frozen=True)
class ShareLog:
    """Where and how long one share ran (for the progress of a run and the benchmark's per-worker throughput)."""

    pid: int
    host: str
    seconds: float
    tensors: int
    nbytes: int = 0  # the share's input bytes (filled in by the driver)
    names: tuple[str, ...] = ()  # the share's tensors (filled in by the driver)


def run_share(spec: WorkerSpec, part: Callable[..., Any], names: Sequence[str], args: tuple[Any, ...]) -> tuple[ShareLog, Any]:
    """On a worker: ``part(plan, device, names, *args)`` on this worker's plan, with where and how long it ran."""
    start = time.perf_counter()
    if torch.get_num_threads() != spec.threads:  # Ray starts workers with one thread; the same bytes need the driver's count
        torch.set_num_threads(spec.threads)
    plan = worker_plan(spec)
    device = resolve_device(spec.device)
    _fault_hook(plan, device, part, names, args)
    result = part(plan, device, names, *args)
    return ShareLog(os.getpid(), socket.gethostname(), time.perf_counter() - start, len(names)), result


def _fault_hook(plan: Plan, device: torch.device, part: Callable[..., Any], names: Sequence[str], args: tuple[Any, ...]) -> None:
    """Test-only (``FAULT_ENV``): die once, mid-share, on the named tensor."""
    control = os.environ.get(FAULT_ENV)
    if not control or not os.path.isfile(control):
        return
    fault = json.loads(Path(control).read_text())
    if fault["tensor"] not in names:
        return
    try:
        fd = os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first attempt dies
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    part(plan, device, list(names[: list(names).index(fault["tensor"])]), *args)
    os._exit(17)


def split_shares(names: Sequence[str], sizes: Sequence[int], count: int) -> list[list[str]]:
    """``names`` in order, cut into at most ``count`` consecutive shares of about equal total size."""
    total = sum(sizes)
    count = max(1, min(count, len(names)))
    shares: list[list[str]] = [[]]
    target = total / count
    done = 0
    for name, size in zip(names, sizes):
        if shares[-1] and done >= target * len(shares) and len(shares) < count:
            shares.append([])
        shares[-1].append(name)
        done += size
    return [s for s in shares if s]


class RayTaskVectorPasses(TaskVectorPasses):
    """Statistics passes whose reductions run on the workers, each over a share of the merged tensors."""

    def __init__(self, executor: "RayExecutor", plan: Plan, device: torch.device, progress: bool):
        super().__init__(plan, device, progress)
        self.executor = executor

    def reduce(self, description: str, part: Callable[..., Any], merge: Callable[[list[Any]], Any], *args: Any) -> Any:
        """``part`` over each worker's share, results merged in share order (the same answer as one pass)."""
        names = [job.name for job in self.jobs]
        if not names:  # nothing merged: the reduction of nothing, here
            return part(self, description, *args)
        sizes = [sum(self.plan.info(r).nbytes for r in job.reads) for job in self.jobs]
        results = self.executor.run(self.plan, self.device, statistics_share, names, sizes, (part, description, args),
                                    description=description, progress=self.progress)
        return merge(results)


def statistics_share(plan: Plan, device: torch.device, names: Sequence[str], part: Callable[..., Any], description: str, args: tuple[Any, ...]) -> Any:
    """On a worker: one statistics reduction over its share of the merged tensors."""
    return part(TaskVectorPasses(plan, device, progress=False).only(names), description, *args)


class RayExecutor:
    """Runs a plan's jobs as Ray tasks; without an address it starts a local Ray instance, with one it joins that cluster."""

    name = "ray"

    def __init__(self, address: str | None = None, *, max_retries: int = MAX_RETRIES, num_cpus: int | None = None):
        self.address = address
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self._ray: Any = None
        self._started = False
        self._key = uuid.uuid4().hex[:8]
        #: every share run so far: which worker process, how long, how many tensors and input bytes
        self.log: list[ShareLog] = []

    # -- connection ---------------------------------------------------------------------------
    def start(self) -> Any:
        """Connect to Ray (once); an already initialised Ray (a test's, a notebook's) is used as it is."""
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        if not ray.is_initialized():
            package_root = str(Path(__file__).resolve().parent.parent)
            if self.address is None:  # local workers are started from this process: they import this copy of the package
                paths = [package_root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
                os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
                runtime_env: dict[str, Any] = {}
            else:  # a cluster's workers get this copy of the package shipped with the job
                runtime_env = {"py_modules": [str(Path(__file__).resolve().parent)]}
            try:
                # "local": a new instance of our own, never a cluster someone else started on this machine
                ray.init(address=self.address or "local", num_cpus=self.num_cpus if self.address is None else None, include_dashboard=False,
                         log_to_driver=False, runtime_env=runtime_env or None, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise MergeKitLiteError(f"--executor ray: cannot start or join {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            self._started = True
        self._ray = ray
        self._remote = ray.remote(run_share)
        return ray

    def shutdown(self) -> None:
        """Disconnect from Ray if this executor connected: a local instance it started stops, a joined cluster keeps
        running; a Ray the caller initialised is left as it is."""
        if self._started and self._ray is not None:
            self._ray.shutdown()
        self._ray, self._started = None, False

    def __enter__(self) -> "RayExecutor":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def cpus(self) -> int:
        return max(1, int(self.start().cluster_resources().get("CPU", 1)))

    # -- the interface the products use ------------------------------------------------------
    def spec(self, plan: Plan, device: torch.device | str) -> WorkerSpec:
        """What the workers need for ``plan``; its key names this plan (workers keep one plan per key)."""
        key = getattr(plan, "_ray_key", None)
        if key is None:
            key = f"{self._key}-{uuid.uuid4().hex}"
            setattr(plan, "_ray_key", key)
        where = "cuda" if torch.device(device).type == "cuda" else str(device)  # a worker sees only the GPU Ray gave its task
        return WorkerSpec(plan.recipe, os.getcwd(), where, dict(plan.model_statistics), key, torch.get_num_threads())

    def passes(self, plan: Plan, device: torch.device, progress: bool) -> TaskVectorPasses:
        """Statistics passes for ``plan``, reduced over the workers."""
        self.start()
        return RayTaskVectorPasses(self, plan, device, progress)

    def run(
        self,
        plan: Plan,
        device: torch.device | str,
        part: Callable[..., Any],
        names: Sequence[str],
        sizes: Sequence[int],
        args: tuple[Any, ...] = (),
        *,
        description: str = "merging",
        progress: bool = True,
        on_done: Callable[[list[str], Any], None] | None = None,
    ) -> list[Any]:
        """``part(plan, device, share, *args)`` on the workers, one Ray task per share of ``names``; the
        results in share order. ``on_done(share, result)`` runs on the driver as each share finishes."""
        ray = self.start()
        shares = split_shares(list(names), list(sizes), SHARES_PER_CPU * self.cpus)
        spec, shared_args = ray.put(self.spec(plan, device)), ray.put(args)  # stored once, not once per share
        call = self._call(device)
        by_ref = {}
        for share in shares:
            by_ref[call.remote(spec, part, share, shared_args)] = share
        size_of = dict(zip(names, sizes))
        results: dict[int, Any] = {}
        order = {id(share): i for i, share in enumerate(shares)}
        pending = list(by_ref)
        try:
            with progress_bar(sum(sizes), f"{description} (ray, {len(shares)} shares)", progress) as bar:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    ref = ready[0]
                    share = by_ref[ref]
                    share_log, result = self._get(ray, ref, share)
                    self.log.append(dataclasses.replace(share_log, nbytes=sum(size_of[n] for n in share), names=tuple(share)))
                    results[order[id(share)]] = result
                    if on_done is not None:
                        on_done(share, result)
                    bar.update(sum(size_of[n] for n in share))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return [results[i] for i in range(len(shares))]

    def map(self, plan: Plan, device: torch.device | str, part: Callable[..., Any], items: Sequence[Any], args: tuple[Any, ...] = (),
            *, description: str = "λ search", progress: bool = True) -> list[Any]:
        """``part(plan, device, [item], *args)`` for each item as its own Ray task (λ candidates); results in item order."""
        ray = self.start()
        spec = ray.put(self.spec(plan, device))
        call = self._call(device)
        refs = [call.remote(spec, part, [item], args) for item in items]
        try:
            with progress_bar(len(refs), f"{description} (ray)", progress, unit="eval") as bar:
                out = []
                for ref, item in zip(refs, items):
                    share_log, result = self._get(ray, ref, [str(item)])
                    self.log.append(share_log)
                    out.append(result)
                    bar.update(1)
                return out
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def _call(self, device: torch.device | str) -> Any:
        """The remote function with this run's options: Ray's retries, and one GPU per task for a CUDA device."""
        gpus = 1 if torch.device(device).type == "cuda" else 0
        return self._remote.options(max_retries=self.max_retries, retry_exceptions=False, num_gpus=gpus)

    def _get(self, ray: Any, ref: Any, share: Sequence[Any]) -> Any:
        """A task's result; its failure as one line (our own errors keep their type and message)."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MergeKitLiteError):
                raise type(cause)(f"{cause} (on a Ray worker)") from None
            if isinstance(cause, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            what = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc).splitlines()[0]
            raise MergeKitLiteError(f"a Ray worker failed on tensor(s) {_names(share)}: {what}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as exc:
            raise MergeKitLiteError(f"Ray workers died {self.max_retries + 1} times running tensor(s) {_names(share)} "
                                    f"({type(exc).__name__}); nothing was written") from None
        except ray.exceptions.TaskCancelledError:
            raise KeyboardInterrupt from None


def _names(share: Sequence[Any]) -> str:
    shown = ", ".join(str(n) for n in share[:3])
    return shown + (f" and {len(share) - 3} more" if len(share) > 3 else "")


def make_executor(name: str, address: str | None = None) -> RayExecutor | None:
    """The executor named on the command line or in the API: None for local, a RayExecutor for ray."""
    if name == "local":
        if address is not None:
            raise MergeKitLiteError("--ray-address needs --executor ray")
        return None
    if name == "ray":
        import_ray()
        return RayExecutor(address)
    raise MergeKitLiteError(f"--executor: {name!r} is not an executor; use local or ray")


__all__ = ["INSTALL_HINT", "RayExecutor", "make_executor", "split_shares"]
