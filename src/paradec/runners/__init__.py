"""Runner selection: `auto` takes the native fast path for the Llama family, the generic HF runner otherwise."""

from __future__ import annotations

from pathlib import Path

import torch

from paradec.errors import ParadecError
from paradec.loading import read_config
from paradec.runners.base import Runner, RunnerOutput, prefill
from paradec.runners.hf import HFRunner

RUNNER_KINDS = ("auto", "native", "hf")

__all__ = ["RUNNER_KINDS", "HFRunner", "Runner", "RunnerOutput", "load_runner", "prefill"]


def load_runner(
    path: Path, kind: str, device: torch.device, dtype: torch.dtype, exact: bool = False, tensor_parallel=None
) -> Runner:
    """Load the checkpoint at `path` into a runner of `kind` (auto | native | hf); `exact`: the native runner's
    batch-invariant kernels (`NativeRunner.from_pretrained`), an error where the checkpoint needs the HF runner."""
    if kind not in RUNNER_KINDS:
        raise ParadecError(f"unknown runner {kind!r} (choose from {', '.join(RUNNER_KINDS)})")
    config = read_config(path)
    if kind in ("auto", "native"):
        from paradec.runners import native

        reason = native.unsupported_reason(config)
        if reason is None:
            return native.NativeRunner.from_pretrained(
                path, device=device, dtype=dtype, exact=exact, tensor_parallel=tensor_parallel
            )
        if kind == "native" or exact or tensor_parallel is not None:
            need = "exact=True needs the native runner; use exact=False, --no-exact" if exact else "use --runner hf"
            if tensor_parallel is not None:
                need = "tensor parallelism needs the native runner"
            raise ParadecError(f"the native runner cannot run {str(path)!r}: {reason} ({need})")
    elif exact or tensor_parallel is not None:
        what = "exact=True" if exact else "tensor parallelism"
        raise ParadecError(f"{what} needs the native runner (runner 'native' or 'auto'), not 'hf'")
    return HFRunner(load_hf_model(path, device, dtype))


def load_hf_model(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # paradec reports its own progress; keep stderr for the stats line
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:
        raise ParadecError(f"cannot load a causal LM from {str(path)!r}: {exc}") from exc
    return model.to(device).eval()
