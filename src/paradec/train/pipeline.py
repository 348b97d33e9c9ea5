"""One `paradec train <kind>` run: target -> self-distilled data -> training -> validation -> saved output + card.

The data (`paradec.train.data`): self-chat for a target with a chat template (the target writes its requests,
`paradec.train.selfchat`, then answers them), else windows of the Python source on this machine, or `--data chat`,
or a data file; the target answers greedily, a share of the windows sampled (`DataSettings.answer_sampling`).

Outputs go to `OUT/<kind>/` (OUT defaults to `<model dir>/heads`, where `paradec.load(model)` looks for heads):
`medusa/` and `eagle/` are heads directories (`paradec.heads`), `draft/` a Hugging Face checkpoint usable as
`--draft`. Each carries a `card.json`: data (with self-chat: requests written, kept and dropped per filter, the
dev-suite overlap check, system prompts, temperatures, seconds), steps, seconds, device, validation accuracy per
head/level, and the validation acceptance the method reaches with the engine (τ and acceptance by position over
held-out prompts).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from paradec.config import EngineConfig
from paradec.errors import ParadecError
from paradec.heads import EagleConfig, EagleHead, MedusaConfig, MedusaHeads, save_heads
from paradec.heads.eagle import default_feature_layers
from paradec.heads.medusa import best_tree
from paradec.loading import DTYPES, load_tokenizer, read_config, resolve_device, resolve_dtype, resolve_model_dir
from paradec.runners import HFRunner, load_hf_model
from paradec.train.data import (
    CHAT_MODES,
    PYTHON_SOURCE_DATA,
    SELF_CHAT_DATA,
    DistillData,
    data_source,
    read_texts,
    target_windows,
    with_features,
)
from paradec.train.draft import draft_accuracy, draft_loss
from paradec.train.eagle import (
    continuation_mask,
    default_draft_vocab,
    draft_vocab_coverage,
    eagle_accuracy,
    eagle_loss,
    frequent_tokens,
)
from paradec.train.loop import FitResult, TrainSettings, autocast, device_name, fit
from paradec.train.medusa import medusa_accuracy, medusa_loss
from paradec.train.pard import (
    choose_mask_token,
    init_mask_embedding,
    many_splits,
    parallel_agreement,
    pard_accuracy,
    pard_loss,
    splits,
)
from paradec.train.selfchat import SelfChatSettings, self_chat_texts

KINDS = ("medusa", "eagle", "draft", "pard")
DEFAULT_STEPS = {"medusa": 1000, "eagle": 3000, "draft": 1000, "pard": 1000}
# PARD: the whole draft is fine-tuned. At 3e-4 (H200, 2026-12-02) its first position lost top-1 agreement (0.67 ->
# 0.52) and 39 of 1,500 steps were non-finite; PARD's own Qwen2.5-0.5B recipe uses 3e-5 over 4 epochs of a large
# set (AMD-AGI/PARD, config/train/example_qwen.yaml). 5e-5 for our ~1,000 steps: not yet measured.
DEFAULT_LR = {"medusa": 3e-3, "eagle": 3e-3, "draft": 3e-4, "pard": 5e-5}
# PARD: the least share of mask outputs whose top-1 token the parallel layout and single-split rows must share (in
# bf16 the two differ by rounding: a near-tie may flip; a layout the backend mishandles agrees on few)
PARALLEL_AGREEMENT = 0.9
DRAFT_KINDS = ("draft", "pard")  # the kinds that train a draft model (--draft)
ANSWER_TEMPERATURE = 1.0  # the temperature of the sampled answers, unless given
SELF_CHAT_SAMPLED_SHARE = 0.25  # with self-chat, this share of the answers is sampled, unless given


@dataclass(frozen=True)
class DataSettings:
    # prompt source: "self-chat", "chat" (the packaged chat prompts), "python-source" or a file; None: self-chat for
    # a target with a chat template, else python-source (`paradec.train.data.data_source`)
    data: str | Path | None = None
    chat: str = "auto"  # render chats (and prompts) with the target's chat template: auto, on or off
    keep_responses: bool = False  # a data file's assistant turns are kept (teacher forcing), not rewritten
    sequences: int = 2048  # training windows, each continued by the target (self-distillation)
    val_sequences: int = 64  # validation windows (accuracies)
    prompt_len: int = 128  # text tokens per window
    new_tokens: int = 192  # tokens the target adds to each window (0: train on the text windows alone)
    temperature: float | None = None  # of the sampled answers (None: ANSWER_TEMPERATURE); 0: all answers greedy
    sampled_share: float | None = None  # share of sampled answers; None: see `answer_sampling`
    self_chat: SelfChatSettings = field(default_factory=SelfChatSettings)
    max_corpus_chars: int = 40_000_000
    batch_size: int = 256  # windows per generate / feature batch
    # reuse the windows an earlier run made with the same target, data settings and seed (`DATA_CACHE` next to the
    # kind's output): training a second kind on the same data skips the generation
    reuse: bool = True

    def __post_init__(self) -> None:
        flags = {"sequences": "self-distill", "val_sequences": "val-sequences", "prompt_len": "prompt-len"}
        for name, flag in {**flags, "batch_size": "gen-batch-size"}.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParadecError(f"{flag} must be an integer >= 1, got {value!r}")
        if not isinstance(self.new_tokens, int) or self.new_tokens < 0:
            raise ParadecError(f"new-tokens must be an integer >= 0, got {self.new_tokens!r}")
        if self.prompt_len + self.new_tokens < 4:
            raise ParadecError(f"windows of {self.prompt_len + self.new_tokens} tokens are too short (need >= 4)")
        if self.temperature is not None and not self.temperature >= 0:
            raise ParadecError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.sampled_share is not None and not 0 <= self.sampled_share <= 1:
            raise ParadecError(f"sampled-share must be in [0, 1], got {self.sampled_share!r}")
        if self.temperature == 0 and self.sampled_share:
            raise ParadecError(f"sampled-share {self.sampled_share} needs a temperature > 0, got 0")
        if self.chat not in CHAT_MODES:
            raise ParadecError(f"chat must be one of {', '.join(CHAT_MODES)}, got {self.chat!r}")
        if self.keep_responses and self.new_tokens == 0:
            raise ParadecError(
                "--keep-responses needs --new-tokens >= 1: the tokens of the given answers each window holds"
            )

    def answer_sampling(self, source: str | Path) -> tuple[float, float]:
        """(sampled share, temperature) of the target's answers for `source`: temperature 0 is all greedy; a
        temperature alone (> 0) samples all of them (a share alone samples it at ANSWER_TEMPERATURE); neither
        samples SELF_CHAT_SAMPLED_SHARE of the self-chat answers and none of the others."""
        if self.temperature == 0:
            return 0.0, 0.0
        temperature = ANSWER_TEMPERATURE if self.temperature is None else self.temperature
        if self.sampled_share is not None:
            return self.sampled_share, temperature
        if self.temperature is not None:
            return 1.0, temperature
        return (SELF_CHAT_SAMPLED_SHARE if str(source) == SELF_CHAT_DATA else 0.0), temperature


@dataclass(frozen=True)
class HeadSettings:
    medusa_heads: int = 4  # Medusa: number of heads (tree depth)
    tree_nodes: int = 64  # Medusa: nodes of the static tree
    tree_ranks: int = 8  # Medusa: candidates per head the tree may use
    passes: int = 3  # EAGLE: unrolled draft levels per training step
    reg_weight: float = 1.0  # EAGLE: weight of the hidden-state regression next to the KL term
    intermediate_size: int | None = None  # EAGLE: MLP width (default ~2.75x hidden)
    # EAGLE: draft vocabulary size; None: `default_draft_vocab` of the target's; 0 (or >= the target's): the whole one
    draft_vocab: int | None = None
    # EAGLE: the target layers fused into the head's feature (EAGLE-3): "auto" (`default_feature_layers`), layer
    # indices, or None (the last hidden state, EAGLE-1/2)
    feature_layers: str | tuple[int, ...] | None = "auto"
    pard_k: int = 8  # PARD: tokens the draft predicts from one forward (the last real token and k - 1 masks)
    # PARD: splits of a window trained in one forward (`paradec.train.pard.parallel_batch`); 1: `pard_batch`'s rows
    pard_splits: int = 16

    def __post_init__(self) -> None:
        for name in ("medusa_heads", "tree_nodes", "tree_ranks", "passes", "pard_k", "pard_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParadecError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.draft_vocab is not None and not (isinstance(self.draft_vocab, int) and self.draft_vocab >= 0):
            raise ParadecError(f"draft-vocab must be an integer >= 0, got {self.draft_vocab!r}")
        layers = self.feature_layers
        if not (layers is None or layers == "auto" or (isinstance(layers, tuple) and layers)):
            raise ParadecError(f"feature-layers must be auto, none or layer indices, got {layers!r}")

    def feature_layers_for(self, num_layers: int) -> tuple[int, ...] | None:
        """The EAGLE head's fused layers for a target of `num_layers` decoder layers (None: the last hidden state),
        checked: each an output `transformers` hands out, [0, num_layers - 1)."""
        layers = default_feature_layers(num_layers) if self.feature_layers == "auto" else self.feature_layers
        if layers is not None and not all(isinstance(i, int) and 0 <= i < num_layers - 1 for i in layers):
            raise ParadecError(
                f"feature-layers {list(layers)}: the target has {num_layers} layers; fuse outputs of layers "
                f"[0, {num_layers - 1}) (the last one's is read only after the final norm)"
            )
        return layers

    def draft_vocab_for(self, vocab_size: int) -> int | None:
        """The EAGLE head's draft vocabulary size for a target of `vocab_size` tokens (None: the whole vocabulary)."""
        size = default_draft_vocab(vocab_size) if self.draft_vocab is None else self.draft_vocab
        return size if size and size < vocab_size else None


