"""Multi-process training under torchrun: one process per GPU (NCCL) or per CPU worker (gloo), DistributedDataParallel.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process it starts. Without them
(or with WORLD_SIZE=1) everything here is a no-op and training is the plain single-process loop.

How a run stays equal to the single-process run with the same global batch:
- every process holds the same data generator and draws the same permutation and augmentation parameters;
- the device loader augments the whole global batch in every process (cheap next to the model), Mixup/CutMix mix the
  global batch, and each process then keeps its contiguous slice, so the inputs are those of a single process bit
  for bit; the torchvision loader loads only this process's slice (each image's augmentation is seeded by its
  position in the epoch) and gathers the global batch only when it has to be mixed;
- each process's loss is the mean over its slice, weighted by slice size x world size / batch size, so DDP's
  gradient average is the global-batch mean even when a trailing batch does not split evenly;
- BatchNorm sees only the local slice unless --sync-bn (SyncBatchNorm on CUDA, CrossProcessBatchNorm2d on CPU);
  what remains is float rounding in the gradient all-reduce and the statistics.
"""
from __future__ import annotations

import datetime
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..data.loaders import shard_bounds
from ..errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "ISOCONV_DIST_TIMEOUT"
STOP_POLL_STEPS = 10  # how often (in steps) the processes agree on a pending SIGINT/SIGTERM


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; world_size 1 means a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


# ----------------------------------------------------------------------------- setup and teardown

def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; start the job with torchrun, "
                          f"which sets it") from None


def world_from_env() -> Dist:
    """rank, world size and local rank as torchrun set them (no process group yet)."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent; start the job with torchrun")
    return Dist(rank=rank, world_size=world, local_rank=local_rank)


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds (default "
                          f"{DEFAULT_TIMEOUT_S:.0f})")
    return seconds


def check_batch_divides(batch_size: int, world_size: int) -> None:
    """The batch size is global: every process takes batch_size / world_size images per step."""
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise ConfigError(f"--batch-size {batch_size} is the global batch, split over the {world_size} processes "
                          f"of this job, and {world_size} does not divide it; use a multiple of {world_size} "
                          f"(e.g. {lower or world_size}) or another number of processes")


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of one process: cuda:LOCAL_RANK on GPUs, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ConfigError(f"--device {name} pins a single device; under torchrun use --device auto, cuda or cpu "
                          f"(process LOCAL_RANK uses cuda:LOCAL_RANK)")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA GPU is visible; use --device cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"process LOCAL_RANK={local_rank} has no GPU: only {count} visible on this machine; "
                          f"start at most {count} processes per node (--nproc-per-node {count})")
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device_name: str) -> Iterator[Dist]:
    """Join torchrun's job (NCCL on CUDA, gloo on CPU, collectives time out after $ISOCONV_DIST_TIMEOUT s) and
    leave it on exit; yields SINGLE when this is not a multi-process job."""
    world = world_from_env()
    if not world.enabled:
        yield SINGLE
        return
    timeout = timeout_seconds()
    device = rank_device(device_name, world.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    except ValueError as e:  # e.g. MASTER_ADDR missing: WORLD_SIZE was set by hand rather than by torchrun
        raise ConfigError(f"cannot join the job of WORLD_SIZE={world.world_size} processes ({e}); start it with "
                          f"torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from None
    ctx = Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=world.local_rank, device=device,
               backend=backend)
    failed = True
    try:
        yield ctx
        failed = False
    finally:
        # After a failed collective NCCL may block in teardown; the process is exiting anyway.
        if not (failed and backend == "nccl"):
            dist.destroy_process_group()


def barrier(ctx: Dist) -> None:
    if not ctx.enabled:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])  # without it NCCL guesses the device and warns
    else:
        dist.barrier()


@contextmanager
def main_process_first(ctx: Dist):
    """Local rank 0 of every machine runs the body first (downloads, decoded-image caches), then the others."""
    if ctx.enabled and ctx.local_rank != 0:
        barrier(ctx)
    yield
    if ctx.enabled and ctx.local_rank == 0:
        barrier(ctx)


def is_collective_failure(e: BaseException) -> bool:
    """An error raised because another process died, hung or was unreachable: torch's DistError, or a RuntimeError
    from a collective (gloo and older torch raise plain RuntimeErrors, also from DDP's hooks in backward)."""
    dist_error = getattr(dist, "DistError", ())
    if dist_error and isinstance(e, dist_error):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e).lower()
    if any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                               "pair closure")):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    innermost = frames[-1].filename.replace("\\", "/") if frames else ""  # raised by a collective call itself
    return "/distributed/" in innermost or innermost.endswith("/distributed.py")


