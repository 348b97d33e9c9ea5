"""The optimisation loop shared by every drafter trainer: AdamW, warm-up + cosine decay, bf16 autocast on CUDA.

A trainer hands `fit` the parameters to train and a function from a batch of sequence indices to a scalar loss;
the data already live on the device, so a step does no host work beyond drawing the indices. The loss is read
back to the host only every `LOG_EVERY` steps (for the progress bar and the history).

A step whose loss or gradient is not finite (one batch's overflow) changes no weight: its gradients are zeroed on
the device before the optimizer step (no host sync), and it is counted. Training stops with an error when every step
of a logging window was so skipped, or more than `MAX_SKIPPED` of all steps were: that is divergence, not a batch.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from paradec.errors import ParadecError

LOG_EVERY = 10
MAX_SKIPPED = 0.05  # the largest share of steps whose non-finite loss or gradient may be skipped


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 16  # sequences per step
    lr: float = 1e-3  # peak learning rate
    warmup: int = 100  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParadecError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ParadecError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ParadecError(f"warmup must be an integer >= 0, got {self.warmup!r}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * progress))


@dataclass
class FitResult:
    steps: int
    seconds: float
    first_loss: float  # loss of the first step
    final_loss: float  # mean loss of the last logged window
    history: list[tuple[int, float]]  # (step, mean loss over the window ending there)
    skipped: int = 0  # steps whose loss or gradient was not finite: no weight changed

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "first_loss": round(self.first_loss, 4),
            "final_loss": round(self.final_loss, 4),
            "skipped_steps": self.skipped,
        }


def autocast(device: torch.device, target_dtype: torch.dtype):
    """Mixed precision for trainable float32 weights reading the frozen target's tensors: bf16 autocast on CUDA;
    on the CPU only for a half-precision target (float32 targets need none)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if target_dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cpu", dtype=target_dtype)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"


def fit(
    params: Iterable[torch.nn.Parameter],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    num_sequences: int,
    settings: TrainSettings,
    device: torch.device,
    *,
    target_dtype: torch.dtype = torch.float32,
    desc: str = "training",
    progress: bool = True,
) -> FitResult:
    """Minimise `loss_fn(batch indices [B] on device)` over `settings.steps` steps."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[tuple[int, float]] = []
    window = torch.zeros((), device=device)  # sum of the finite losses since the last log
    finite_steps = torch.zeros((), device=device)  # their count
    skipped = 0
    first = math.nan
    started = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        index = torch.randint(num_sequences, (settings.batch_size,), generator=generator).to(device)
        with autocast(device, target_dtype):
            loss = loss_fn(index)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        ok = torch.isfinite(norm) & torch.isfinite(loss.detach())
        skip = ~ok
        for p in params:  # a non-finite step's gradients become zeros, in place (NaN * 0 stays NaN: a fill)
            if p.grad is not None:
                p.grad.masked_fill_(skip, 0.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window += torch.where(ok, loss.detach().float(), 0.0)
        finite_steps += ok
        if step == 0:
            first = float(loss.detach())
        done = step + 1
        if done % LOG_EVERY == 0 or done == settings.steps:
            size = LOG_EVERY if done % LOG_EVERY == 0 else done % LOG_EVERY
            kept = int(finite_steps)
            skipped += size - kept
            if kept == 0 or skipped > MAX_SKIPPED * settings.steps:
                what = f"is {float(window) / kept}" if kept else "is nan (no step of them was finite)"
                raise ParadecError(
                    f"{desc} training diverged: the mean loss of steps {done - size + 1}..{done} {what}; {skipped} "
                    f"of {done} steps so far had a non-finite loss or gradient (lower --lr, or check the data); "
                    "nothing was saved"
                )
            mean = float(window) / kept
            history.append((done, mean))
            window.zero_()
            finite_steps.zero_()
            bar.set_postfix(loss=f"{mean:.4f}")
    return FitResult(settings.steps, time.perf_counter() - started, first, history[-1][1], history, skipped)
