"""Ray launcher: stage one as a Ray Train `TorchTrainer`; stage two's trials (each target's
fine-tune, scratch baseline and `assess`) as parallel single-process Ray tasks on the same Ray
(`launcher.stage_two: trainer`: a TorchTrainer each). The only module that imports ray.

The layer is thin on purpose: every worker rebuilds the typed config from a plain dict and
calls the same `run_stage` (or `run_trial`) the local launcher calls. Results come back through a file in the
run's directory (Train V2 keeps only metrics attached to checkpoints) and stage one's
checkpoint through `Result.checkpoint`.

Fault tolerance is Ray's: `failure.max_failures` restarts a stage's worker group after a dead
worker or node, and the restarted loop resumes from `ray.train.get_checkpoint()`. Ray Train
also restores a run's checkpoints from its storage when the same run name (the Ray run is
`<name>-<stage>` under `launcher.storage_path`) is launched again, so a stopped run resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray's own usage reporting would try to reach the internet.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train import Checkpoint, CheckpointConfig, CheckpointUploadMode, FailureConfig, ScalingConfig  # noqa: E402
from ray.train import RunConfig as RayRunConfig  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.config import ConfigError, RunConfig, config_from_dict, to_dict  # noqa: E402
from pipeline.launch.base import Trial, ray_run_name, ray_storage_path  # noqa: E402
from pipeline.inputs import stage_dir  # noqa: E402
from pipeline.launch.reaper import reap, ray_workers  # noqa: E402
from pipeline import stopping  # noqa: E402
from pipeline.stopping import StageStopped  # noqa: E402
from pipeline.fileio import read_json  # noqa: E402
from pipeline.suite import stage_kind  # noqa: E402

log = logging.getLogger(__name__)

#: Written by stage one's rank 0 when it stopped on request (SIGTERM), so the driver knows it did not finish.
STOPPED_FILE = "stopped.json"

#: Ray Train settings for the private single-node Ray this launcher starts (a user's own
#: environment wins). The controller polls its workers every 2 s by default, which costs up to
#: 2 s after the loop ends and at every restart; on loopback a poll is cheap. A single machine
#: is never preempted by a cloud, so the preemption-watcher actor (a process) is not started.
PRIVATE_CLUSTER_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


#: On Linux Ray resolves `_node_ip_address="127.0.0.1"` to the machine's address and its GCS,
#: raylet, workers and agents listen on all interfaces. With cluster mode off (what Ray does on
#: macOS and Windows) the node is 127.0.0.1 and every socket binds there; the variable must reach
#: the processes ray.init starts, and Ray reads it in this process when it resolves the node IP.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """A private single-node Ray on loopback only; this process's later `ray.init(address=...)` unaffected."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


