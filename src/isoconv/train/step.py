"""One optimisation step, bound once to everything that does not change between steps (nanoGPT's `ctx`)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..augment import MixupCutmix
from ..runtime import CompileClock, autocast, compile_error, is_compile_error


class TrainStep:
    """`loss, logits = step(x, y)` (the model in train mode): mix (when on), forward in the training precision, loss, backward, clip, update.

    model: what the step calls (torch.compile'd and/or DDP-wrapped); params: the parameters to clip.
    With skip_nonfinite, a step whose loss is not finite makes no update and returns (None, None) (one device
    sync per step, so it is off by default). Under DDP the caller passes this process's slice with its soft
    `targets` (already mixed, or None), the weight that turns DDP's gradient average into the global-batch mean,
    and `all_finite` (agreement across processes).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 mix: MixupCutmix, generator: torch.Generator, *, device: torch.device, precision: str,
                 channels_last: bool, clip_norm: Optional[float], label_smoothing: float, skip_nonfinite: bool,
                 compiled: bool, l2: float = 0.0, l2_weights: Sequence[torch.Tensor] = ()):
        self.model, self.optimizer, self.scaler, self.mix, self.generator = model, optimizer, scaler, mix, generator
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.clip_norm, self.label_smoothing, self.skip_nonfinite = clip_norm, label_smoothing, skip_nonfinite
        self.l2, self.l2_weights = l2, list(l2_weights)
        self.compile_clock = CompileClock(device) if compiled else None

    @property
    def compile_seconds(self) -> Optional[float]:
        return self.compile_clock.seconds if self.compile_clock else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, targets: Optional[torch.Tensor] = None,
                 loss_weight: float = 1.0, all_finite: Optional[Callable[[torch.Tensor], bool]] = None):
        if self.compile_clock is None:
            return self._step(x, y, targets, loss_weight, all_finite)
        try:
            return self.compile_clock.time(self._step, x, y, targets, loss_weight, all_finite)
        except Exception as e:
            if is_compile_error(e):
                raise compile_error(e) from e
            raise

    def _step(self, x, y, targets, loss_weight, all_finite):
        if targets is None and self.mix.enabled:
            x, targets = self.mix(x, y, self.generator)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            logits = self.model(x)
            # mixed targets are probabilities that already carry the label smoothing
            loss = (F.cross_entropy(logits.float(), targets) if targets is not None
                    else F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing))
            if self.l2:  # a coupled L2 penalty (Keras kernel_regularizer), unlike AdamW's decoupled decay
                loss = loss + self.l2 * sum(w.float().pow(2).sum() for w in self.l2_weights)
        self.optimizer.zero_grad(set_to_none=True)
        if self.skip_nonfinite and not (all_finite(loss) if all_finite else torch.isfinite(loss).item()):
            return None, None
        self.scaler.scale(loss * loss_weight if loss_weight != 1.0 else loss).backward()
        if self.clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()
