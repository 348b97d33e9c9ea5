"""Shared fixtures: tiny random-weight models of several architectures with a small byte-level BPE tokenizer.

Models are built from configs (no hub), saved once per test session in Hugging Face format, and loaded by path
exactly as a user would. A large `initializer_range` makes the logits well separated, so greedy decoding has no
near-ties that float rounding could flip between a 1-token and an n-token forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # the models are tiny: threads cost more than they bring, and CI has 2 cores
if not torch.cuda.is_available():  # Triton kernels (`paradec.kernels`) run under Triton's interpreter on CPU;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # it reads this once, when first imported

CORPUS = (
    '''
def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()


def read_lines(path):
    with open(path) as handle:
        return [line.rstrip("\\n") for line in handle]
'''
    * 4
    + "The quick brown fox jumps over the lazy dog. " * 8
)


def build_tokenizer(out: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


ARCHS = ("llama", "qwen2", "gpt2")


def make_config(arch: str, vocab_size: int, *, layers: int = 2, hidden: int = 64, seed_range: float = 0.2):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, eos_token_id=0, bos_token_id=0, initializer_range=seed_range)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    return cls(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **extra,
        **common,
    )


def save_model(config, out: Path, tokenizer_dir: Path, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    for name in tokenizer_dir.iterdir():
        (out / name.name).write_bytes(name.read_bytes())
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def vocab_size(tokenizer_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer_dir, vocab_size) -> dict[str, Path]:
    """arch -> target checkpoint dir; plus '<arch>-draft' (a different, 1-layer random model)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, arch in enumerate(ARCHS):
        out[arch] = save_model(make_config(arch, vocab_size), root / arch, tokenizer_dir, seed=100 + i)
        out[f"{arch}-draft"] = save_model(
            make_config(arch, vocab_size, layers=1, hidden=32), root / f"{arch}-draft", tokenizer_dir, seed=200 + i
        )
    return out


@pytest.fixture(scope="session")
def exact_dirs(tmp_path_factory, tokenizer_dir, vocab_size):
    """arch -> (target, draft): a Llama and a Qwen2 target (q/k/v bias) with a smaller draft each (test_exact*.py)."""
    root = tmp_path_factory.mktemp("exact-models")
    out = {}
    for i, arch in enumerate(("llama", "qwen2")):
        target = save_model(make_config(arch, vocab_size, seed_range=0.5), root / arch, tokenizer_dir, seed=700 + i)
        draft = save_model(
            make_config(arch, vocab_size, layers=1, hidden=32), root / f"{arch}-d", tokenizer_dir, seed=710 + i
        )
        out[arch] = (target, draft)
    return out


@pytest.fixture(scope="session")
def loop_dirs(tmp_path_factory, tokenizer_dir, vocab_size) -> dict[str, Path]:
    """arch -> a target whose attention output is zeroed: its next token depends on the current token only, so
    greedy decoding falls into a short cycle and prompt lookup gets most drafts accepted."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("loops")
    out = {}
    for i, arch in enumerate(ARCHS):
        path = save_model(make_config(arch, vocab_size), root / arch, tokenizer_dir, seed=300 + i)
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(
                    ("o_proj.weight", "o_proj.bias", "attn.c_proj.weight", "attn.c_proj.bias", "wpe.weight")
                ):
                    param.zero_()
        model.save_pretrained(path)
        out[arch] = path
    return out


@pytest.fixture(scope="session")
def checkpoints(model_dirs, loop_dirs) -> dict[str, Path]:
    """Every test checkpoint by name: an arch, '<arch>-draft', or 'loop-<arch>'."""
    return {**model_dirs, **{f"loop-{arch}": path for arch, path in loop_dirs.items()}}


@pytest.fixture(scope="session")
def engines(checkpoints):
    """`engines(target, draft=None, runner="hf")`: a loaded paradec Engine, cached per session."""
    import paradec

    cache = {}

    def get(target: str, draft: str | None = None, *, runner: str = "hf"):
        key = (target, draft, runner)
        if key not in cache:
            cache[key] = paradec.load(checkpoints[target], None if draft is None else checkpoints[draft], runner=runner)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    """Loaded `transformers` models (fp32, eval) for reference generation, cached per session
    (names: an arch, '<arch>-draft', or 'loop-<arch>')."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
        return cache[name]

    return get


