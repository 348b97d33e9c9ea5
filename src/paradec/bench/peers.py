"""Hugging Face peers: `transformers` `generate` on the same model, device, dtype and prompts as paradec.

- `hf-vanilla`       plain `generate` (greedy or sampling), default dynamic cache; also at batch sizes > 1.
- `hf-assisted`      assisted generation with the same draft model, configured like paradec's `draft`: a constant
                     `num_assistant_tokens` = our k and no confidence-based early stop of the draft.
- `hf-assisted-dyn`  assisted generation with Hugging Face's own defaults (its dynamic drafting: up to 20 tokens,
                     stopped early when the draft's confidence falls below an adaptive threshold).
- `hf-pld`           prompt lookup with `prompt_lookup_num_tokens` = our pld `num_draft_tokens` and
                     `max_matching_ngram_size` = our pld `max_ngram`.

Hugging Face runs assisted generation and prompt lookup at batch size 1 only; `hf-vanilla` runs at every batch
size asked for. Steps (target forwards) are counted with a forward pre-hook on the target, which gives τ at
batch size 1. HF's assisted generation reads its draft settings from the assistant's `generation_config`; the
assistant model here is loaded for the peers (or is the engine's HF draft model) and set before every call.
"""

from __future__ import annotations

import torch

from paradec.config import SamplingParams
from paradec.errors import ParadecError

PEERS = ("hf-vanilla", "hf-assisted", "hf-assisted-dyn", "hf-pld")
BATCHED_PEERS = ("hf-vanilla",)  # what `transformers` can run at batch size > 1


def parse_peers(text: str | None) -> tuple[str, ...]:
    """`hf` (all four), `none`, or a comma list of peer names."""
    if text is None or text.strip() in ("", "none"):
        return ()
    names: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if name == "hf":
            names.extend(PEERS)
        elif name in PEERS:
            names.append(name)
        else:
            raise ParadecError(f"unknown peer {name!r} (choose from hf, none, {', '.join(PEERS)})")
    return tuple(dict.fromkeys(names))


class _ForwardCounter:
    """Counts calls of a module's forward (one per target step in `generate`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls = 0

    def _hook(self, module, args) -> None:
        self.calls += 1

    def __enter__(self) -> _ForwardCounter:
        self.calls = 0
        self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class HFPeers:
    """Runs the peers for one engine; models are loaded on first use (or borrowed from the engine's HF runners)."""

    def __init__(self, engine, *, draft_k: int, pld_tokens: int, pld_max_ngram: int) -> None:
        self.engine = engine
        self.draft_k = draft_k
        self.pld_tokens = pld_tokens
        self.pld_max_ngram = pld_max_ngram
        eos = sorted(engine.eos_token_ids)
        self.eos_token_ids = eos or None
        pad = getattr(engine.tokenizer, "pad_token_id", None) if engine.tokenizer is not None else None
        self.pad_token_id = pad if pad is not None else (eos[0] if eos else 0)
        self._target = None
        self._draft = None

    def settings(self, peer: str) -> dict:
        """The draft settings `peer` runs with (for the report)."""
        if peer == "hf-assisted":
            return {"num_assistant_tokens": self.draft_k, "schedule": "constant", "confidence_threshold": 0.0}
        if peer == "hf-assisted-dyn":
            return {"transformers_defaults": True}
        if peer == "hf-pld":
            return {"prompt_lookup_num_tokens": self.pld_tokens, "max_matching_ngram_size": self.pld_max_ngram}
        return {}

    def unavailable(self, peer: str) -> str | None:
        """Why `peer` cannot run with this engine (None if it can)."""
        if peer.startswith("hf-assisted") and self.engine.config.draft is None:
            return "needs a draft model (--draft)"
        return None

    @property
    def target(self):
        if self._target is None:
            self._target = _hf_model(self.engine.target, self.engine.config.model)
        return self._target

    @property
    def draft(self):
        if self._draft is None:
            self._draft = _hf_model(self.engine.draft_runner(), self.engine.config.draft)
        return self._draft

    def generate(
        self, peer: str, batch: list[list[int]], sampling: SamplingParams, max_new_tokens: int
    ) -> tuple[list[list[int]], int]:
        """New tokens of each prompt (cut after the first EOS) and the number of target forwards."""
        model = self.target
        width = max(len(ids) for ids in batch)
        # left padding: every row's last prompt token sits at the same index
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        kwargs: dict = dict(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            do_sample=not sampling.greedy,
            # transformers fills unset fields from the model's generation_config; keep these processors off, as
            # paradec does (it reads only the EOS ids from there)
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
        )
        if not sampling.greedy:
            # every warper explicitly (0 / 1.0 = off), so no default of the model's generation_config sneaks in
            kwargs.update(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p
            )
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        if peer.startswith("hf-assisted"):
            kwargs["assistant_model"] = self._assistant(fixed=peer == "hf-assisted")
        elif peer == "hf-pld":
            kwargs.update(prompt_lookup_num_tokens=self.pld_tokens, max_matching_ngram_size=self.pld_max_ngram)
        with torch.inference_mode(), _ForwardCounter(model) as counter:
            out = model.generate(input_ids.to(model.device), attention_mask=attention_mask.to(model.device), **kwargs)
        return [self._cut(row) for row in out[:, width:].tolist()], counter.calls

    def _assistant(self, *, fixed: bool):
        draft = self.draft
        config = draft.generation_config
        if fixed:  # paradec's `draft`: k tokens every step, no early stop
            config.num_assistant_tokens = self.draft_k
            config.num_assistant_tokens_schedule = "constant"
            config.assistant_confidence_threshold = 0.0
        else:  # None -> transformers fills in its own defaults
            config.num_assistant_tokens = None
            config.num_assistant_tokens_schedule = None
            config.assistant_confidence_threshold = None
        return draft

    def _cut(self, tokens: list[int]) -> list[int]:
        eos = set(self.eos_token_ids or ())
        for i, token in enumerate(tokens):
            if token in eos:
                return tokens[: i + 1]
        return tokens


def _hf_model(runner, path: str):
    """The `transformers` model behind an HF runner, or the checkpoint at `path` loaded like the runner's."""
    from paradec.loading import resolve_model_dir
    from paradec.runners import HFRunner, load_hf_model

    if isinstance(runner, HFRunner):
        return runner.model
    return load_hf_model(resolve_model_dir(path), runner.device, runner.dtype)
