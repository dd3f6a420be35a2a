"""FLOPs per sample and the device's achievable matmul rate, for TFLOP/s and MFU.

FLOPs come from torch's own `FlopCounterMode` on one forward pass (multiply-add = 2 FLOPs);
a training step costs about 3x the forward (forward + two matmuls per weight in backward),
the convention MFU figures use. The model is copied to the meta device first, so counting a
large model costs no memory and no compute.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

TRAIN_FLOPS_PER_FORWARD = 3.0


def forward_flops(model: nn.Module, in_chans: int, img_size: int) -> int:
    """FLOPs of one forward pass for one image of `in_chans` x `img_size` x `img_size`."""
    probe = copy.deepcopy(model).to("meta").eval()
    x = torch.empty(1, in_chans, img_size, img_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        probe(x)
    return int(counter.get_total_flops())


def train_flops_per_sample(model: nn.Module, in_chans: int, img_size: int) -> float:
    return TRAIN_FLOPS_PER_FORWARD * forward_flops(model, in_chans, img_size)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                         seconds: float = 2.0) -> float:
    """Achieved dense matmul FLOP/s on `device` (the MFU denominator measured, not looked up).

    On CPU a smaller matrix keeps the probe short; its rate is what the model could hope for.
    """
    if device.type == "cpu":
        size = min(size, 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: kernels picked, clocks up
        a @ b
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
        if n % 10 == 0:
            sync()
    sync()
    return 2.0 * size**3 * n / (time.perf_counter() - t0)
