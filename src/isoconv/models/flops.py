"""Counting a model's forward FLOPs with PyTorch's own counter."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: torch.nn.Module, image_size: int, batch_size: int = 1) -> int:
    """FLOPs of one forward pass (a multiply-add counts as 2) on a batch of RGB images, in eval mode."""
    param = next(model.parameters())
    x = torch.zeros(batch_size, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
