"""The batch's speculation policy against its alternatives (not a test): B prompts decoded as one batch by
`Engine.batch_decoder` with each policy, tokens per second over the whole batch, and how the steps went (plain,
speculating as the drafters propose, or cut to a depth). Policies: `never`, `always`, `auto` (on/off and depth
cuts, `SpeculationPolicy.cap`) and `auto-uncut` (auto's on/off alone, the policy before the cuts). Every policy's
outputs must equal `never`'s (greedy): the script checks.

    python scripts/bench_policy.py --model code-8m --batch 8 --batch 32 --method pld --new-tokens 64 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch
from profile_batch_host import prompts as code_prompts  # this folder: the same code prompts, cycled

import paradec
from paradec.batch import SpeculationPolicy


class Counting(SpeculationPolicy):
    """A policy that counts its decisions: plain steps, uncut speculative ones, and cuts by depth."""

    def __init__(self, mode: str, cuts: bool = True) -> None:
        super().__init__(mode)
        self.cuts, self.decisions = cuts, {}

    def speculate(self, taus, proposed, **kw) -> bool:
        on = super().speculate(taus, proposed, **kw)
        if not on:
            self._count("plain")
        return on

    def cap(self, taus, proposed, depths):
        depth = super().cap(taus, proposed, depths) if self.cuts else None
        self._count("uncut" if depth is None else f"depth {depth}")
        return depth

    def _count(self, key: str) -> None:
        self.decisions[key] = self.decisions.get(key, 0) + 1


def decode(engine, prompts: list[str], method: str, new_tokens: int, policy: Counting):
    decoder = engine.batch_decoder(len(prompts))
    decoder.policy = policy
    items = [decoder.submit(engine.request(p, method=method, max_new_tokens=new_tokens)) for p in prompts]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in decoder.run(items):
        pass
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    outputs = [it.result.token_ids for it in items]
    return outputs, sum(len(o) for o in outputs) / seconds, decoder.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="code-8m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, action="append", help="repeatable (default 8 and 32)")
    parser.add_argument("--method", action="append", help="repeatable (default pld)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--exact", action="store_true", help="the batch-invariant kernels: outputs must be bitwise equal"
    )
    args = parser.parse_args()
    engine = paradec.load(args.model, device=args.device, exact=args.exact)
    print("| method | batch | policy | tok/s | vs never | decisions | steps by kind |")
    print("|---|---:|---|---:|---:|---|---|")
    for method in args.method or ["pld"]:
        for batch in args.batch or [8, 32]:
            prompts = code_prompts(batch)
            decode(engine, prompts, method, args.new_tokens, Counting("always"))  # warm-up: every shape met
            reference, base, _ = decode(engine, prompts, method, args.new_tokens, Counting("never"))
            for name, policy in (
                ("never", Counting("never")),
                ("always", Counting("always")),
                ("auto-uncut", Counting("auto", cuts=False)),
                ("auto", Counting("auto")),
            ):
                outputs, rate, counts = decode(engine, prompts, method, args.new_tokens, policy)
                differ = sum(a != b for a, b in zip(outputs, reference, strict=True))
                if differ and (args.exact or engine.target.dtype == torch.float32):
                    raise SystemExit(f"{method} at batch {batch} with policy {name}: outputs differ from never's")
                steps = ", ".join(f"{k} {v}" for k, v in sorted(policy.decisions.items()))
                kinds = ", ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in vars(counts).items()
                )
                note = f" ({differ} outputs differ: bf16 rounding across step shapes)" if differ else ""
                print(
                    f"| {method} | {batch} | {name} | {rate:.1f} | {rate / base:.2f}x | {steps} | {kinds}{note} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