def _init_private(cpus_needed: float) -> None:
    ray.init(
        num_cpus=max(int(cpus_needed + 0.999), os.cpu_count() or 1),
        # The dashboard serves the State API that Train V2's placement-group
        # cleaner polls (without it: a warning every few seconds); loopback only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


@ray.remote(num_cpus=0)
class _StopFlag:
    """The driver's stop request, where stage one's rank 0 can read it (the driver got the SIGTERM)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> str | None:
        return self.reason


@contextlib.contextmanager
def _forward_stop(flag: Any) -> Iterator[None]:
    """While stage one runs on Ray, pass a stop this driver was asked for (its SIGTERM handler only sets
    a variable) on to the workers' flag."""
    done = threading.Event()

    def forward() -> None:
        while not done.wait(0.2):
            reason = stopping.stop_requested()
            if reason:
                ray.get(flag.set.remote(f"{reason} to the driver"))
                return

    thread = threading.Thread(target=forward, name="transferline-stop-forwarder", daemon=True)
    thread.start()
    try:
        with stopping.listening():
            yield
    finally:
        done.set()
        thread.join(timeout=5)


class RayReporter:
    """`Reporter` on top of `ray.train.report` / `ray.train.get_checkpoint`; its `notice` reads the
    driver's stop flag (rank 0, without waiting) and Ray Train's preemption notices (every rank)."""

    #: Ray deletes each local checkpoint once it is uploaded; pruning here could delete one still uploading.
    prunes_local = False

    def __init__(self, stop_flag: Any = None, preemption_check_every: int = 0, upload: str = "sync") -> None:
        self._tmp_root: Path | None = None
        self._flag, self._pending, self._every = stop_flag, None, preemption_check_every
        self._noticed: set[str] = set()  # nodes whose preemption notice was answered with a checkpoint
        self._upload = CheckpointUploadMode.ASYNC if upload == "async" else CheckpointUploadMode.SYNC

    def notice(self, step: int) -> tuple[int, str]:
        # First, on every rank at the same steps: it is a barrier.
        preempted = None
        if self._every and step % self._every == 0:
            preempted = ray.train.get_preemption_info()
        reason = stopping.stop_requested()
        if self._flag is not None and ray.train.get_context().get_world_rank() == 0:
            if self._pending is None:
                self._pending = self._flag.get.remote()
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                self._pending = None
                reason = ray.get(ready[0]) or reason
        if reason:
            return stopping.STOP, reason
        # Ray repeats a notice at every check until the node goes: answer each preempted node once.
        if preempted is not None and not set(preempted.preempted_node_ids) <= self._noticed:
            self._noticed |= set(preempted.preempted_node_ids)
            log.warning("preemption notice for node(s) %s (ranks %s) at step %d: committing a checkpoint",
                        preempted.preempted_node_ids, preempted.preempted_ranks, step)
            return stopping.CHECKPOINT, "a preemption notice"
        return stopping.NONE, ""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        ckpt = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        # Every rank calls this the same number of times: it is a barrier in Train V2. With ASYNC it
        # returns before the upload; Ray flushes pending uploads when the loop ends.
        ray.train.report(metrics, checkpoint=ckpt, delete_local_checkpoint_after_upload=ckpt is not None,
                         checkpoint_upload_mode=self._upload)

    def resume_checkpoint(self) -> Path | None:
        ckpt = ray.train.get_checkpoint()
        return Path(ckpt.to_directory()) if ckpt is not None else None

    def checkpoint_root(self, default: Path) -> Path:
        # Ray persists reported checkpoints into its storage; the local copy is scratch.
        if self._tmp_root is None:
            self._tmp_root = Path(tempfile.mkdtemp(prefix="transferline-ckpt-"))
        return self._tmp_root


def _train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (module level: Ray pickles it by reference)."""
    from pipeline.distributed import init_from_env
    from pipeline.stages import run_stage

    from pipeline.inputs import stage_dir
    from pipeline.stopping import StageStopped
    from pipeline.fileio import write_json_atomic

    cfg = config_from_dict(loop_config["config"], command=loop_config["command"])
    ctx = init_from_env(cfg.engine.device)
    reporter = RayReporter(loop_config.get("stop_flag"), loop_config.get("preemption_check_every", 0),
                           upload=cfg.launcher.checkpoint_upload)
    try:
        run_stage(loop_config["stage"], cfg, reporter, ctx)
    except StageStopped as stop:  # every rank, at the same step, after the checkpoint was reported
        if ctx.is_main:  # returning (not raising) keeps Ray from counting it as a failure to retry
            write_json_atomic(stage_dir(cfg, loop_config["stage"]) / STOPPED_FILE,
                              {"step": stop.step, "reason": stop.reason})


def _trial_task(label: str, config: dict[str, Any], command: str) -> dict[str, Any]:
    """One stage-two trial in a Ray task: single process, the task's device (Ray sets
    CUDA_VISIBLE_DEVICES to its GPU share), `engine.threads` torch threads, else its CPUs'."""
    import torch

    from pipeline.launch.local import run_trial

    # A task's log records go nowhere by default; to stderr, Ray echoes them on the driver
    # (prefixed with the task's name), like a Train worker's.
    logger = logging.getLogger("transferline")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    cfg = config_from_dict(config, command=command)
    torch.set_num_threads(cfg.engine.threads or max(1, int(cfg.launcher.trial_cpus)))
    return run_trial(label, cfg)