@dataclass
class Target:
    path: Path
    model: torch.nn.Module  # the Hugging Face causal LM, frozen
    tokenizer: object
    eos_token_ids: list[int]
    embed: torch.Tensor  # [V, H]
    lm_head: torch.Tensor  # [V, H]


def _log(message: str) -> None:
    tqdm.write(f"[train] {message}", file=sys.stderr)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def load_target(model: str | Path | None, device: torch.device, dtype: torch.dtype) -> Target:
    """The target named by `model` (None = `paradec.zoo.DEFAULT_MODEL`, fetched on first use), frozen."""
    from paradec import zoo

    path = resolve_model_dir(zoo.DEFAULT_MODEL if model is None else model, "model")
    tokenizer = load_tokenizer(path)
    hf = load_hf_model(path, device, dtype).requires_grad_(False)
    return Target(
        path=path,
        model=hf,
        tokenizer=tokenizer,
        eos_token_ids=_eos_ids(hf, tokenizer),
        embed=hf.get_input_embeddings().weight,
        lm_head=hf.get_output_embeddings().weight,
    )


def validation_acceptance(
    target: Target,
    prompts: list[list[int]],
    method: str,
    *,
    heads_dir: Path | None = None,
    draft: torch.nn.Module | None = None,
    new_tokens: int = 128,
) -> dict:
    """τ and acceptance by position of greedy `method` over `prompts` (the engine on the in-memory target)."""
    from paradec.engine import Engine

    config = EngineConfig(model=str(target.path), heads=None if heads_dir is None else str(heads_dir))
    engine = Engine(
        HFRunner(target.model),
        target.tokenizer,
        config,
        draft=None if draft is None else HFRunner(draft),
        heads_dir=heads_dir,
        eos_token_ids=set(target.eos_token_ids),
    )
    steps = emitted = 0
    accepted_at: list[int] = []
    for prompt in prompts:
        stats = engine.generate(prompt, method=method, max_new_tokens=new_tokens).stats
        steps += stats.steps
        emitted += stats.new_tokens
        accepted_at.extend([0] * (len(stats.accepted_at) - len(accepted_at)))
        for i, count in enumerate(stats.accepted_at):
            accepted_at[i] += count
    return {
        "method": method,
        "prompts": len(prompts),
        "max_new_tokens": new_tokens,
        "tau": round(emitted / max(steps, 1), 4),
        "acceptance_by_position": [round(a / max(steps, 1), 4) for a in accepted_at],
    }