def run_scheduler(worker, test) -> None:
    """Start `worker` (a server scheduler), run `await test(worker)` on an event loop, then stop the worker."""
    worker.start()

    async def body():
        try:
            await test(worker)
        finally:
            await asyncio.to_thread(worker.stop)

    asyncio.run(body())


async def until(condition, what: str, seconds: float = 60.0) -> None:
    """Poll `condition()` every 2 ms until it holds; fail the test after `seconds`."""
    for _ in range(int(seconds / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    pytest.fail(f"never {what}")


@contextlib.contextmanager
def counting(obj, name: str = "forward"):
    """Record the first argument of every call of `obj.name` (e.g. each `Step` a runner's forward scores)."""
    calls: list = []
    real = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    try:
        yield calls
    finally:
        delattr(obj, name)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = 0) -> list[int]:
    """Reference: `transformers` greedy generate, new tokens only."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


# --- `paradec serve` as a real process (tests/test_server_*.py) ---------------------------------------------------


class MetricSamples(dict):
    """/metrics as (sample name, sorted labels) -> value."""

    def sum(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        return sum(v for (n, ls), v in self.items() if n == name and set(labels.items()) <= set(ls))


class ServerProcess:
    """`python -m paradec serve ARGS --port 0` on 127.0.0.1; `url` is read from the line it prints once it listens,
    its log (stderr) is written to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, log_level: str = "warning") -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "paradec", "serve", *args, "--port", "0", "--log-level", log_level]
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on http://" not in line:
            self.stop()
            raise RuntimeError(f"paradec serve did not start: {line!r}\n{log_path.read_text()}")
        self.url = line.rsplit(" ", 1)[1].strip()
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.address = (host, int(port))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def metrics(self) -> MetricSamples:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return MetricSamples(
            ((s.name, tuple(sorted(s.labels.items()))), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        )

    def wait_until(self, condition, what: str, polls: int = 2000) -> MetricSamples:
        """Poll /metrics until `condition(samples)` holds (a few polls: the server has only to read one request)."""
        for _ in range(polls):
            samples = self.metrics()
            if condition(samples):
                return samples
        pytest.fail(f"the server never reached {what}")

    def wait_for(self, **gauges: int) -> MetricSamples:
        """Poll until the gauges `paradec_<name>` (running, queue_depth) read `gauges`."""
        return self.wait_until(
            lambda samples: all(samples.sum(f"paradec_{name}") == value for name, value in gauges.items()), f"{gauges}"
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        """Terminate the server (if still running) and return its exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def serve_process(tmp_path_factory):
    """`serve_process(args, log_level="warning")`: a started `paradec serve` process (`ServerProcess`); whatever is
    still running at the end of the session is stopped."""
    started: list[ServerProcess] = []

    def start(args: list[str], log_level: str = "warning") -> ServerProcess:
        started.append(ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log", log_level))
        return started[-1]

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.stop()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def chat_llama_dir(model_dirs, tmp_path_factory) -> Path:
    """The tiny llama, with a chat template (CHAT_TEMPLATE) added to its tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(model_dirs["llama"], out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


LONG_CONTEXT = 8192


@pytest.fixture(scope="session")
def long_loop_dir(loop_dirs, tmp_path_factory) -> Path:
    """The 'loop-llama' target with a context of LONG_CONTEXT tokens: generations long enough to interrupt."""
    out = tmp_path_factory.mktemp("long") / "llama"
    shutil.copytree(loop_dirs["llama"], out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def endless_token(long_loop_dir) -> int:
    """A token whose greedy successors under `long_loop_dir` (a cycle: each depends on its predecessor only) avoid
    EOS and all decode to complete text: a prompt of it streams a piece per token and never stops early."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(long_loop_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(long_loop_dir)
    vocab = model.config.vocab_size
    with torch.no_grad():
        successor = model(torch.arange(vocab).view(vocab, 1)).logits[:, -1].argmax(-1).tolist()

    def shows_text(token: int) -> bool:
        text = tokenizer.decode([token])
        return token != model.generation_config.eos_token_id and text != "" and "\ufffd" not in text

    for start in range(1, vocab):
        seen, token = [], successor[start]
        while token not in seen and shows_text(token):
            seen.append(token)
            token = successor[token]
        if token in seen:
            return start
    pytest.fail("no greedy cycle of the loop model avoids EOS")