def lost_contact_message(ctx: Dist, e: BaseException, resume_hint: str) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = first.split("] ", 1)[-1].split(". ")[0][:200]  # gloo's first sentence, without its source file
    return (f"process {ctx.rank} of {ctx.world_size} lost contact with the others ({first}); another process "
            f"failed or was killed (torchrun's summary names it) or did not answer for {TIMEOUT_ENV}="
            f"{timeout_seconds():.0f} s; the job is stopped — {resume_hint}")


# ----------------------------------------------------------------------------- collectives

def _reduced(t: torch.Tensor, op) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out, op=op)
    return out


def sum_over_ranks(ctx: Dist, t: torch.Tensor) -> torch.Tensor:
    return _reduced(t, dist.ReduceOp.SUM) if ctx.enabled else t


def agreed_signal(ctx: Dist, signum: Optional[int]) -> Optional[int]:
    """The stop signal any process received (every process must stop at the same step), or None."""
    if not ctx.enabled:
        return signum
    flag = torch.tensor(signum or 0, device=ctx.device, dtype=torch.long)
    return int(_reduced(flag, dist.ReduceOp.MAX).item()) or None


def agreed_stop_and_flag(ctx: Dist, signum: Optional[int], flag: bool) -> tuple[Optional[int], bool]:
    """agreed_signal, and whether any process raised `flag`, in one collective."""
    t = torch.tensor([signum or 0, int(flag)], device=ctx.device, dtype=torch.long)
    signum_any, flag_any = _reduced(t, dist.ReduceOp.MAX).tolist()
    return (signum_any or None), bool(flag_any)


def first_step_over_ranks(ctx: Dist, first_bad: torch.Tensor) -> torch.Tensor:
    """The earliest step index >= 0 over all processes (-1 where none is set)."""
    if not ctx.enabled:
        return first_bad
    never = torch.iinfo(torch.long).max
    earliest = _reduced(torch.where(first_bad < 0, never, first_bad), dist.ReduceOp.MIN)
    return torch.where(earliest == never, -1, earliest)


def all_finite_over_ranks(ctx: Dist) -> Callable[[torch.Tensor], bool]:
    """For --skip-nonfinite: a step is skipped everywhere when its loss is non-finite anywhere."""
    def all_finite(loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss).to(torch.long)
        return bool(_reduced(finite, dist.ReduceOp.MIN).item())
    return all_finite


def all_gather_rows(ctx: Dist, t: torch.Tensor) -> torch.Tensor:
    """Every process's rows, concatenated in rank order (row counts may differ: padded for the collective)."""
    if not ctx.enabled:
        return t
    counts = torch.zeros(ctx.world_size, device=t.device, dtype=torch.long)
    counts[ctx.rank] = len(t)
    counts = _reduced(counts, dist.ReduceOp.SUM).tolist()
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def broadcast_buffers(ctx: Dist, model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics differ per process without --sync-bn),
    so all evaluate the weights rank 0 checkpoints."""
    if ctx.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)


# ----------------------------------------------------------------------------- batches

def split_batch(ctx: Dist, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, is_global: bool, mix, gen):
    """This process's part of one training batch of `batch_size` images: (x, y, soft targets or None, loss weight).

    `is_global`: x holds the whole batch (device loader) rather than this process's slice (torchvision loader).
    Mixup/CutMix pair image i with image B-1-i of the global batch, so a mixed batch is mixed whole and then sliced.
    """
    lo, hi = shard_bounds(batch_size, ctx.world_size, ctx.rank)
    weight = (hi - lo) * ctx.world_size / batch_size
    if not mix.enabled:
        return (x[lo:hi], y[lo:hi], None, weight) if is_global else (x, y, None, weight)
    if not is_global:
        x, y = all_gather_rows(ctx, x), all_gather_rows(ctx, y)
    x, targets = mix(x, y, gen)
    return x[lo:hi], y[lo:hi], targets[lo:hi], weight


# ----------------------------------------------------------------------------- model

class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the gradient of a sum shared by all processes is the sum of theirs."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all processes, for CPU/gloo jobs (torch's
    SyncBatchNorm is CUDA-only). Same parameters, buffers and state-dict keys as BatchNorm2d; evaluation and single
    processes use the plain BatchNorm2d path. The variance is computed in two passes (mean first) for accuracy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        sums = _SumOverRanks.apply(torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // x.shape[1])]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        return out.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers that share statistics across processes (--sync-bn); parameters stay the same objects."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = CrossProcessBatchNorm2d  # a subclass adding no state: only forward changes
    return model


def wrap_ddp(model: nn.Module, ctx: Dist) -> nn.Module:
    """DistributedDataParallel around `model` (which keeps its plain parameter names for checkpoints)."""
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def decorrelated_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A global-RNG seed for process `rank` > 0 (stochastic depth draws per process; rank 0 keeps the stream of a
    single-process run)."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729 + step) % (2**63 - 1)