class RayLauncher:
    """Starts (or joins) Ray once for the whole pipeline and runs each stage on it: stage one as a
    TorchTrainer, stage two's trials as parallel tasks (or TorchTrainers, `launcher.stage_two`).

    Ray starts on the first stage that runs, so a re-run whose stages all finished starts none.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._started = False
        self._private = False
        self._env_added: list[str] = []  # the private Ray's settings this launcher put in os.environ

    def __enter__(self) -> "RayLauncher":
        return self

    def _ensure_ray(self) -> None:
        if ray.is_initialized():
            return
        la = self.cfg.launcher
        # Inside a Ray job (`transferline submit`) RAY_ADDRESS names the job's cluster.
        address = la.address or os.environ.get("RAY_ADDRESS", "")
        self._private = not address
        # A SIGTERM stops stage one gracefully and a Ctrl-C interrupts with our message, not Ray's way.
        with stopping.keep_handlers(signal.SIGTERM, signal.SIGINT):
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                # A private single-node Ray, listening on loopback only. Ray Train propagates these
                # variables from the driver to its controller and workers.
                self._env_added = [key for key in PRIVATE_CLUSTER_ENV if key not in os.environ]
                os.environ.update({key: PRIVATE_CLUSTER_ENV[key] for key in self._env_added})
                need = (la.min_workers or la.num_workers) * la.cpus_per_worker  # elastic: the rest may never come
                with _loopback_only():
                    _init_private(need)
        self._started = True

    def __exit__(self, *exc: Any) -> None:
        if self._started:
            workers = ray_workers() if self._private else {}  # a cluster's workers are not ours
            ray.shutdown()
            for key in self._env_added:  # a later launcher in this process may join a real cluster
                os.environ.pop(key, None)
            self._env_added = []
            stragglers = reap(workers)
            if stragglers:
                log.warning("ended %d Ray worker process(es) still running after ray.shutdown(): %s",
                            len(stragglers), stragglers)

    def _use_gpu(self) -> bool:
        if self.cfg.launcher.use_gpu is not None:
            return bool(self.cfg.launcher.use_gpu)
        return ray.cluster_resources().get("GPU", 0) >= 1

    def _check_shared_storage(self, cfg: RunConfig, storage_path: str, use_gpu: bool, *, workers: int,
                              cpus: float, gpus: float, what: str = "") -> None:
        """Refuse node-local paths when `workers` processes of `cpus` (and `gpus`) each, all
        running at once, may land on more than one node (`what` names them in the error). The private
        Ray is one node for good (no autoscaler): an elastic stage's missing workers never come there."""
        if self._private:
            return
        la = cfg.launcher
        # Nodes on one machine (several raylets on one host) share its file systems: one host is one node here.
        if not spans_nodes(resources_by_host(ray.nodes()), workers, cpus, use_gpu, gpus_per_worker=gpus):
            return
        for key, path in (("launcher.storage_path", storage_path), ("output_dir", cfg.output_dir)):
            reason = storage.node_local_reason(path)
            if reason:
                hint = "" if key == "output_dir" or la.storage_path else " (empty: <output_dir>/ray)"
                remote = ", s3://bucket/prefix or gs://bucket/prefix" if key == "launcher.storage_path" else ""
                raise ConfigError(
                    f"{key}: {reason}{hint}, but this run's {what or f'{workers} workers'} may span more than one "
                    f"node; a multi-node run needs shared storage here: an NFS path every node sees{remote}")

    def run_trials(self, trials: list[Trial], command: str,
                   on_done: Callable[[Trial, dict[str, Any]], None]) -> None:
        """Stage two's trials, `on_done` called as each finishes (so a failure loses none that
        finished); the first failure is raised once every other trial has ended."""
        from pipeline.launch.local import run_trial

        if self.cfg.launcher.stage_two == "trainer":
            for t in trials:
                on_done(t, run_trial(t.label, t.cfg) if stage_kind(t.label) == "assess"
                        else self.run_stage(t.label, t.cfg, command))
            return
        if not trials:
            return
        self._ensure_ray()
        la, use_gpu = self.cfg.launcher, self._use_gpu()
        # Trials that do not fit on one node at once wait for each other; only another node (or
        # one trial too large for this one) puts them elsewhere.
        self._check_shared_storage(self.cfg, ray_storage_path(self.cfg), use_gpu, workers=1, cpus=la.trial_cpus,
                                   gpus=la.trial_gpus, what=f"{len(trials)} stage-two trials")
        # A dead worker process is retried like a stage's worker group; an exception in the
        # trial is not (the same config fails the same way again).
        task = ray.remote(_trial_task)
        resources = {"num_cpus": la.trial_cpus, "num_gpus": la.trial_gpus if use_gpu else 0,
                     "max_retries": self.cfg.failure.max_failures, "retry_exceptions": False}
        pending = {task.options(name=f"trial:{t.label}", **resources).remote(t.label, to_dict(t.cfg), command): t
                   for t in trials}
        failed: list[tuple[Trial, Exception]] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - reported with its label below
                failed.append((trial, e))
                continue
            on_done(trial, result)
        if failed:
            trial, e = failed[0]
            others = f" ({len(failed) - 1} other trial(s) failed too)" if len(failed) > 1 else ""
            raise RuntimeError(f"stage {trial.label} failed on Ray: {_root_cause(e)}{others}") from e

    def run_stage(self, stage: str, cfg: RunConfig, command: str) -> dict[str, Any]:
        from pipeline.stages import read_stage_result

        self._ensure_ray()
        la = cfg.launcher
        use_gpu = self._use_gpu()
        storage_path = ray_storage_path(cfg)
        self._check_shared_storage(cfg, storage_path, use_gpu, workers=la.num_workers, cpus=la.cpus_per_worker,
                                   gpus=1.0)
        filesystem, fs_path = storage.resolve(storage_path)
        stopped_file = stage_dir(cfg, stage) / STOPPED_FILE
        stopped_file.unlink(missing_ok=True)
        loop_config: dict[str, Any] = {"stage": stage, "command": command, "config": to_dict(cfg)}
        stoppable = stage == "pretrain"
        elastic = stoppable and 0 < la.min_workers < la.num_workers
        if stoppable:
            # On the driver's node: a worker node lost mid-run must not take the flag with it.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            loop_config["stop_flag"] = _StopFlag.options(scheduling_strategy=here).remote()
            loop_config["preemption_check_every"] = 0 if self._private else cfg.failure.preemption_check_every
        trainer = _Trainer(
            _train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                # Elastic: Ray starts what fits between min and max, and resizes from the last checkpoint.
                num_workers=(la.min_workers, la.num_workers) if elastic else la.num_workers,
                elastic_resize_monitor_interval_s=la.resize_check_s,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": la.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RayRunConfig(
                name=ray_run_name(cfg, stage),
                storage_path=fs_path,
                # Built once here, so every worker reaches the same endpoint (AWS_ENDPOINT_URL).
                storage_filesystem=filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.pretrain.keep_checkpoints)),
                failure_config=FailureConfig(max_failures=cfg.failure.max_failures,
                                             max_preemption_failures=cfg.failure.max_preemption_failures),
            ),
        )
        try:
            with stopping.keep_handlers(signal.SIGINT), \
                    _forward_stop(loop_config["stop_flag"]) if stoppable else contextlib.nullcontext():
                result = trainer.fit()
        except Exception as e:
            raise RuntimeError(f"stage {stage} failed on Ray: {_root_cause(e)}") from e
        checkpoint = storage.to_uri(result.checkpoint.path, storage_path) if result.checkpoint is not None else None
        stopped = read_json(stopped_file)
        if stopped is not None:
            raise StageStopped(int(stopped["step"]), str(stopped["reason"]), checkpoint)
        out = read_stage_result(cfg, stage)
        if checkpoint is not None:
            out["checkpoint"] = checkpoint
        return out