@dataclass
class Job:
    target: Target
    train_data: DistillData
    val_data: DistillData
    settings: TrainSettings
    heads: HeadSettings
    device: torch.device
    out_dir: Path
    draft_path: Path | None
    prompts: list[list[int]]  # held-out prompts for the validation acceptance
    val_new_tokens: int
    progress: bool

    def acceptance(self, method: str, **kwargs) -> dict:
        return validation_acceptance(self.target, self.prompts, method, new_tokens=self.val_new_tokens, **kwargs)

    def autocast(self):
        return autocast(self.device, self.target.model.dtype)

    def fit(self, params, loss, desc: str) -> FitResult:
        return fit(
            params,
            loss,
            len(self.train_data),
            self.settings,
            self.device,
            target_dtype=self.target.model.dtype,
            desc=desc,
            progress=self.progress,
        )


def _windows_as_prompts(data: DistillData, prompt_len: int, count: int) -> list[list[int]]:
    return data.tokens[:count, :prompt_len].tolist()


def run(
    kind: str,
    *,
    model: str | Path | None = None,
    draft: str | Path | None = None,
    out: str | Path | None = None,
    data: DataSettings = DataSettings(),
    train: TrainSettings | None = None,
    heads: HeadSettings = HeadSettings(),
    device: str = "auto",
    dtype: str = "auto",
    val_prompts: int = 16,
    val_new_tokens: int = 128,
    progress: bool = True,
    command: str = "",
) -> Path:
    """Train a drafter of `kind` for `model`; returns the output directory (`OUT/<kind>`)."""
    if kind not in KINDS:
        raise ParadecError(f"unknown training kind {kind!r} (choose from {', '.join(KINDS)})")
    started = time.perf_counter()
    dev = resolve_device(device)
    target = load_target(model, dev, resolve_dtype(dtype, dev))
    train = train or TrainSettings(steps=DEFAULT_STEPS[kind], lr=DEFAULT_LR[kind])
    out_dir = (Path(out) if out is not None else target.path / "heads") / kind
    draft_path = _draft_path(kind, target.path, draft)
    torch.manual_seed(train.seed)

    source = data_source(data.data, target.tokenizer, data.chat)
    sampled_share, temperature = data.answer_sampling(source)
    text_config = target.model.config.get_text_config(decoder=True)
    num_layers = int(getattr(text_config, "num_hidden_layers", 0) or getattr(text_config, "n_layer", 0))
    feature_layers = heads.feature_layers_for(num_layers) if kind == "eagle" else None
    windows = _windows(target, source, data, train.seed, sampled_share, temperature, out_dir.parent, progress)
    train_data, val_data = (
        with_features(
            target.model,
            *windows[part],
            feature_layers=feature_layers,
            batch_size=data.batch_size,
            progress=progress,
        )
        for part in ("train", "validation")
    )
    _log(f"training data: {train_data.stats}")
    if feature_layers is not None:
        _log(f"eagle: fusing the outputs of target layers {list(feature_layers)} (EAGLE-3)")
    prompts = _windows_as_prompts(val_data, data.prompt_len, val_prompts)

    job = Job(target, train_data, val_data, train, heads, dev, out_dir, draft_path, prompts, val_new_tokens, progress)
    trainers = {"medusa": _train_medusa, "eagle": _train_eagle, "draft": _train_draft, "pard": _train_pard}
    report = trainers[kind](job)
    _log(f"{kind}: validation acceptance {report['validation_acceptance']}")
    card = {
        "kind": kind,
        "target": str(target.path),
        "data": {
            "name": str(source),  # self-chat, chat, python-source or the data file
            "source": windows["description"],
            "chat": data.chat,
            "keep_responses": data.keep_responses,
            "answers": {"sampled_share": sampled_share, "temperature": temperature if sampled_share else None},
            **({"self_chat": windows["self_chat"]} if str(source) == SELF_CHAT_DATA else {}),
            "reused": windows["reused"],  # the windows came from the data cache (an earlier run's generation)
            "train": train_data.stats,
            "validation": val_data.stats,
            "max_corpus_chars": data.max_corpus_chars if str(source) == PYTHON_SOURCE_DATA else None,
        },
        "train": asdict(train),
        **report,
        "seconds": round(time.perf_counter() - started, 1),
        "device": device_name(dev),
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    _log(f"wrote {out_dir}")
    return out_dir


DATA_CACHE = "data-cache"  # under a run's output root (`<model dir>/heads` by default): <key>.pt per data setting


def _windows(
    target: Target,
    source: str | Path,
    data: DataSettings,
    seed: int,
    sampled_share: float,
    temperature: float,
    root: Path,
    progress: bool,
) -> dict:
    """The training and validation windows (tokens, valid, stats) the target makes from `source`, with the data's
    description (and self-chat stats): from the data cache under `root` when an earlier run made them with the same
    target, source, settings and seed (`data.reuse`), else generated and cached. The cache holds token ids alone
    (hidden states are recomputed per kind, which is cheap next to generating)."""
    text = source.read_bytes() if isinstance(source, Path) and source.is_file() else b""
    key_fields = {
        "target": str(target.path.resolve()),
        "source": str(source),
        "source_sha256": hashlib.sha256(text).hexdigest() if text else None,
        "data": {k: v for k, v in asdict(data).items() if k != "reuse"},
        "seed": seed,
        "version": 1,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = root / DATA_CACHE / f"{key}.pt"
    if data.reuse and path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged cache file is regenerated, not trusted
            _log(f"data cache {path} unreadable ({type(exc).__name__}): generating anew")
        else:
            _log(f"data: reusing {path} ({cached['description']})")
            return {**cached, "reused": str(path)}
    if str(source) == SELF_CHAT_DATA:
        if data.chat == "off" or data.keep_responses:
            flag = "--chat off" if data.chat == "off" else "--keep-responses"
            raise ParadecError(f"--data self-chat renders chats with the target's template: {flag} does not apply")
        texts = self_chat_texts(
            target.model,
            target.tokenizer,
            data.self_chat,
            eos_token_ids=target.eos_token_ids,
            seed=seed,
            batch_size=data.batch_size,
            progress=progress,
        )
        _log(f"self-chat: dropped {texts.stats['dropped']}")
    else:
        texts = read_texts(
            source,
            tokenizer=target.tokenizer,
            chat=data.chat,
            keep_responses=data.keep_responses,
            max_corpus_chars=data.max_corpus_chars,
            progress=progress,
        )
    _log(
        f"data: {texts.description}; {len(texts.train)} + {len(texts.train_chats)} + {len(texts.train_answered)} "
        f"train / {len(texts.val)} + {len(texts.val_chats)} + {len(texts.val_answered)} validation texts + chats + "
        "given answers"
    )
    common = dict(
        prompt_len=data.prompt_len,
        new_tokens=data.new_tokens,
        eos_token_ids=target.eos_token_ids,
        temperature=temperature,
        sampled_share=sampled_share,
        batch_size=data.batch_size,
        progress=progress,
    )
    stats = getattr(texts, "stats", None)  # plain JSON values, so that the cache loads with weights_only
    windows = {"description": texts.description, "self_chat": None if stats is None else json.loads(json.dumps(stats))}
    for part, (plain, chats, answered, count, part_seed) in {
        "train": (texts.train, texts.train_chats, texts.train_answered, data.sequences, seed),
        "validation": (texts.val, texts.val_chats, texts.val_answered, data.val_sequences, seed + 1),
    }.items():
        windows[part] = target_windows(
            target.model,
            target.tokenizer,
            plain,
            chats=chats,
            answered=answered,
            sequences=count,
            seed=part_seed,
            **common,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(windows, partial)
    partial.replace(path)  # whole or absent: a run stopped mid-write leaves no cache entry
    return {**windows, "reused": None}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _draft_path(kind: str, model_dir: Path, draft: str | Path | None) -> Path | None:
    """The draft to distil or adapt: `draft`, else the draft registered for a zoo target (`code-8m` has
    `code-8m-draft`)."""
    if kind not in DRAFT_KINDS:
        if draft is not None:
            raise ParadecError(f"--draft is only used by `paradec train draft` and `train pard`, not {kind}")
        return None
    if draft is None:
        from paradec import zoo

        draft = zoo.registered_draft(zoo.zoo_name(model_dir))
        if draft is None:
            raise ParadecError(
                f"`paradec train {kind}` needs --draft DIR, the small model to train: the target {str(model_dir)!r} "
                "has no registered draft"
            )
    return resolve_model_dir(draft, "draft model")


def _train_medusa(job: Job) -> dict:
    target, train_data, heads = job.target, job.train_data, job.heads
    hidden, vocab = target.lm_head.shape[1], target.lm_head.shape[0]
    module = MedusaHeads(MedusaConfig(hidden, vocab, heads.medusa_heads)).to(job.device)
    _log(f"medusa: {heads.medusa_heads} heads, {sum(p.numel() for p in module.parameters())} parameters")

    def loss(index: torch.Tensor) -> torch.Tensor:
        return medusa_loss(module, target.lm_head, train_data.features[index], train_data.valid[index])

    result = job.fit(module.parameters(), loss, "medusa")
    module.eval()
    with job.autocast():
        accuracy = medusa_accuracy(module, target.lm_head, job.val_data, heads.tree_ranks)
    tree, expected = best_tree(accuracy, heads.tree_nodes)
    module.config = replace(module.config, tree=tree)
    save_heads(module, job.out_dir)
    return {
        "parameters": sum(p.numel() for p in module.parameters()),
        "fit": result.to_dict(),
        "validation": {
            "top1_accuracy_per_head": [round(a[0], 4) for a in accuracy],
            "topk_accuracy_per_head": [[round(x, 4) for x in a] for a in accuracy],
            "tree_nodes": len(tree),
            "tree_expected_accepted": round(expected, 4),
        },
        "validation_acceptance": job.acceptance("medusa", heads_dir=job.out_dir),
    }


def _train_eagle(job: Job) -> dict:
    target, train_data, heads = job.target, job.train_data, job.heads
    hidden, vocab = target.lm_head.shape[1], target.lm_head.shape[0]
    draft_vocab = heads.draft_vocab_for(vocab)
    layers = train_data.stats["feature_layers"]
    config = EagleConfig.for_target(
        hidden,
        vocab,
        intermediate_size=heads.intermediate_size,
        draft_vocab_size=draft_vocab,
        feature_layers=None if layers is None else tuple(layers),
    )
    module = EagleHead(config).to(job.device)
    if draft_vocab is not None:  # the most frequent tokens of the target's own continuations
        d2t = frequent_tokens(train_data.tokens, continuation_mask(train_data), vocab, draft_vocab)
        module.init_draft_vocab(d2t.to(job.device), target.lm_head)
    _log(f"eagle: {config}, {sum(p.numel() for p in module.parameters())} parameters")

    def loss(index: torch.Tensor) -> torch.Tensor:
        return eagle_loss(
            module,
            target.embed,
            target.lm_head,
            train_data.tokens[index],
            train_data.features[index],
            train_data.valid[index],
            layer_features=None if train_data.layer_features is None else train_data.layer_features[index],
            passes=heads.passes,
            reg_weight=heads.reg_weight,
        )

    result = job.fit(module.parameters(), loss, "eagle")
    module.eval()
    with job.autocast():
        accuracy = eagle_accuracy(module, target.embed, target.lm_head, job.val_data, heads.passes)
    vocab_card = {"size": draft_vocab, "target_vocab": vocab}
    if draft_vocab is not None:
        coverage = draft_vocab_coverage(module.d2t, target.lm_head, job.val_data)
        vocab_card["validation_coverage"] = {name: round(value, 4) for name, value in coverage.items()}
        _log(
            f"eagle: draft vocabulary of {draft_vocab} / {vocab} tokens holds {coverage['target_mass']:.1%} of the "
            f"target's probability mass on validation data ({coverage['greedy_in_vocab']:.1%} of its greedy tokens)"
        )
    save_heads(module, job.out_dir)
    return {
        "parameters": sum(p.numel() for p in module.parameters()),
        "config": config.to_dict(),
        "passes": heads.passes,
        "feature_layers": layers,  # fused target layers (EAGLE-3), None: the last hidden state
        "reg_weight": heads.reg_weight if layers is None else None,  # a fused head's loss is the KL alone
        "draft_vocab": vocab_card,
        "fit": result.to_dict(),
        "validation": {"top1_accuracy_per_level": [round(a, 4) for a in accuracy]},
        "validation_acceptance": job.acceptance("eagle", heads_dir=job.out_dir),
    }


def _load_draft_model(job: Job):
    """The draft checkpoint to train, in float32 on the training device, and the dtype to save it in."""
    from transformers import AutoModelForCausalLM

    try:
        draft = AutoModelForCausalLM.from_pretrained(job.draft_path, dtype=torch.float32).to(job.device)
    except Exception as exc:
        raise ParadecError(f"cannot load the draft model {str(job.draft_path)!r}: {exc}") from exc
    config = read_config(job.draft_path)
    return draft, DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)  # as it came


def _save_draft_model(job: Job, draft, save_dtype: torch.dtype) -> None:
    """Write the trained draft (with the tokenizer files of the one it came from) to `job.out_dir`, whole or not."""
    tmp = job.out_dir.with_name(job.out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    draft.to(save_dtype).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        source = job.draft_path / name
        if source.is_file() and not (tmp / name).exists():
            shutil.copyfile(source, tmp / name)
    shutil.rmtree(job.out_dir, ignore_errors=True)
    tmp.rename(job.out_dir)


def _train_draft(job: Job) -> dict:
    target, train_data = job.target, job.train_data
    draft, save_dtype = _load_draft_model(job)
    draft.eval()
    with job.autocast():
        agreement_before = draft_accuracy(draft, target.lm_head, job.val_data)
    acceptance_before = job.acceptance("draft", draft=draft)
    draft.train()

    def loss(index: torch.Tensor) -> torch.Tensor:
        return draft_loss(
            draft, target.lm_head, train_data.tokens[index], train_data.features[index], train_data.valid[index]
        )

    result = job.fit(draft.parameters(), loss, "draft")
    draft.eval()
    with job.autocast():
        agreement_after = draft_accuracy(draft, target.lm_head, job.val_data)
    _save_draft_model(job, draft, save_dtype)
    return {
        "draft": str(job.draft_path),
        "parameters": sum(p.numel() for p in draft.parameters()),
        "fit": result.to_dict(),
        "validation": {
            "top1_agreement_before": round(agreement_before, 4),
            "top1_agreement_after": round(agreement_after, 4),
        },
        "validation_acceptance_before": acceptance_before,
        "validation_acceptance": job.acceptance("draft", draft=draft),
    }


def _train_pard(job: Job) -> dict:
    """A PARD draft (`paradec.train.pard`): the draft model adapted to predict k tokens from one forward."""
    target, train_data, k = job.target, job.train_data, job.heads.pard_k
    draft, save_dtype = _load_draft_model(job)
    tokenizer = load_tokenizer(job.draft_path)
    vocab = int(draft.get_input_embeddings().weight.shape[0])
    mask = choose_mask_token(tokenizer, vocab)
    init_mask_embedding(draft, mask, len(tokenizer))
    pad = int(target.eos_token_ids[0]) if target.eos_token_ids else 0
    prompt_len = int(train_data.stats.get("prompt_tokens", 1))
    draft.config.pard = {"mask_token_id": mask, "k": k}  # what the drafter reads, in training's acceptance too
    draft.eval()
    with job.autocast():
        before = pard_accuracy(draft, target.lm_head, job.val_data, k, mask, pad, prompt_len)
    draft.train()
    generator = torch.Generator().manual_seed(job.settings.seed)

    count = job.heads.pard_splits
    agreement = None
    if count > 1:  # the parallel layout must give what the single-split rows give, on this model and backend
        check = job.val_data
        rows = slice(0, min(4, check.tokens.shape[0]))
        split = many_splits(check.valid[rows].cpu(), prompt_len, min(count, 4), generator)
        draft.eval()
        with job.autocast():
            agreement = parallel_agreement(draft, check.tokens[rows], check.valid[rows], split, k, mask)
        draft.train()
        if agreement < PARALLEL_AGREEMENT:
            raise ParadecError(
                f"pard: the parallel training layout agrees with single-split rows on only {agreement:.0%} of the "
                f"masks' top-1 tokens with this model and backend (at least {PARALLEL_AGREEMENT:.0%} expected): "
                "train with --splits 1"
            )

    def loss(index: torch.Tensor) -> torch.Tensor:
        valid = train_data.valid[index]
        tokens, features = train_data.tokens[index], train_data.features[index]
        if count == 1:
            split = splits(valid.cpu(), prompt_len, k, generator)
        else:
            split = many_splits(valid.cpu(), prompt_len, count, generator)
        return pard_loss(draft, target.lm_head, tokens, features, valid, split, k, mask, pad)

    result = job.fit(draft.parameters(), loss, "pard")
    draft.eval()
    with job.autocast():
        after = pard_accuracy(draft, target.lm_head, job.val_data, k, mask, pad, prompt_len)
    acceptance = job.acceptance("pard", draft=draft)
    _save_draft_model(job, draft, save_dtype)
    return {
        "draft": str(job.draft_path),
        "parameters": sum(p.numel() for p in draft.parameters()),
        "pard": {"mask_token_id": mask, "k": k, "splits_per_window": count, "parallel_agreement": agreement},
        "fit": result.to_dict(),
        "validation": {"top1_by_position_before": before, "top1_by_position_after": after},
        "validation_acceptance": acceptance,
    }
