"""Where a sweep's runs train: `--launcher ray` (one Ray task per variant x seed, on a Ray cluster or a local Ray
instance) or `--launcher slurm` (one Slurm job array through submitit). `--launcher local` is `ablate.execute`.

Every run writes to its folder under the shared sweep directory, and a run folder with a checkpoint resumes from
it, so a task that is retried (Ray: its process or node died, or it was stopped by SIGTERM) or requeued (Slurm:
preempted or timed out, through submitit's checkpointing protocol) continues exactly where its last checkpoint
was. The engines are optional: `pip install 'isoconv[ray]'` / `'isoconv[slurm]'`.
"""
from __future__ import annotations

import logging
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import Interrupted, UserError
from ..rundir import RunDir

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "ray", "slurm")
DEFAULT_TIME_MIN = 24 * 60


@dataclass
class LaunchOptions:
    """Resources and placement of each run (one variant x seed) under --launcher ray or slurm."""

    gpus_per_run: float = 0
    cpus_per_run: int = 1
    retries: int = 3  # Ray: attempts after a failure of the task's process, node or a SIGTERM stop
    ray_address: Optional[str] = None  # None: the Ray instance this process already joined, else a new local one
    partition: Optional[str] = None
    time_min: int = DEFAULT_TIME_MIN
    slurm_params: dict = field(default_factory=dict)  # any other #SBATCH option, e.g. {"account": "proj"}
    cluster: str = "slurm"  # submitit executor; "local" runs the array as processes on this machine
    poll_seconds: Optional[float] = None  # how often the Slurm queue is checked (default 30 s, local 1 s)

    def check(self) -> None:
        if self.cpus_per_run < 1:
            raise UserError(f"--cpus-per-run must be at least 1, got {self.cpus_per_run}")
        if self.gpus_per_run < 0:
            raise UserError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run:g}")
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        if self.time_min < 1:
            raise UserError(f"--time must be at least 1 minute, got {self.time_min}")


def parse_time(value: str) -> int:
    """Slurm-style wall time in minutes: `90`, `1:30:00` (h:m:s), `2-00:00:00` (days-h:m:s)."""
    text = value.strip()
    try:
        days, _, rest = text.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) == 2:
            minutes = parts[0] * 60 + parts[1]
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
        else:
            raise ValueError
        minutes += int(days) * 24 * 60 if days else 0
    except ValueError:
        raise UserError(f"--time must be minutes or [D-]HH:MM:SS, got {value!r}") from None
    return minutes


def engine(name: str, package: str, launcher: str):
    """Import an optional engine, or say in one line what to install."""
    try:
        return __import__(name)
    except ImportError:
        raise UserError(f"--launcher {launcher} needs the {package} package; `pip install 'isoconv[{launcher}]'` "
                        f"(or `pip install {package}`), or use --launcher local") from None


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".strip().rstrip(":")


def record_failure(run, message: str) -> tuple[str, str]:
    RunDir(run.run_dir).write_error(message)
    return "failed", message


# ----------------------------------------------------------------------------- Ray

def run_with_ray(todo: list, work: Callable, *, stop_after, on_finish, options: LaunchOptions) -> list:
    """Each run is a Ray task asking for --cpus-per-run CPUs and --gpus-per-run GPUs; a task whose process or node
    dies, or which stops on SIGTERM after a checkpoint, is retried up to --retries times and resumes from the run's
    checkpoint. Returns [(run, state, message)] in the order they finished."""
    ray = engine("ray", "ray", "ray")
    started_here = not ray.is_initialized()
    with stopping_on_sigterm():  # SIGTERM raises here, so the local Ray instance is shut down on that path too
        if started_here:
            if options.ray_address:
                log.info(f"joining the Ray cluster at {options.ray_address}")
                ray.init(address=options.ray_address, log_to_driver=False)
            else:
                log.info("starting a local Ray instance (pass --ray-address to use a cluster)")
                ray.init(include_dashboard=False, log_to_driver=False)
        pending: dict = {}
        try:
            check_ray_resources(ray.cluster_resources(), options)
            threads = max(1, int(options.cpus_per_run))
            task = ray.remote(num_cpus=options.cpus_per_run, num_gpus=options.gpus_per_run,
                              max_retries=options.retries, retry_exceptions=[Interrupted])(work)
            log.info(f"submitting {len(todo)} Ray task(s), each with {options.cpus_per_run} CPU(s) and "
                     f"{options.gpus_per_run:g} GPU(s); logs in each run folder's ablate.log")
            pending = {task.remote(r.config, threads, stop_after): r for r in todo}
            outcomes = []
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                r = pending.pop(ready[0])
                try:
                    state, message = ray.get(ready[0])
                except ray.exceptions.RayError as e:  # out of retries
                    state, message = record_failure(r, f"the Ray task failed after {options.retries} retries: "
                                                       f"{one_line(e)}")
                outcomes.append((r, state, message))
                on_finish(r, state, message)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
    return outcomes


