"""Spec-Bench-style benchmarking of paradec's methods next to Hugging Face peers (`paradec bench`).

- `prompts`  prompt sets: JSONL loaders (HumanEval `prompt` / Spec-Bench `turns`) and the built-in suites;
- `harness`  runs every method and peer with warm-up, synchronised timing and the greedy exactness check;
- `peers`    the Hugging Face `generate` peers (vanilla, assisted generation, prompt lookup);
- `metrics`  the arithmetic: tokens/s, speedup over our own vanilla, τ, acceptance by position;
- `report`   results.json, results.md and the PNG plots;
- `cli`      the `paradec bench` sub-command.
"""