class _Trainer(TorchTrainer):
    """Ray Train's TorchTrainer with the driver's Ctrl-C left to the CLI: a KeyboardInterrupt
    (its one-line message, exit 130; the launcher shuts Ray down, so the job's workers go with it).
    Ray's own handler aborts the controller and exits 1 without a word, and stays installed after
    `fit`, where a Ctrl-C in stage two then did nothing. The override is Ray's private hook, so
    `keep_handlers` around `fit` also restores ours afterwards should a Ray release register it elsewhere."""

    def _register_sigint_handler(self, controller: Any) -> None:
        pass


def resources_by_host(nodes: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The resources of the alive nodes of `ray.nodes()`, summed per host address."""
    hosts: dict[str, dict[str, float]] = {}
    for n in nodes:
        if n.get("Alive"):
            total = hosts.setdefault(str(n.get("NodeManagerAddress", "")), {})
            for key, value in n.get("Resources", {}).items():
                total[key] = total.get(key, 0.0) + value
    return list(hosts.values())


def spans_nodes(node_resources: list[dict[str, float]], num_workers: int, cpus_per_worker: float,
                use_gpu: bool, *, gpus_per_worker: float = 1.0) -> bool:
    """Whether a stage's workers may be placed on more than one node.

    True when the cluster has several nodes, or one node too small for all workers (an
    autoscaler will add nodes for the rest).
    """
    if len(node_resources) != 1:
        return len(node_resources) > 1
    only = node_resources[0]
    return (num_workers * cpus_per_worker > only.get("CPU", 0)
            or (use_gpu and num_workers * gpus_per_worker > only.get("GPU", 0)))


def _root_cause(exc: BaseException) -> str:
    """The innermost error message of a Ray failure chain, for a one-line report."""
    seen = exc
    while True:
        nxt = getattr(seen, "cause", None) or seen.__cause__ or getattr(seen, "worker_failures", None)
        if isinstance(nxt, dict) and nxt:
            nxt = next(iter(nxt.values()))
        if not isinstance(nxt, BaseException) or nxt is seen:
            break
        seen = nxt
    return f"{type(seen).__name__}: {seen}".splitlines()[0]
