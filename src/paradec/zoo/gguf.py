"""Converting a GGUF file into a plain Hugging Face checkpoint directory.

transformers' own GGUF loader reads the file, dequantizing every tensor, and `save_pretrained` writes the result:

    config.json (with `architectures`)  model.safetensors (bf16)  tokenizer.json  tokenizer_config.json
    chat_template.jinja  generation_config.json

The GGUF's metadata is read once more with the `gguf` package for what the loader leaves out or does not
decide: the chat template when the tokenizer came back without one, and the stop tokens. `generation_config.json`
lists the GGUF's eos id and the token the chat template closes an assistant turn with (`<|im_end|>`,
`<|eot_id|>`), so that generation ends with the assistant's turn even where the two differ.

The caller owns the directory written into and its atomic rename into place (`paradec.zoo.fetch`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from paradec.errors import ParadecError


@dataclass(frozen=True)
class GgufMetadata:
    architecture: str  # llama.cpp's name: "llama", "qwen2", ...
    name: str | None  # general.name, e.g. "Qwen2.5 Coder 1.5B Instruct GGUF"
    quant: str  # llama.cpp's file type without "MOSTLY_": "Q4_K_M", "Q4_1", "ALL_F32"
    eos_token_id: int | None
    chat_template: str | None


def read_metadata(path: Path) -> GgufMetadata:
    """The GGUF key/values this conversion uses (the tensors are memory-mapped, not read)."""
    from gguf import GGUFReader, LlamaFileType

    try:
        fields = GGUFReader(path).fields
    except (OSError, ValueError) as exc:
        raise ParadecError(f"cannot read the GGUF file {str(path)!r}: {exc}") from exc

    def value(key: str):
        return fields[key].contents() if key in fields else None

    architecture = value("general.architecture")
    if architecture is None:
        raise ParadecError(f"GGUF file {str(path)!r} has no general.architecture")
    file_type = value("general.file_type")
    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quant = f"file_type {file_type}"
    return GgufMetadata(
        architecture=architecture,
        name=value("general.name"),
        quant=quant,
        eos_token_id=value("tokenizer.ggml.eos_token_id"),
        chat_template=value("tokenizer.chat_template"),
    )


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, if it writes one."""
    from jinja2 import TemplateError

    if tokenizer.chat_template is None:
        return None
    marker = "PARADEC-END-OF-TURN-PROBE"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, TypeError):
        return None
    if marker not in text:
        return None
    after = list(tokenizer(text.rpartition(marker)[2], add_special_tokens=False)["input_ids"])
    if not after:
        return None
    added = tokenizer.added_tokens_decoder.get(after[0])
    return after[0] if added is not None and added.special else None


def _log(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(f"[zoo] {message}", file=sys.stderr)


def convert_gguf(gguf: Path, out: Path, *, progress: bool = True) -> dict:
    """Write the checkpoint of the GGUF file `gguf` into the existing empty directory `out`.

    Returns what the model card records: architecture, parameters, dtype, eos_token_id (a list), end_of_turn,
    quant, gguf_name and conversion_seconds. Raises ParadecError for a file transformers cannot load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    meta = read_metadata(gguf)
    _log(progress, f"converting {gguf.name} ({meta.architecture}, {meta.quant}) to bf16 with transformers")
    started = time.perf_counter()
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if not progress:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        # dequantize=True: plain dense weights and no quantizer left on the model, so save_pretrained accepts it
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ParadecError(f"transformers cannot load the GGUF file {str(gguf)!r}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
    if tokenizer.chat_template is None and meta.chat_template:
        tokenizer.chat_template = meta.chat_template
    eos = [meta.eos_token_id if meta.eos_token_id is not None else tokenizer.eos_token_id]
    turn_end = end_of_turn_id(tokenizer)
    if turn_end is not None and turn_end not in eos:
        eos.append(turn_end)
    eos = [int(token) for token in eos if token is not None]
    model.config.architectures = [type(model).__name__]  # the loader leaves it unset; paradec's runners read it
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - started
    _log(progress, f"converted {gguf.name} in {seconds:.1f} s")
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "bfloat16",
        "eos_token_id": eos,
        "end_of_turn": None if turn_end is None else tokenizer.convert_ids_to_tokens(turn_end),
        "quant": meta.quant,
        "gguf_name": meta.name,
        "conversion_seconds": round(seconds, 1),
    }
