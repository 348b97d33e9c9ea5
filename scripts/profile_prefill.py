"""What feeding joining prompts costs on the batched runner (not a test): random weights of a real shape
(`bench_runner.SHAPES`), compiled and with static buckets as the engine builds them on CUDA. For each case, each
chunk fed alone (`SlotRunner`: a chunk that fits the buckets replays a CUDA graph once captured, a longer one runs
unbucketed) against every chunk of the wave in one unbucketed forward (`BatchedNativeRunner.prefill`). Reports the
first call of each (compilation, capture) and the median of the timed repeats, synchronised.

    PYTHONPATH=src python3 scripts/profile_prefill.py --shape q15 --out $OUT/prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import hf_model, llama_config, native_from_hf

from paradec.runners.base import prefill
from paradec.runners.native import BatchedNativeRunner

CASES = ((1, 80), (4, 80), (16, 80), (32, 60), (2, 300), (4, 300))  # (sequences joining together, chunk tokens)
# `--kinds`: waves of one forward each, in this order, as (first slot, chunk tokens per sequence, slots reversed): the
# first three are what a serving warm-up runs (`BatchDecoder._warm_prefill`: a long chunk alone, a gathered wave of
# three; then, from the warm-up's batches of more than 8, waves of equal chunks over slots 0 .. B-1); the others
# are waves a running batch meets, each timed at its first call (a compilation shows as seconds)
KINDS = (
    (0, (136,), False),
    (0, (136, 136, 136), True),
    (0, (72,) * 12, False),
    (0, (72,) * 16, False),
    (5, (150, 60), False),
    (5, (150, 60), True),
    (3, (40, 130, 7, 90), False),
    (9, (200, 33, 64), True),
    (0, (150, 60), False),
    (20, (1, 1), False),
    (20, (1, 1), True),
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="q15")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--kinds", action="store_true", help="time the first call of each wave of KINDS instead")
    opts = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = llama_config(opts.shape, max_positions=4096)
    model = hf_model(config, torch.bfloat16 if cuda else torch.float32, device)
    runner = native_from_hf(model, compile=cuda, static_shapes=cuda)
    del model
    batched = BatchedNativeRunner.sharing(runner, 32)
    vocab = config.vocab_size
    if opts.kinds:
        return kinds(batched, vocab, opts)
    results = []
    for sequences, n in CASES:
        chains = [torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(s)).tolist()
                  for s in range(sequences)]  # fmt: skip
        slots = [batched.allocate() for _ in range(sequences)]
        slots = slots[::-1]  # not 0..B-1 in order: the gathered kind of step, as joiners meet in a running batch

        def alone(slots=slots, chains=chains):
            for slot, ids in zip(slots, chains):
                prefill(batched.view(slot), torch.tensor(ids, device=device))

        def together(slots=slots, chains=chains):
            batched.prefill(list(zip(slots, chains)))

        row = {"sequences": sequences, "tokens": n}
        for name, fn in (("alone", alone), ("together", together)):
            times = []
            for _ in range(opts.repeats + 2):
                for slot in slots:
                    batched.rollback(slot, 0)
                times.append(timed(fn))
            row[f"{name}_first_ms"] = 1e3 * times[0]
            row[f"{name}_ms"] = 1e3 * statistics.median(times[2:])
        for slot in slots:
            batched.release(slot)
        row["graphs"] = batched.graphs_captured
        results.append(row)
        print(json.dumps(row), flush=True)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps({"shape": opts.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
                                        "cases": results}, indent=1))  # fmt: skip


def kinds(batched: BatchedNativeRunner, vocab: int, opts) -> None:
    """The first and second call of each wave of KINDS, in order, on one runner (slots 0 .. 31 allocated)."""
    slots = [batched.allocate() for _ in range(32)]
    assert slots == list(range(32))
    results = []
    for first, sizes, reverse in KINDS:
        wave = list(range(first, first + len(sizes)))[:: -1 if reverse else 1]
        chains = [[(7 + 13 * i + 101 * s) % vocab for i in range(n)] for s, n in zip(wave, sizes)]
        times = []
        for _ in range(2):
            times.append(timed(lambda wave=wave, chains=chains: batched.prefill(list(zip(wave, chains)))))
            for slot in wave:
                batched.rollback(slot, 0)
        row = {"slots": wave, "sizes": list(sizes), "first_ms": 1e3 * times[0], "second_ms": 1e3 * times[1]}
        results.append(row)
        print(json.dumps(row), flush=True)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        opts.out.write_text(json.dumps({"shape": opts.shape, "device": device, "kinds": results}, indent=1))


if __name__ == "__main__":
    main()
