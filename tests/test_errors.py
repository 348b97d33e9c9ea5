"""Every bad input gets a clear error naming the value: `ParadecError` from the API, exit code 2 from the CLI."""

from __future__ import annotations

import pytest

import paradec
from conftest import build_tokenizer, make_config, save_model
from paradec.cli import main
from paradec.config import SamplingParams
from paradec.errors import ParadecError


@pytest.fixture(scope="module")
def engine(model_dirs):
    return paradec.load(model_dirs["llama"], runner="hf")


@pytest.fixture(scope="module")
def other_vocab_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("othervocab")
    (root / "tok").mkdir()
    tokenizer = build_tokenizer(root / "tok", vocab_size=300)
    return save_model(make_config("llama", len(tokenizer)), root / "model", root / "tok", seed=5)


@pytest.mark.parametrize(
    ("kwargs", "message", "param"),
    [
        ({"method": "telepathy"}, "unknown method 'telepathy'", "method"),
        ({"prompt": ""}, "prompt is empty", "prompt"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0", "max_new_tokens"),
        ({"max_new_tokens": -3}, "got -3", "max_new_tokens"),
        ({"max_new_tokens": 400}, "exceeds the model's context of 256", "max_new_tokens"),
        ({"sampling": {"temperature": -0.5}}, "temperature must be >= 0, got -0.5", "temperature"),
        ({"sampling": {"temperature": 1.0, "top_p": 0.0}}, "top_p must lie in (0, 1], got 0.0", "top_p"),
        ({"sampling": {"temperature": 1.0, "top_p": 1.5}}, "got 1.5", "top_p"),
        ({"sampling": {"temperature": 1.0, "top_k": -1}}, "top_k must be an integer >= 0, got -1", "top_k"),
        ({"sampling": {"temperature": 1.0, "min_p": 2.0}}, "min_p must lie in [0, 1], got 2.0", "min_p"),
        ({"method": "draft"}, "method 'draft' needs a draft model", "method"),
        ({"method": "pld", "options": {"ngram": 3}}, "unknown option 'ngram' for method 'pld'", "method_options"),
        (
            {"method": "pld", "options": {"max_ngram": 0}},
            "option max_ngram=0 for method 'pld' must be an integer in [1, 32]",
            "method_options",
        ),
        ({"method": "pld", "options": {"max_ngram": "three"}}, "max_ngram='three'", "method_options"),
        ({"prompt": [5, 10_000]}, "token id 10000 is outside the vocabulary", "prompt"),
        ({"stop": [""]}, "stop strings must be non-empty", "stop"),
    ],
)
def test_api_errors_name_the_value_and_the_parameter(engine, kwargs, message, param):
    kwargs = {"prompt": "def f(x):", **kwargs}
    with pytest.raises(ParadecError) as info:
        engine.generate(kwargs.pop("prompt"), **kwargs)
    assert message in str(info.value)
    assert info.value.param == param


def test_load_errors(model_dirs, other_vocab_model, tmp_path):
    with pytest.raises(ParadecError, match="'/no/such/model' does not exist"):
        paradec.load("/no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParadecError, match=r"has no config\.json"):
        paradec.load(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ParadecError, match=r"cannot read config\.json"):
        paradec.load(tmp_path / "broken")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParadecError, match="is not a directory"):
        paradec.load(tmp_path / "file")
    with pytest.raises(ParadecError, match="different vocabulary"):
        paradec.load(model_dirs["llama"], other_vocab_model, runner="hf")
    with pytest.raises(ParadecError, match="unknown runner 'fast'"):
        paradec.load(model_dirs["llama"], runner="fast")
    with pytest.raises(ParadecError, match="unknown dtype 'float8'"):
        paradec.load(model_dirs["llama"], dtype="float8")
    with pytest.raises(ParadecError, match="unknown device 'gpu0'"):
        paradec.load(model_dirs["llama"], device="gpu0")


def test_sampling_params_validate_types():
    with pytest.raises(ParadecError, match="top_k must be an integer"):
        SamplingParams(top_k=1.5)
    with pytest.raises(ParadecError, match="seed must be an integer"):
        SamplingParams(seed="x")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "telepathy"], "unknown method 'telepathy'"),
        (["--prompt", ""], "prompt is empty"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
        (["--max-new-tokens", "1000"], "exceeds the model's context"),
        (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
        (["--top-p", "1.5", "--temperature", "1"], "top_p must lie in (0, 1], got 1.5"),
        (["--top-k", "-2"], "top_k must be an integer >= 0, got -2"),
        (["--method", "draft"], "method 'draft' needs a draft model"),
        (["--prompt-file", "/no/such/prompt.txt"], "cannot read prompt file '/no/such/prompt.txt'"),
        (["--opt", "k=2"], "unknown option 'k' for method 'vanilla'"),
        (
            ["--method", "pld", "--opt", "max_ngram=100"],
            "option max_ngram=100 for method 'pld' must be an integer in [1, 32]",
        ),
        (["--method", "pld", "--opt", "adaptive=2"], "option adaptive='2' for method 'pld' must be true or false"),
        (["--temperature", "1", "--seed", str(2**64)], "seed must lie in [-2**63, 2**64), got 18446744073709551616"),
        (["--stop", "a"] * 5, "at most 4 stop strings are allowed, got 5"),
    ],
)
def test_cli_errors_exit_2_without_traceback(capsys, model_dirs, args, message):
    base = ["generate", "--model", str(model_dirs["llama"]), "--runner", "hf"]
    if "--prompt" not in args and "--prompt-file" not in args:
        base += ["--prompt", "def f(x):"]
    code, _, err = run_cli(capsys, *base, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_cli_bad_paths_exit_2(capsys, model_dirs, other_vocab_model):
    code, _, err = run_cli(capsys, "generate", "--model", "/no/such/model", "--prompt", "x")
    assert code == 2 and "'/no/such/model' does not exist" in err
    code, _, err = run_cli(
        capsys, "generate", "--model", str(model_dirs["llama"]), "--draft", str(other_vocab_model), "--prompt", "x"
    )
    assert code == 2 and "different vocabulary" in err


def test_cli_argparse_errors_exit_2(capsys, model_dirs):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(model_dirs["llama"])])  # neither --prompt nor --prompt-file
    assert info.value.code == 2
    assert "one of the arguments --prompt --prompt-file --chat --messages is required" in capsys.readouterr().err
