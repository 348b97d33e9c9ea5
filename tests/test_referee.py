"""The exactness referee's ruling: which logit gaps rounding in the engine's dtype can explain."""

from __future__ import annotations

import pytest
import torch

from paradec.bench.referee import TIE_ULPS, logits_dtype, rule, tolerance


def logits(*top: float) -> torch.Tensor:
    out = torch.full((16,), -5.0)
    out[: len(top)] = torch.tensor(top)
    return out


@pytest.mark.parametrize(
    ("engine_dtype", "values", "tokens", "near_tie"),
    [
        # bf16 epsilon 2^-7: at a top logit of 10 the tolerance is 2 * 2^-7 * 10 = 0.156
        (torch.bfloat16, (10.0, 9.9), (0, 1), True),
        (torch.bfloat16, (10.0, 9.9), (1, 0), True),  # vanilla's bf16 pick was the runner-up: still rounding
        (torch.bfloat16, (10.0, 9.8), (0, 1), False),
        (torch.bfloat16, (10.0, 9.9, 9.95), (1, 2), True),  # both within the tolerance of the best
        (torch.bfloat16, (10.0, 9.9), (0, 5), False),  # the method's token is far down: a bug, not rounding
        (torch.float16, (10.0, 9.97), (0, 1), False),  # fp16 epsilon 2^-10: tolerance 0.0195
        (torch.float16, (10.0, 9.985), (0, 1), True),
        (torch.float32, (10.0, 9.9999), (0, 1), False),
        (torch.bfloat16, (0.01, 0.0), (0, 1), True),  # small logits: the scale is at least 1 (tolerance 0.0156)
    ],
)
def test_ruling(engine_dtype, values, tokens, near_tie):
    ruling = rule(logits(*values), *tokens, engine_dtype)
    assert ruling.near_tie is near_tie
    assert ruling.vanilla_logit == pytest.approx(logits(*values)[tokens[0]].item())
    assert ruling.top_logit == pytest.approx(max(values))
    assert str(ruling.vanilla_token) in ruling.text() and str(ruling.method_token) in ruling.text()


def test_tolerance_and_reference_precision():
    assert tolerance(10.0, torch.bfloat16) == pytest.approx(TIE_ULPS * 2**-7 * 10)
    assert tolerance(-20.0, torch.bfloat16) == pytest.approx(TIE_ULPS * 2**-7 * 20)
    assert tolerance(0.0, torch.float16) == pytest.approx(TIE_ULPS * 2**-10)
    assert logits_dtype(torch.bfloat16) == logits_dtype(torch.float16) == torch.float32
    assert logits_dtype(torch.float32) == torch.float64
    assert rule(logits(1.0, 0.5), 0, 1, torch.bfloat16).reference_dtype == "float32"
