"""The training loop.

train(cfg) -> summary dict. Data stays on the device as uint8; each epoch draws batches by permutation from a
dedicated generator and augments them as batched tensor ops. `_train` reads top to bottom as the stages of an
epoch: schedule, batch, step, checks, checkpoint, log. Exact resume after a kill at any step holds because the
epoch's order, partial sums and every RNG state are in each checkpoint (`EpochState`).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from ..config import RESUME_FREE_FIELDS, TrainConfig, config_differences
from ..errors import ConfigError, UserError
from ..eval.evaluate import EVAL_BATCH, predict_logits, score, test_report
from ..models import count_params, with_preset_shape
from ..rundir import RunDir
from ..runtime import synchronize
from ..weights import load_latest_checkpoint, save_checkpoint
from ..weights.meta import PREPROCESS_KEY, Preprocessing
from . import distributed as ddp
from .distributed import Dist
from .schedule import beta1_at, lr_at
from .setup import Training, build_training
from .signals import Stopper, interrupted
from .tensorboard import open_tensorboard
from .tracking import check_tracking, open_tracker

log = logging.getLogger(__name__)

HEADER = (f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'train_acc':>9} {'test_loss':>9} {'test_top1':>9} "
          f"{'test_top5':>9} {'seconds':>8} {'img/s':>8}")


def format_row(m: dict[str, Any]) -> str:
    m = {k: (float("nan") if v is None else v) for k, v in m.items()}
    return (f"{m['epoch']:>5d} {m['lr']:>9.2e} {m['train_loss']:>10.4f} {m['train_acc']:>9.4f} "
            f"{m['test_loss']:>9.4f} {m['test_top1']:>9.4f} {m['test_top5']:>9.4f} "
            f"{m['epoch_seconds']:>8.1f} {m['images_per_second']:>8.0f}")


@dataclass
class EpochState:
    """An epoch in progress: its batch order and running sums (over all processes when saved)."""

    order: Any  # the loader's epoch order (a permutation, or a seed for the torchvision loader)
    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    skipped: int = 0
    seconds: float = 0.0  # spent before this process (re)started the epoch

    @classmethod
    def fresh(cls, order, device: torch.device) -> "EpochState":
        return cls(order, torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device, dist: Dist) -> "EpochState":
        s = cls(d["order"], d["loss_sum"].to(device), d["correct"].to(device), d["seen"], d["skipped"], d["seconds"])
        if dist.rank > 0:  # the checkpoint holds the sums over all processes: counted once, by rank 0
            s.loss_sum, s.correct, s.seen = torch.zeros_like(s.loss_sum), torch.zeros_like(s.correct), 0
        return s

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)

    def totals(self, dist: Dist) -> tuple[torch.Tensor, torch.Tensor, int]:
        """loss sum, correct count and images seen so far, over all processes."""
        if not dist.enabled:
            return self.loss_sum, self.correct, self.seen
        t = ddp.sum_over_ranks(dist, torch.stack([self.loss_sum.double(), self.correct.double(),
                                                  torch.tensor(float(self.seen), device=self.loss_sum.device)]))
        return t[0].float(), t[1].round().long(), int(t[2].item())

    def to_dict(self, dist: Dist, seconds: float) -> dict[str, Any]:
        loss_sum, correct, seen = self.totals(dist)
        return {"order": self.order, "loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": seen,
                "skipped": self.skipped, "seconds": seconds}


def evaluate(t: Training) -> dict[str, Any]:
    """Test metrics. Under torchrun each process predicts whole EVAL_BATCH chunks of a contiguous part of the test
    set (the same chunks a single process predicts, so the same logits) and all of them gather every logit."""
    ds, dist = t.test_ds, t.dist
    ddp.broadcast_buffers(dist, t.model)
    images = ds.images
    if dist.enabled:
        chunks = ddp.shard_bounds(-(-len(images) // EVAL_BATCH), dist.world_size, dist.rank)
        images = images[chunks[0] * EVAL_BATCH:chunks[1] * EVAL_BATCH]
    if len(images):
        logits = predict_logits(t.eval_model, images, ds.mean, ds.std, device=t.device, precision=t.precision,
                                channels_last=t.cfg.channels_last)
    else:  # more processes than chunks
        logits = torch.empty((0, len(ds.classes)), device=t.device)
    return score(ddp.all_gather_rows(dist, logits), ds.labels)


def data_meta(t: Training) -> dict[str, Any]:
    """What inference needs to preprocess images and name classes like training did, and what the data was."""
    ds = t.test_ds
    pre = Preprocessing(ds.unpadded_size or ds.image_size, t.cfg.pad_to, tuple(ds.mean), tuple(ds.std))
    return {"classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std), "image_size": ds.image_size,
            "dataset": ds.name, "provenance": t.data_provenance, PREPROCESS_KEY: pre.to_dict()}


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_checkpoint(t: Training, run: RunDir, epoch_done: int, step: int, epoch_state: Optional[dict],
                        train_seconds: float) -> None:
    if t.dist.is_main:
        save_checkpoint({"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
                         "scaler": t.scaler.state_dict(), "epoch": epoch_done, "step": step,
                         "epoch_state": epoch_state, "rng": rng_state(t.generator), "train_seconds": train_seconds,
                         "config": t.cfg.to_dict(), "params": count_params(t.model), "data": data_meta(t)},
                        run.checkpoint)


def restore(t: Training, state: dict[str, Any]) -> None:
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], t.generator)


def set_schedule(t: Training, at: float, steps_per_epoch: int) -> float:
    """Set the learning rate (and, for onecycle-torch, Adam's beta1) of the step at fractional epoch `at`."""
    cfg = t.cfg
    lr = lr_at(at, schedule=cfg.schedule, lr_max=cfg.lr_max, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
               iters_per_epoch=steps_per_epoch)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
        if cfg.schedule == "onecycle-torch":
            group["betas"] = (beta1_at(at, schedule=cfg.schedule, epochs=cfg.epochs, iters_per_epoch=steps_per_epoch),
                              group["betas"][1])
    return lr


def nonfinite_message(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int, run: RunDir) -> str:
    lr = lr_at(epoch + (step + 1) / steps_per_epoch, schedule=cfg.schedule, lr_max=cfg.lr_max, epochs=cfg.epochs,
               warmup_epochs=cfg.warmup_epochs, iters_per_epoch=steps_per_epoch)
    kept = (f"the last good checkpoint {run.checkpoint} is kept" if run.checkpoint.exists()
            else "no checkpoint had been written yet")
    return (f"the loss became non-finite in epoch {epoch + 1} at step {step + 1} of {steps_per_epoch} "
            f"(global step {epoch * steps_per_epoch + step + 1}, lr {lr:.3g}); {kept}; lower --lr-max, add "
            f"--clip-norm 1.0, or pass --skip-nonfinite to skip such steps")


def check_finite(t: Training, first_bad: torch.Tensor, epoch: int, run: RunDir) -> None:
    """Raise if any process saw a non-finite loss this epoch (recorded on the device, checked here)."""
    bad = int(ddp.first_step_over_ranks(t.dist, first_bad).item())
    if bad >= 0:
        raise UserError(nonfinite_message(t.cfg, epoch, bad, len(t.loader), run))


def over_time_budget(cfg: TrainConfig, dist: Dist, started: float, epoch_wall: float) -> bool:
    """--time-budget: would one more epoch (as long as the last) end past the budget? One agreed answer under DDP."""
    if cfg.time_budget is None:
        return False
    over = time.perf_counter() - started + epoch_wall > cfg.time_budget
    return ddp.agreed_signal(dist, 1 if over else None) is not None


def log_start(t: Training, run: RunDir, info, start_state: Optional[dict], history: list[dict]) -> None:
    cfg, dist = t.cfg, t.dist
    info(f"run {run}: {cfg.model} ({count_params(t.model):,} params) on {t.device} {t.precision}, {cfg.dataset} "
         f"{len(t.train_ds)} train / {len(t.test_ds)} test, {cfg.epochs} epochs x {len(t.loader)} steps of "
         f"{cfg.batch_size}, {cfg.loader} loader")
    if dist.enabled:
        info(f"DDP: {dist.world_size} processes ({dist.backend}) x {cfg.batch_size // dist.world_size} images = "
             f"global batch {cfg.batch_size}; lr_max {cfg.lr_max} applies to the global batch; "
             f"BatchNorm {'synchronized across processes' if cfg.sync_bn else 'per process (no --sync-bn)'}")
    elif cfg.sync_bn:
        info("--sync-bn has no effect in a single process")
    if start_state is not None:  # epochs counted from 1, as in the metrics table and the stop messages
        epoch, step = start_state["epoch"], start_state.get("step", 0)
        info(f"resuming at epoch {epoch + 1} step {step}" if step else f"resuming after epoch {epoch}")
    info(HEADER)
    for row in history:
        info(format_row(row))


def check_resume_config(run: RunDir, stored: dict[str, Any], cfg: TrainConfig) -> None:
    """A run resumes only with the settings it ran with (runtime settings and `auto` aside)."""
    diffs = config_differences(stored, with_preset_shape(cfg).to_dict())
    if diffs:
        raise ConfigError(f"cannot resume {run} with a different config ({'; '.join(diffs)}); drop those flags or "
                          f"start a new run")


def config_file_edits(run: RunDir, saved: dict[str, Any]) -> dict[str, Any]:
    """What the user changed in an unfinished run's config.yaml since its checkpoint was written (`saved`: the
    checkpoint's config). A setting that changes what the run computes is refused in one line (config.yaml and the
    checkpoint disagree: an edit, or a checkpoint from another run); runtime settings (device, time budget, ...)
    are returned, to be applied."""
    edited = run.read_config()
    if edited is None:
        return {}
    diffs = config_differences(saved, edited)
    if diffs:
        raise ConfigError(f"--resume {run}: {run.config} disagrees with the run's checkpoint ({'; '.join(diffs)}); a "
                          f"run resumes with its checkpoint's settings: undo the edit (or put back the run's own "
                          f"{run.checkpoint.name}), or train a new run with --recipe {run.config} --out NEW_DIR")
    return {k: v for k, v in edited.items() if k in RESUME_FREE_FIELDS and k != "out" and k in saved and
            v != saved[k]}


def train(cfg: TrainConfig, *, resume: Optional[Path] = None, stop_after: Optional[int] = None,
          resume_state: Optional[dict] = None,
          on_epoch: Optional[Callable[[dict], None]] = None) -> Optional[dict[str, Any]]:
    """Train (or resume) a run and return its summary; everything is also written to the run directory.

    stop_after=N stops after epoch N with a checkpoint but no summary (the run stays resumable).
    resume_state: the checkpoint of `resume` when the caller has already loaded it (it is not read again).
    on_epoch(row): called with each finished epoch's metrics row after its checkpoint is written (rank 0 only);
    an exception it raises stops the run there, resumable (`isoconv tune` reports to its pruner this way).
    Under torchrun every process calls this (DDP); only rank 0 logs and writes files, the others return None.
    """
    ddp.check_batch_divides(cfg.batch_size, ddp.world_from_env().world_size)
    if cfg.track == "mlflow":
        check_tracking(cfg.tracking_uri)  # an unreachable server: one line now, not minutes of retries later
    start_state = None
    if resume is not None:
        run = RunDir(resume)
        start_state = resume_state or load_latest_checkpoint(run.checkpoint)
        check_resume_config(run, start_state["config"], cfg)
    else:
        run = RunDir(cfg.out) if cfg.out else RunDir.new(cfg.model)
        if run.has_checkpoint():
            raise UserError(f"run directory {run} already holds a run; use --resume {run} or another --out")

    created = not run.path.exists()
    with ddp.process_group(cfg.device) as dist:
        try:
            with run.locked() if dist.is_main else nullcontext():
                return _setup_and_train(cfg, dist, run, start_state, resume, stop_after, created, on_epoch)
        except Exception as e:
            if dist.enabled and not isinstance(e, UserError) and ddp.is_collective_failure(e):
                hint = (f"continue from its last checkpoint with `-m isoconv train --resume {run}`"
                        if run.checkpoint.exists() else "no checkpoint had been written; start it again")
                raise UserError(ddp.lost_contact_message(dist, e, hint)) from e
            raise


def _setup_and_train(cfg, dist: Dist, run: RunDir, start_state, resume, stop_after, created_dir: bool,
                     on_epoch=None):
    try:
        training = build_training(cfg, resuming=start_state is not None, dist=dist)
        return _train(training, run, start_state, stop_after, on_epoch)
    except BaseException as e:
        if dist.is_main and resume is None and not run.checkpoint.exists():
            run.remove_unfinished(created_dir)
        if isinstance(e, torch.OutOfMemoryError):
            raise UserError(f"out of memory at batch size {cfg.batch_size}; lower --batch-size") from e
        raise


@dataclass
class Start:
    """Where a run (re)starts: after `epoch` epochs and `step` steps of the next, with that epoch's state."""

    epoch: int = 0
    step: int = 0
    epoch_state: Optional[dict] = None
    history: list = field(default_factory=list)  # the metrics rows of the finished epochs
    train_seconds: float = 0.0


def start_run(t: Training, run: RunDir, start_state: Optional[dict]) -> Start:
    """Restore a checkpoint (if any), seed the other processes, write config.yaml and the metrics so far."""
    cfg, dist, start = t.cfg, t.dist, Start()
    if start_state is not None:
        restore(t, start_state)
        start = Start(start_state["epoch"], start_state.get("step", 0), start_state.get("epoch_state"),
                      run.read_metrics()[:start_state["epoch"]], start_state["train_seconds"])
    if dist.rank > 0:  # per-process stochastic depth; rank 0 keeps the single-process stream
        torch.manual_seed(ddp.decorrelated_seed(cfg.seed, dist.rank, start.epoch, start.step))
    if dist.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg.to_dict())
        run.write_metrics(start.history)
    return start


