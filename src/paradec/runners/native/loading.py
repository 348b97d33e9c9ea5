"""Reading a Hugging Face Llama-family checkpoint (config.json + safetensors, sharded or not) into a Transformer.

Checkpoint names map onto ours with two fusions: q/k/v projections are concatenated into `wqkv`, gate/up into
`w13`. Tensors are read straight onto the target device and cast there, and the model is built on the meta
device and then given the loaded tensors, so an 8B checkpoint is held once in device memory, not twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from paradec.errors import ParadecError
from paradec.runners.native.model import ModelArgs, Transformer, rope_inv_freq

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str, config: dict) -> torch.dtype:
    """A torch dtype from a dtype or its name; 'auto' takes the checkpoint's dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ParadecError(f"dtype {dtype} is not supported by the native runner (use bfloat16, float16, float32)")
        return dtype
    if dtype == "auto":
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ParadecError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def read_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ParadecError(f"no config.json in {str(path)!r}")
    return json.loads(file.read_text())


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: one file, or the shards its index names."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise ParadecError(f"no model.safetensors or model.safetensors.index.json in {str(path)!r}")


def load_transformer(
    path: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    compile: bool = False,
    exact: bool = False,
    tensor_parallel=None,
) -> Transformer:
    """Build our Transformer from a checkpoint directory; with `tensor_parallel` (a `tp.TensorParallel`), this
    rank's slices of it."""
    from safetensors import safe_open

    config = read_config(path)
    tensors: dict[str, torch.Tensor] = {}
    # safetensors wants "cuda:0", not "cuda"
    where = str(device) if device.type == "cpu" or device.index is not None else f"{device.type}:0"
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device=where) as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                tensors[name] = shard.get_tensor(name).to(dtype)
    if tensor_parallel is None:
        return transformer_from_state_dict(config, tensors, device=device, dtype=dtype, compile=compile, exact=exact)
    from paradec.runners.native import tp

    local = tp.shard_config(config, tensor_parallel.world)
    tensors = tp.shard_state(config, tensors, tensor_parallel)
    rows = tp.vocab_rows(config["vocab_size"], tensor_parallel.world)  # the embedding's and LM head's rows
    model = transformer_from_state_dict(
        local, tensors, device=device, dtype=dtype, compile=compile, exact=exact, vocab_rows=rows
    )
    model.tensor_parallel(tensor_parallel)
    return model


def transformer_from_state_dict(
    config: dict,
    state: Mapping[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    compile: bool = False,
    sdpa_backends: tuple[SDPBackend, ...] | None = None,
    exact: bool = False,
    vocab_rows: int | None = None,
) -> Transformer:
    """Build our Transformer from Hugging Face parameter names (e.g. an `AutoModelForCausalLM.state_dict()`);
    `vocab_rows`: the rows of the embedding and LM head the state holds (a tensor-parallel rank's, see
    `Transformer`; default the whole vocabulary)."""
    args = ModelArgs.from_config(config)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ParadecError(f"checkpoint has no tensor {name!r} (expected for {args.architecture})")
        used.add(name)
        return state[name].to(device=device, dtype=dtype)

    def fused(names: list[str]) -> torch.Tensor:
        return torch.cat([take(name) for name in names])

    weights = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not args.tie_word_embeddings:
        weights["lm_head.weight"] = take("lm_head.weight")
    else:
        used.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    for i in range(args.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        qkv = [hf + f"self_attn.{p}_proj" for p in "qkv"]
        gate_up = [hf + "mlp.gate_proj", hf + "mlp.up_proj"]
        weights[ours + "attention_norm.weight"] = take(hf + "input_layernorm.weight")
        weights[ours + "mlp_norm.weight"] = take(hf + "post_attention_layernorm.weight")
        weights[ours + "attention.wqkv.weight"] = fused([n + ".weight" for n in qkv])
        weights[ours + "attention.wo.weight"] = take(hf + "self_attn.o_proj.weight")
        weights[ours + "mlp.w13.weight"] = fused([n + ".weight" for n in gate_up])
        weights[ours + "mlp.w2.weight"] = take(hf + "mlp.down_proj.weight")
        if args.qkv_bias:
            weights[ours + "attention.wqkv.bias"] = fused([n + ".bias" for n in qkv])
        if args.o_bias:
            weights[ours + "attention.wo.bias"] = take(hf + "self_attn.o_proj.bias")
        if args.mlp_bias:
            weights[ours + "mlp.w13.bias"] = fused([n + ".bias" for n in gate_up])
            weights[ours + "mlp.w2.bias"] = take(hf + "mlp.down_proj.bias")
        if args.qk_norm:
            weights[ours + "attention.q_norm.weight"] = take(hf + "self_attn.q_norm.weight")
            weights[ours + "attention.k_norm.weight"] = take(hf + "self_attn.k_norm.weight")
    unused = sorted(name for name in state if name not in used and not name.endswith("rotary_emb.inv_freq"))
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        raise ParadecError(f"checkpoint has {len(unused)} tensors the {args.architecture} model does not use: {shown}")
    with torch.device("meta"):
        model = Transformer(args, compile=compile, sdpa_backends=sdpa_backends, exact=exact, vocab_rows=vocab_rows)
    model.load_state_dict(weights, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)  # the buffer was built on the meta device
    model.requires_grad_(False)
    return model.eval()
