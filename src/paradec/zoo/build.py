"""Building a zoo pair: corpus -> tokenizer -> token arrays -> target and draft -> Hugging Face directories + cards.

Layout of a built pair (`paradec zoo build --out DIR`, or the cache `~/.cache/paradec/zoo/<preset>-<hash>/`):

    DIR/target/  config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json card.json
    DIR/draft/   the same files

Tokenizers and token arrays are cached under `~/.cache/paradec/zoo/data/<key>/` keyed by the corpus fingerprint
and the vocabulary size, so a second preset or a rebuild on a warm machine skips BPE training and encoding.
Each model directory is written under a temporary name and renamed into place, so a reader never sees half a
model. `PARADEC_CACHE` overrides the cache root `~/.cache/paradec`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from paradec.errors import ParadecError
from paradec.zoo import cache_root, dev_prompts_path
from paradec.zoo.corpus import Corpus, load_corpus
from paradec.zoo.model import ZooLlama, save_hf
from paradec.zoo.presets import BENCH, ModelShape, Preset, TrainPlan
from paradec.zoo.prompts import build_dev_prompts, load_prompts
from paradec.zoo.quality import LOOP_DEFINITION, greedy_continuations, loop_rate
from paradec.zoo.tokenizer import encode_files, save_tokenizer, train_tokenizer, training_sample
from paradec.zoo.train import evaluate, to_device_tokens, train


def preset_cache_dir(preset: Preset) -> Path:
    return cache_root() / "zoo" / f"{preset.name}-{preset.config_hash()}"


def _log(message: str) -> None:
    tqdm.write(f"[zoo] {message}", file=sys.stderr)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParadecError(f"unknown device {device!r}; use cuda, cuda:N or cpu") from exc
    if dev.type not in ("cuda", "cpu"):
        raise ParadecError(f"unsupported device {device!r}; use cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParadecError(f"device {device!r} was asked for but CUDA is not available here")
    return dev


@dataclass
class TokenData:
    tokenizer_dir: Path  # tokenizer.json + tokenizer_config.json
    train: np.ndarray  # flat token ids, [EOT] + file tokens per file
    val: np.ndarray
    stats: dict


def prepare_tokens(corpus: Corpus, preset: Preset, *, progress: bool = True) -> TokenData:
    """Train (or reuse) the BPE tokenizer for this corpus and vocabulary size, and encode both splits."""
    key = hashlib.sha1(
        json.dumps(
            [corpus.digest, preset.vocab_size, preset.tokenizer_sample_chars, preset.split_pattern, preset.context]
        ).encode()
    ).hexdigest()[:16]
    cache = cache_root() / "zoo" / "data" / key
    if (cache / "stats.json").exists():
        _log(f"reusing tokenizer and token arrays from {cache}")
        return TokenData(
            cache,
            np.load(cache / "train.npy"),
            np.load(cache / "val.npy"),
            json.loads((cache / "stats.json").read_text()),
        )
    tmp = cache.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    sample = training_sample(corpus.train, preset.tokenizer_sample_chars)
    _log(f"training BPE tokenizer (vocab {preset.vocab_size}) on {sum(map(len, sample)) / 1e6:.1f}M chars")
    tok = train_tokenizer(sample, preset.vocab_size, preset.split_pattern)
    t1 = time.perf_counter()
    save_tokenizer(tok, tmp, preset.context)
    train_ids = encode_files(tok, corpus.train, desc="encoding train", progress=progress)
    val_ids = encode_files(tok, corpus.val, desc="encoding val", progress=progress)
    t2 = time.perf_counter()
    stats = {
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "chars_per_token": round(
            (corpus.stats["train_chars"] + corpus.stats["val_chars"]) / (train_ids.size + val_ids.size), 3
        ),
        "tokenizer_seconds": round(t1 - t0, 1),
        "encode_seconds": round(t2 - t1, 1),
    }
    np.save(tmp / "train.npy", train_ids)
    np.save(tmp / "val.npy", val_ids)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    _log(f"tokens: {stats}")
    return TokenData(cache, train_ids, val_ids, stats)


def _versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"


@dataclass
class ModelReport:
    role: str
    parameters: int
    steps: int
    tokens_seen: int
    seconds: float
    tokens_per_second: float
    train_loss: float
    val_loss: float
    val_tokens_scored: int
    loop_rate: float | None


def _train_one(
    role: str,
    shape: ModelShape,
    plan: TrainPlan,
    preset: Preset,
    data: TokenData,
    train_t: torch.Tensor,
    val_t: torch.Tensor,
    out_dir: Path,
    device: torch.device,
    prompts: list[str],
    progress: bool,
) -> ModelReport:
    seed = preset.seed + (0 if role == "target" else 1)
    torch.manual_seed(seed)
    model = ZooLlama(shape, preset.vocab_size, preset.context, preset.rope_theta).to(device)
    n_params = model.num_parameters()
    _log(f"{preset.name} {role}: {n_params / 1e6:.2f}M parameters, {shape}")
    seconds = None if preset.seconds is None else preset.seconds * plan.time_share
    result = train(
        model,
        train_t,
        plan,
        seconds=seconds,
        seed=seed,
        compile=device.type == "cuda",
        desc=f"{preset.name} {role}",
        progress=progress,
    )
    val_loss, scored = evaluate(model, val_t, max_tokens=preset.val_tokens, micro_batch=plan.micro_batch)
    _log(
        f"{preset.name} {role}: {result.steps} steps, {result.tokens_seen / 1e6:.1f}M tokens in {result.seconds:.0f} s "
        f"({result.tokens_per_second / 1e3:.0f}k tokens/s), train loss {result.train_loss:.3f}, val loss {val_loss:.4f}"
    )
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp, preset.save_dtype)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(data.tokenizer_dir / name, tmp / name)
    del model
    rate = None
    if prompts:
        continuations = greedy_continuations(
            tmp,
            prompts,
            new_tokens=preset.loop_new_tokens,
            device=device,
            batch_size=preset.loop_batch,
            progress=progress,
        )
        rate = loop_rate(continuations)
        _log(f"{preset.name} {role}: verbatim-loop rate {rate:.3f} over {len(prompts)} dev prompts")
        sample = AutoTokenizer.from_pretrained(str(tmp)).decode(continuations[0], skip_special_tokens=True)
        _log(f"{preset.name} {role}: greedy sample\n{prompts[0]}{sample}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return ModelReport(
        role=role,
        parameters=n_params,
        steps=result.steps,
        tokens_seen=result.tokens_seen,
        seconds=result.seconds,
        tokens_per_second=result.tokens_per_second,
        train_loss=result.train_loss,
        val_loss=val_loss,
        val_tokens_scored=scored,
        loop_rate=rate,
    )


def _card(preset: Preset, report: ModelReport, shape: ModelShape, plan: TrainPlan, extra: dict) -> dict:
    return {
        "preset": preset.name,
        "role": report.role,
        "architecture": "LlamaForCausalLM",
        "parameters": report.parameters,
        "shape": asdict(shape),
        "vocab_size": preset.vocab_size,
        "context": preset.context,
        "dtype": preset.save_dtype,
        "tokens_seen": report.tokens_seen,
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "tokens_per_second": round(report.tokens_per_second),
        "train_loss": round(report.train_loss, 4),
        "val_loss": round(report.val_loss, 4),
        "val_loss_unit": "nats/token",
        "val_tokens_scored": report.val_tokens_scored,
        "loop_rate": None if report.loop_rate is None else round(report.loop_rate, 4),
        "loop_definition": LOOP_DEFINITION,
        "train": asdict(plan),
        "seed": preset.seed,
        "time_budget_seconds": preset.seconds,
        "config_hash": preset.config_hash(),
        **extra,
    }


def build_pair(
    preset: Preset,
    out_dir: Path,
    *,
    device: str | torch.device | None = None,
    roots: list[Path] | None = None,
    prompts_path: Path | None = None,
    loop_prompts: int = 120,
    command: str = "",
    progress: bool = True,
) -> tuple[Path, Path]:
    """Build `preset`'s target and draft into out_dir/target and out_dir/draft; returns the two directories.

    The repetition-loop rate is measured on up to `loop_prompts` dev prompts: those in `prompts_path` when given,
    else ones built from this corpus's validation files.
    """
    dev = resolve_device(str(device) if device is not None else None)
    started = time.perf_counter()
    corpus = load_corpus(
        roots, max_chars=preset.max_corpus_chars, val_per_mille=preset.val_per_mille, progress=progress
    )
    stats = corpus.stats
    _log(
        f"corpus: {stats['files']} files, {stats['chars'] / 1e6:.1f}M chars "
        f"({stats['train_files']} train / {stats['val_files']} validation files)"
    )
    data = prepare_tokens(corpus, preset, progress=progress)
    records = load_prompts(prompts_path) if prompts_path is not None else build_dev_prompts(corpus)
    prompts = [r["prompt"] for r in records[:loop_prompts]]
    train_t = to_device_tokens(data.train, dev)
    val_t = to_device_tokens(data.val, dev)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    for role, shape, plan in (
        ("target", preset.target, preset.target_plan),
        ("draft", preset.draft, preset.draft_plan),
    ):
        reports[role] = _train_one(
            role, shape, plan, preset, data, train_t, val_t, out_dir / role, dev, prompts, progress
        )
    if reports["target"].val_loss > reports["draft"].val_loss - 0.1:
        _log(
            f"warning: the {preset.name} target is not clearly better than its draft on validation data "
            f"({reports['target'].val_loss:.4f} vs {reports['draft'].val_loss:.4f} nats/token); train it for longer"
        )
    extra = {
        "corpus": {**corpus.stats, **data.stats, "digest": corpus.digest},
        "pair": {role: {"parameters": r.parameters, "val_loss": round(r.val_loss, 4)} for role, r in reports.items()},
        "loop_prompts": len(prompts),
        "device": _device_name(dev),
        "build_seconds": round(time.perf_counter() - started, 1),
        "command": command,
        "script": "src/paradec/zoo/build.py (paradec.zoo.build.build_pair)",
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for role, shape, plan in (
        ("target", preset.target, preset.target_plan),
        ("draft", preset.draft, preset.draft_plan),
    ):
        card = _card(preset, reports[role], shape, plan, extra)
        (out_dir / role / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    _log(f"built {preset.name} pair in {extra['build_seconds']} s -> {out_dir}")
    return out_dir / "target", out_dir / "draft"


def ensure_bench_pair(
    device: str = "cuda",
    *,
    seconds: float | None = None,
    roots: list[Path] | None = None,
    progress: bool = True,
) -> tuple[Path, Path]:
    """The cached bench pair `~/.cache/paradec/zoo/bench-<config hash>/{target,draft}`, built first if missing."""
    preset = BENCH.with_options(seconds=seconds)
    out = preset_cache_dir(preset)
    target, draft = out / "target", out / "draft"
    if (target / "card.json").exists() and (draft / "card.json").exists():
        return target, draft
    committed = dev_prompts_path()
    return build_pair(
        preset,
        out,
        device=device,
        roots=roots,
        prompts_path=committed if committed.exists() else None,
        command=f"paradec.zoo.ensure_bench_pair(device={device!r}, seconds={seconds!r})",
        progress=progress,
    )