class Sinks:
    """Where each epoch's metrics row goes besides metrics.jsonl: TensorBoard and an experiment tracker."""

    def __init__(self, t: Training, run: RunDir, start_epoch: int):
        main = t.dist.is_main
        self.sinks = [open_tensorboard(run.tensorboard, start_epoch=start_epoch, enabled=t.cfg.tensorboard and main),
                      open_tracker(t.cfg, run, enabled=main)]  # --track mlflow

    def log_epoch(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_epoch(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def epoch_row(epoch: int, lr: float, state: EpochState, dist: Dist, seconds: float) -> dict[str, Any]:
    """The metrics row of a finished epoch (test metrics filled in when it is evaluated)."""
    loss_sum, correct, seen = state.totals(dist)
    if seen == 0:
        raise UserError(f"every step of epoch {epoch + 1} had a non-finite loss (all skipped); "
                        f"lower --lr-max or add --clip-norm 1.0")
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
            "test_loss": None, "test_top1": None, "test_top5": None, "epoch_seconds": seconds,
            "images_per_second": seen / seconds, "skipped_steps": state.skipped}


def record_epoch(t: Training, run: RunDir, row: dict, sinks: Sinks, train_seconds: float, info) -> None:
    """Metrics row, sinks, epoch-end checkpoint (and the kept copy), log line."""
    cfg, epoch = t.cfg, row["epoch"]
    if t.dist.is_main:
        run.append_metrics(row)  # before the checkpoint: resume truncates extra rows
    sinks.log_epoch(row)
    save_run_checkpoint(t, run, epoch, 0, None, train_seconds)
    if t.dist.is_main and cfg.keep_every and epoch % cfg.keep_every == 0:
        run.keep_checkpoint(epoch)
    info(format_row(row))


def _train(t: Training, run: RunDir, start_state: Optional[dict], stop_after: Optional[int], on_epoch=None):
    cfg, dist, device, loader = t.cfg, t.dist, t.device, t.loader
    info = log.info if dist.is_main else (lambda *_: None)
    steps_per_epoch = len(loader)
    start = start_run(t, run, start_state)
    resumed_epoch, history, train_seconds = start.epoch_state, start.history, start.train_seconds
    sinks = Sinks(t, run, len(history))
    log_start(t, run, info, start_state, history)

    result, last_save = None, time.monotonic()
    budget_stop, started, last_epoch_wall = None, time.perf_counter(), None
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    with Stopper(dist) as stop:
        for epoch in range(start.epoch, end_epoch):
            epoch_started = time.perf_counter()
            t.step.model.train()
            if resumed_epoch is not None:  # resuming mid-epoch: same order, same partial sums
                state, first = EpochState.from_dict(resumed_epoch, device, dist), start.step
            else:
                state, first = EpochState.fresh(loader.epoch_order(), device), 0
            resumed_epoch, seen_at_start = None, state.seen
            first_bad = torch.full((), -1, device=device, dtype=torch.long)  # checked without a sync per step
            t0 = time.perf_counter()
            bar = tqdm(loader.batches(state.order, first), total=steps_per_epoch, initial=first,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch",
                       disable=not sys.stderr.isatty() or not dist.is_main)
            for i, (x, y) in enumerate(bar, start=first):
                # (1) schedule
                lr = set_schedule(t, epoch + (i + 1) / steps_per_epoch, steps_per_epoch)
                # (2) batch: under DDP this process's slice of the global batch (mixed first when mixing)
                shard = {}
                if dist.enabled:
                    x, y, targets, weight = ddp.split_batch(dist, x, y, loader.slices[i][1] - loader.slices[i][0],
                                                            is_global=loader.yields_global_batches, mix=t.step.mix,
                                                            gen=t.generator)
                    shard = dict(targets=targets, loss_weight=weight, all_finite=ddp.all_finite_over_ranks(dist))
                # (3) step
                loss, logits = t.step(x, y, **shard)
                # (4) bookkeeping, without a device sync
                if loss is None:  # --skip-nonfinite: the update was skipped
                    state.skipped += 1
                else:
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
                    state.add(loss, logits, y)
                # (5) mid-epoch checkpoint or stop
                done = i + 1
                checkpoint_due = bool(cfg.ckpt_every_steps and done % cfg.ckpt_every_steps == 0)
                time_due = time.monotonic() - last_save >= 60 * cfg.ckpt_every_minutes > 0
                signum, time_due = stop.mid_epoch(done, steps_per_epoch, checkpoint_due, time_due)
                if done < steps_per_epoch and (signum is not None or checkpoint_due or time_due):
                    check_finite(t, first_bad, epoch, run)
                    partial = state.to_dict(dist, state.seconds + time.perf_counter() - t0)
                    save_run_checkpoint(t, run, epoch, done, partial, train_seconds)
                    last_save = time.monotonic()
                    if signum is not None:
                        bar.close()
                        ddp.barrier(dist)  # rank 0 has written the checkpoint before anyone exits
                        raise interrupted(signum, run.path, epoch, done)
                # (6) progress
                if not bar.disable and i % 10 == 0 and state.seen:
                    bar.set_postfix(loss=f"{state.loss_sum.item() / state.seen:.3f}",
                                    acc=f"{state.correct.item() / state.seen:.3f}",
                                    img_s=f"{(state.seen - seen_at_start) / max(time.perf_counter() - t0, 1e-9):.0f}")
            bar.close()
            synchronize(device)
            # end of epoch: checks, evaluation, metrics row, checkpoint, log
            check_finite(t, first_bad, epoch, run)
            epoch_seconds = state.seconds + time.perf_counter() - t0
            train_seconds += epoch_seconds
            row = epoch_row(epoch, lr, state, dist, epoch_seconds)
            if epoch + 1 < end_epoch and over_time_budget(cfg, dist, started, last_epoch_wall or epoch_seconds):
                budget_stop = epoch + 1  # evaluated, checkpointed and logged like a last epoch, then stop
            if epoch + 1 == cfg.epochs or on_eval_schedule(cfg, epoch + 1) or budget_stop:
                result = evaluate(t)
                row.update({k: result[k] for k in ("test_loss", "test_top1", "test_top5")})
            history.append(row)
            record_epoch(t, run, row, sinks, train_seconds, info)
            last_save = time.monotonic()
            if cfg.compile and epoch == start.epoch and t.step.compile_seconds is not None:
                info(f"torch.compile: {t.step.compile_seconds:.1f} s (extra time of the first step, included in "
                     f"epoch {epoch + 1}'s seconds)")
            signum = stop.epoch_end()  # also waits for rank 0's checkpoint
            if signum is not None:
                raise interrupted(signum, run.path, epoch + 1, 0)
            if on_epoch is not None and dist.is_main:
                on_epoch(row)
            last_epoch_wall = time.perf_counter() - epoch_started
            if budget_stop:
                break

    sinks.close()
    if budget_stop:
        info(f"--time-budget {cfg.time_budget:g} s: stopped after epoch {budget_stop} of {cfg.epochs} (another epoch "
             f"would pass the budget); continue with `isoconv train --resume {run}`")
        return None
    if end_epoch < cfg.epochs:
        info(f"stopped after epoch {end_epoch}; continue with `isoconv train --resume {run}`")
        return None
    if result is None:  # resumed a run that had already finished: evaluate the final weights
        result = evaluate(t)
    return finish(t, run, result, history, train_seconds, info) if dist.is_main else None


def on_eval_schedule(cfg: TrainConfig, epoch: int) -> bool:
    """Whether (1-based) `epoch` is one --eval-every / --eval-start evaluate after (the last epoch is evaluated
    whatever the schedule, for the summary)."""
    start = cfg.eval_start or cfg.eval_every
    return epoch >= start and (epoch - start) % cfg.eval_every == 0


def scheduled_evals(cfg: TrainConfig, history: list[dict]) -> dict[str, Any]:
    """The figures a seed that evaluated on a fixed schedule could report: the best and the last evaluation on
    the schedule (the final weights' evaluation counts only when the last epoch is on it)."""
    rows = [r for r in history if r.get("test_top1") is not None and on_eval_schedule(cfg, r["epoch"])]
    pick = ("epoch", "test_top1", "test_top5")
    best = max(rows, key=lambda r: (r["test_top1"], -r["epoch"]), default=None)
    return {"every": cfg.eval_every, "start": cfg.eval_start or cfg.eval_every, "count": len(rows),
            "best": {k: best[k] for k in pick} if best else None,
            "last": {k: rows[-1][k] for k in pick} if rows else None}


def finish(t: Training, run: RunDir, result: dict, history: list[dict], train_seconds: float, info) -> dict:
    """Write summary.json and report.txt, log the report, return the summary."""
    cfg, dist = t.cfg, t.dist
    fields, report = test_report(result, t.test_ds.classes)
    summary = {"run_dir": str(run), "model": cfg.model, "recipe": cfg.recipe, "dataset": cfg.dataset,
               "epochs": cfg.epochs, "params": count_params(t.model), "train_seconds": train_seconds,
               "device": str(t.device), "amp": t.precision, "torch": torch.__version__,
               "skipped_steps": sum(r.get("skipped_steps", 0) for r in history),
               "compile_seconds": t.step.compile_seconds if cfg.compile else None,
               "data_provenance": t.data_provenance, "test_split": cfg.test_split, "test_subset": cfg.test_subset,
               "test_images_total": t.test_ds.split_images, "scheduled_evals": scheduled_evals(cfg, history),
               **({"processes": dist.world_size, "batch_per_process": cfg.batch_size // dist.world_size}
                  if dist.enabled else {}), **fields}
    run.write_summary(summary, report)
    info("")
    info(report)
    info(f"test top-1 {summary['test_top1']:.4f}  top-5 {summary['test_top5']:.4f}  "
         f"({train_seconds / 60:.1f} min of training); written to {run}")
    evals = summary["scheduled_evals"]
    if (cfg.eval_every > 1 or cfg.eval_start) and evals["best"]:
        info(f"on the evaluation schedule (every {evals['every']} from epoch {evals['start']}): best test top-1 "
             f"{evals['best']['test_top1']:.4f} (epoch {evals['best']['epoch']}), last "
             f"{evals['last']['test_top1']:.4f} (epoch {evals['last']['epoch']})")
    if not all(bool(torch.isfinite(p).all()) for p in t.model.parameters()):
        raise UserError(f"the trained model in {run} has non-finite weights (test loss {summary['test_loss']}); "
                        f"{summary['skipped_steps']} step(s) were skipped for a non-finite loss; lower --lr-max or "
                        f"add --clip-norm 1.0 and train again")
    if not math.isfinite(summary["test_loss"]):
        log.warning(f"the test loss of {run} is {summary['test_loss']}: some test images get non-finite logits")
    return summary
