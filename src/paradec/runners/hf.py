"""Generic runner: any `transformers` AutoModelForCausalLM, with a DynamicCache cut back after rejections.

Chains use the model's own causal masking. Token trees pass a 4D additive attention mask (committed prefix fully
visible, the provisional part from `TreeBuffers.mask`) with per-node position ids; `transformers` hands a 4D mask
to the attention unchanged. The bookkeeping (committed length, pending forward, the rules) is a `Ledger`'s
(`paradec.runners.ledger`); a commit keeps the accepted provisional entries by slicing each layer's key/value tensors
after moving (gathering) the kept ones of a tree into place. A rollback or reset cancels a pending forward.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from paradec.runners.base import HiddenWanted, LogitsWanted, RunnerOutput, check_inputs, layer_taps
from paradec.runners.ledger import Ledger, tree_parents
from paradec.tree import TreeBuffers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class HFRunner:
    """Runs a `transformers` causal LM for one sequence (batch 1)."""

    max_step_inputs = 128  # the most inputs a method's step may score (method options are bounded by it)

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        config = model.config.get_text_config(decoder=True)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.hidden_size = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
        self.num_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
        self.max_length = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 1 << 30
        )
        params = inspect.signature(model.forward).parameters
        self._keep_kw = "logits_to_keep" in params
        # transformers renamed `past_key_values` to `cache` (5.2x); support both spellings
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cache = _dynamic_cache()
        pard = getattr(model.config, "pard", None)  # a PARD-adapted draft's mask token and trained k
        self.pard = dict(pard) if isinstance(pard, dict) else None
        self._ledger = Ledger(self.max_length, name="HFRunner", what="the hf runner", hint=" (the model's context)")

    @property
    def length(self) -> int:
        return self._ledger.length

    def embed_weight(self) -> torch.Tensor:
        """The input token embedding table [V, H] (read by trained heads that embed draft tokens)."""
        return self.model.get_input_embeddings().weight

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head [V, H] that turns last hidden states into logits (shared by trained heads)."""
        return self.model.get_output_embeddings().weight

    def reset(self) -> None:
        self._ledger.reset()
        self._cache = _dynamic_cache()

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        tree: TreeBuffers | None = None,
        *,
        logits: LogitsWanted = "all",
        hidden: HiddenWanted = False,
    ) -> RunnerOutput:
        self._ledger.check_idle()
        check_inputs(token_ids, logits)
        taps = layer_taps(hidden, self.num_layers, "the hf runner")
        n = int(token_ids.shape[0])
        if tree is not None and tree.size != n:
            raise ValueError(f"tree has {tree.size} inputs but {n} token ids were given")
        self._ledger.check_forward(n)
        start = self._ledger.length
        kwargs: dict = {}
        if tree is None or tree.is_chain:
            positions = torch.arange(start, start + n, device=self.device)
        else:
            positions = start + tree.depth.to(self.device)
            visible = torch.cat(
                [torch.ones(n, start, dtype=torch.bool, device=self.device), tree.mask.to(self.device)], 1
            )
            mask = torch.zeros(1, 1, n, start + n, dtype=self.dtype, device=self.device)  # (B, 1, q, kv) additive
            kwargs["attention_mask"] = mask.masked_fill(~visible, torch.finfo(self.dtype).min)
        if self._keep_kw and logits != "all":
            kwargs["logits_to_keep"] = 1
        try:
            out = self.model(
                input_ids=token_ids.view(1, n).to(self.device),
                position_ids=positions.view(1, n),
                use_cache=True,
                output_hidden_states=bool(hidden),
                **{self._cache_kw: self._cache},
                **kwargs,
            )
        except BaseException:
            self._truncate(start)  # layers the failed forward appended to: back to the committed prefix
            raise
        self._ledger.begin(n, tree_parents(tree))
        result_logits = None
        if logits == "all":
            result_logits = out.logits[0].float()  # [n, V]
        elif logits == "last":
            result_logits = out.logits[0, -1:].float()  # [1, V]
        if not hidden:
            return RunnerOutput(logits=result_logits)
        if not taps:
            return RunnerOutput(logits=result_logits, hidden=out.hidden_states[-1][0])  # [n, H] after the final norm
        # hidden_states[i + 1] is layer i's output (hidden_states[0] the embeddings, the last one after the norm)
        return RunnerOutput(logits=result_logits, hidden=torch.cat([out.hidden_states[i + 1][0] for i in taps], -1))

    def commit(self, keep: list[int] | int) -> None:
        commit = self._ledger.commit(keep)
        if commit.moves:  # a tree path: its kept entries onto the positions after the prefix, every layer
            source, destination = (torch.tensor(column, device=self.device) for column in zip(*commit.moves))
            for layer in self._cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys.index_copy(-2, destination, layer.keys.index_select(-2, source))
                    layer.values = layer.values.index_copy(-2, destination, layer.values.index_select(-2, source))
        self._truncate(commit.length)

    def rollback(self, length: int) -> None:
        self._ledger.rollback(length)  # cancels a pending forward: its entries lie past `length`, cut below
        self._truncate(length)

    def _truncate(self, length: int) -> None:
        for layer in self._cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]


def _dynamic_cache():
    # transformers' cache classes pull in its modelling code (~3 s of import): only a process that runs a
    # transformers model pays for them
    from transformers import DynamicCache

    return DynamicCache()
