"""Training and validation of one zoo model on a flat token array.

The whole token array lives on the device; each micro-batch is `micro_batch` windows of `context + 1` tokens at
offsets drawn from a seeded generator (no data loader, no host work per step). AdamW (fused on CUDA), linear
warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA, and regional `torch.compile` (each decoder
layer and the loss are compiled once and reused, which keeps compile time to seconds).

With a time budget the trainer times steps once compilation is over and fixes the number of steps so that the
whole run, compilation included, fits the budget; the cosine schedule then decays over exactly those steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from paradec.errors import ParadecError
from paradec.zoo.model import ZooLlama, lm_loss
from paradec.zoo.presets import TrainPlan

_PROBE_FROM, _PROBE_TO = 3, 8  # steps timed to size a time-budgeted run (after the compiling first steps)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    seconds: float  # wall time of the whole run, compilation included
    tokens_per_second: float  # steady-state throughput (timed after compilation)
    train_loss: float  # mean loss of the last logged steps


def lr_at(step: int, plan: TrainPlan, total_steps: int) -> float:
    """Linear warm-up to plan.lr, then cosine decay to plan.lr * min_lr_ratio at total_steps."""
    if step < plan.warmup_steps:
        return plan.lr * (step + 1) / plan.warmup_steps
    progress = min(1.0, (step - plan.warmup_steps) / max(1, total_steps - plan.warmup_steps))
    floor = plan.lr * plan.min_lr_ratio
    return floor + 0.5 * (plan.lr - floor) * (1.0 + math.cos(math.pi * progress))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device_tokens(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(tokens.astype(np.int32)).to(device)


def _windows(data: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """(B,) offsets -> (B, length) int64 windows of data."""
    idx = offsets[:, None] + torch.arange(length, device=data.device)  # (B, length)
    return data[idx].long()


def _optimizer(model: ZooLlama, plan: TrainPlan, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": plan.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=plan.lr, betas=plan.betas, fused=device.type == "cuda")


def train(
    model: ZooLlama,
    data: torch.Tensor,  # [N] int32 token ids on the training device
    plan: TrainPlan,
    *,
    seconds: float | None = None,
    seed: int = 0,
    compile: bool = False,
    desc: str = "training",
    progress: bool = True,
) -> TrainResult:
    """Train in place; `seconds` (if given) replaces plan.steps with as many steps as fit in that wall time."""
    device = data.device
    context = model.context
    if data.numel() < context + 2:
        raise ParadecError(f"{data.numel()} training tokens cannot fill one window of context {context} + 1")
    if plan.batch_tokens % (plan.micro_batch * context):
        raise ParadecError(
            f"batch_tokens {plan.batch_tokens} is not a multiple of micro_batch * context = {plan.micro_batch * context}"
        )
    accum = plan.batch_tokens // (plan.micro_batch * context)
    loss_fn = torch.compile(lm_loss) if compile else lm_loss
    if compile:
        for layer in model.model.layers:
            layer.compile()
    model.train()
    opt = _optimizer(model, plan, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    total_steps = plan.steps if seconds is None else max(plan.warmup_steps + 1, _PROBE_TO + 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses: list[torch.Tensor] = []
    start = time.perf_counter()
    probe_start = start
    step = 0
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress)
    while step < total_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, plan, total_steps)
        step_loss = torch.zeros((), device=device)
        for _ in range(accum):
            offsets = torch.randint(0, data.numel() - context - 1, (plan.micro_batch,), device=device, generator=gen)
            window = _windows(data, offsets, context + 1)  # (B, T+1)
            with _autocast(device):
                loss = loss_fn(model, model.hidden(window[:, :-1]), window[:, 1:]) / accum
            loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        step += 1
        if step == _PROBE_FROM:
            sync()
            probe_start = time.perf_counter()
        if step == _PROBE_TO:
            sync()
            probe_end = time.perf_counter()
            if seconds is not None:
                per_step = (probe_end - probe_start) / (_PROBE_TO - _PROBE_FROM)
                fit = step + int((seconds - (probe_end - start)) / per_step)
                total_steps = max(step + 1, plan.warmup_steps + 1, fit)
                bar.total = total_steps
        bar.update(1)
        if step % 10 == 0 or step == total_steps:
            recent = torch.stack(losses[-10:]).mean().item()
            bar.set_postfix(loss=f"{recent:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    sync()
    elapsed = time.perf_counter() - start
    bar.close()
    if step > _PROBE_FROM:  # steady state: the steps after compilation
        rate = (step - _PROBE_FROM) * plan.batch_tokens / (start + elapsed - probe_start)
    else:
        rate = step * plan.batch_tokens / elapsed
    return TrainResult(
        steps=step,
        tokens_seen=step * plan.batch_tokens,
        seconds=elapsed,
        tokens_per_second=rate,
        train_loss=torch.stack(losses[-10:]).mean().item(),
    )


@torch.no_grad()
def evaluate(model: ZooLlama, data: torch.Tensor, *, max_tokens: int, micro_batch: int) -> tuple[float, int]:
    """Mean next-token loss (nats/token) over consecutive non-overlapping windows of the validation tokens.

    Runs eagerly (no compiled graphs), so evaluation never triggers a recompile. Returns (loss, tokens scored).
    """
    context = model.context
    n_windows = min((data.numel() - 1) // context, max(1, max_tokens // context))
    if n_windows < 1:
        raise ParadecError(f"{data.numel()} validation tokens cannot fill one window of context {context} + 1")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    offsets = torch.arange(n_windows, device=data.device) * context
    with torch.compiler.set_stance("force_eager"):
        for i in range(0, n_windows, micro_batch):
            window = _windows(data, offsets[i : i + micro_batch], context + 1)  # (B, T+1)
            with _autocast(data.device):
                loss = lm_loss(model, model.hidden(window[:, :-1]), window[:, 1:])
            total += loss.double() * window.shape[0]
    model.train(was_training)
    return (total / n_windows).item(), n_windows * context