def check_ray_resources(resources: dict, options: LaunchOptions) -> None:
    """A run asking for more GPUs or CPUs than the whole Ray cluster has would wait forever: say so instead."""
    for flag, name, wanted in (("--gpus-per-run", "GPU", options.gpus_per_run),
                               ("--cpus-per-run", "CPU", options.cpus_per_run)):
        has = resources.get(name, 0)
        if wanted > has:
            fix = "pass --gpus-per-run 0 to train on CPUs" if name == "GPU" else f"pass --cpus-per-run {int(has)}"
            raise UserError(f"{flag} {wanted:g} cannot be met: the Ray cluster has {has:g} {name}(s) in all, so the "
                            f"runs would wait forever; {fix}, or --ray-address a cluster that has them")


@contextmanager
def stopping_on_sigterm():
    """SIGTERM raises Interrupted in this (the main) thread while the block runs, so its cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted("the sweep was stopped by SIGTERM; run the same command again to continue it", signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- Slurm (submitit)

class SlurmTask:
    """One run of the job array. submitit's checkpointing protocol: on preemption or timeout submitit calls
    `checkpoint`, which resubmits the same call; the requeued task resumes from the run's last checkpoint."""

    def __init__(self, work: Callable, threads: int):
        self.work, self.threads = work, threads

    def __call__(self, config, stop_after):
        try:
            return self.work(config, self.threads, stop_after)
        except Interrupted as e:  # SIGTERM without submitit's signal: checkpointed; the next command resumes it
            return "partial", str(e)

    def checkpoint(self, config, stop_after):
        import submitit

        return submitit.helpers.DelayedSubmission(self, config, stop_after)


def slurm_executor(folder: Path, options: LaunchOptions, *, name: str, array_parallelism: int):
    """The submitit executor with this sweep's submission parameters (partition, time, GPUs, CPUs, extra
    #SBATCH options); with cluster "local" the same array runs as processes here."""
    submitit = engine("submitit", "submitit", "slurm")
    if options.cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError("--launcher slurm needs Slurm's sbatch and srun on PATH; run the command on the cluster's "
                        "login node, or use --launcher local or ray")
    gpus = options.gpus_per_run
    if gpus != int(gpus):
        raise UserError(f"--launcher slurm needs a whole number of --gpus-per-run, got {gpus:g}")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster)
    params: dict[str, Any] = dict(name=name, timeout_min=options.time_min, nodes=1, tasks_per_node=1,
                                  cpus_per_task=int(options.cpus_per_run), gpus_per_node=int(gpus),
                                  slurm_array_parallelism=array_parallelism)
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.slurm_params:
        params["slurm_additional_parameters"] = dict(options.slurm_params)
    executor.update_parameters(**params)
    return executor


def submit_slurm(todo: list, work: Callable, *, stop_after, options: LaunchOptions, folder: Path, name: str,
                 parallel: int) -> list:
    """Submit the runs as one job array (at most `parallel` at once when > 1); returns the jobs, in todo order."""
    executor = slurm_executor(folder, options, name=name,
                              array_parallelism=parallel if parallel > 1 else len(todo))
    task = SlurmTask(work, max(1, int(options.cpus_per_run)))
    with executor.batch():
        jobs = [executor.submit(task, r.config, stop_after) for r in todo]
    return jobs


def run_with_slurm(todo: list, work: Callable, *, stop_after, on_finish, options: LaunchOptions, folder: Path,
                   name: str, parallel: int) -> list:
    submitit = engine("submitit", "submitit", "slurm")
    jobs = submit_slurm(todo, work, stop_after=stop_after, options=options, folder=folder, name=name,
                        parallel=parallel)
    runs = {id(job): r for job, r in zip(jobs, todo)}
    log.info(f"submitted {len(jobs)} run(s) as job array {jobs[0].job_id.split('_')[0]} "
             f"({options.cluster}); submission files and logs in {folder}")
    poll = options.poll_seconds or (30.0 if options.cluster == "slurm" else 1.0)
    outcomes = []
    try:
        for job in submitit.helpers.as_completed(jobs, poll_frequency=poll):
            r = runs[id(job)]
            try:
                state, message = job.result()
            except Exception as e:  # the job failed or was cancelled; its log is in the submitit folder
                state, message = record_failure(r, f"Slurm job {job.job_id} failed: {one_line(e)}")
            outcomes.append((r, state, message))
            on_finish(r, state, message)
    except BaseException:
        for job in jobs:
            if not job.done():
                job.cancel(check=False)
        raise
    return outcomes
