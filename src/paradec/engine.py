"""The engine: one target model (and optionally a draft model / trained heads) behind `generate` and `stream`.

`paradec.load(...)` builds an Engine. `Engine.request(...)` is the one place a generation's input is checked
(`paradec.request`: each refusal a `ParadecError` naming the bad value and the parameter); `stream` / `generate` run
a `Request` (or build one from their keywords first). Per method name the engine keeps one `Method`
(`paradec.drafters.base`), made on first use: the method's per-engine state, the engine's defaults and settings of
its options (`set_default_options`), and the drafter of each generation. One Engine runs one generation at a time:
it owns one target cache.

Samples (`n` > 1, OpenAI's choices): `generate(n=...)` decodes the n samples of a prompt (sample i seeded seed + i) as
n sequences of one batch on the native runner (`paradec.batch`), one after another on the others (`samples`); in
both, a drafter that reads its siblings (`multisample`) is lent the other samples' tokens.

What a zoo model brings without being asked (`paradec.zoo`): its registered draft, loaded by `draft_runner()` on
first use (a 0.5B draft costs seconds and memory that most methods never need), and its packaged heads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

from paradec.chat import chat_text, has_chat_template
from paradec.config import EngineConfig, SamplingParams
from paradec.decode import Generation, Result
from paradec.drafters import Method, Options, get_drafter
from paradec.errors import ParadecError, shown
from paradec.loading import load_tokenizer, resolve_device, resolve_dtype, resolve_model_dir
from paradec.request import Request, check_max_new_tokens, check_n, sampling_params, stop_strings
from paradec.runners import Runner, load_runner

Prompt = str | list[int] | torch.Tensor


class Engine:
    def __init__(
        self,
        target: Runner,
        tokenizer,
        config: EngineConfig,
        *,
        draft: Runner | None = None,
        draft_loader: Callable[[], Runner] | None = None,
        heads_dir: Path | None = None,
        eos_token_ids: set[int] | None = None,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.config = config
        self._draft = draft
        self._draft_loader = draft_loader  # loads the draft on first use when `draft` is None
        self._draft_lock = threading.Lock()
        self._heads_dir = heads_dir
        self._heads: dict[str, torch.nn.Module] = {}
        self.eos_token_ids = set(eos_token_ids or ())
        self._busy = threading.Lock()
        self._methods: dict[str, Method] = {}  # one per method name, made on first use
        self._methods_lock = threading.Lock()  # requests may be built on several threads
        self._batched = None  # the batched runner over the target's weights (`batch_decoder`), made on first use
        self._batched_draft = None  # ... and over the draft model's
        self._batch_timings = None  # ... and what its steps cost, measured (`paradec.batch.StepTimings`)
        self.last_batch_counts = None  # the steps of the last `generate_batch` (`paradec.batch.StepCounts`)

    # --- resources lent to drafters -------------------------------------------------------------------------
    def draft_runner(self) -> Runner:
        """The draft model's runner, loaded now if it was registered but not loaded yet."""
        with self._draft_lock:  # two first uses (server threads) must not load it twice
            if self._draft is None and self._draft_loader is not None:
                self._draft = self._draft_loader()
                self._draft_loader = None
        if self._draft is None:
            raise ParadecError("method 'draft' needs a draft model: pass draft=... to paradec.load() or --draft DIR")
        return self._draft

    def heads(self, kind: str) -> torch.nn.Module:
        """Trained heads of `kind` ("medusa" or "eagle") for the target, loaded on first use."""
        if kind not in self._heads:
            if self._heads_dir is None:
                raise ParadecError(
                    f"method {kind!r} needs trained heads: pass heads=DIR to paradec.load() or --heads DIR "
                    f"(train them with `paradec train {kind} --model MODEL`)"
                )
            from paradec.heads import load_heads

            self._heads[kind] = load_heads(
                kind,
                self._heads_dir,
                hidden_size=self.target.hidden_size,
                vocab_size=self.target.vocab_size,
                device=self.target.device,
                dtype=self.target.dtype,
            )
        return self._heads[kind]

    # --- methods --------------------------------------------------------------------------------------------
    def method(self, name: str) -> Method:
        """The engine's `Method` of that name, made on first use; making it acquires what the method needs (a draft
        model, trained heads, the native runner), so a method this engine cannot run fails here."""
        drafter = get_drafter(name)
        with self._methods_lock:
            method = self._methods.get(name)
            if method is None:
                try:
                    method = drafter.method_class(self, drafter)
                except ParadecError as exc:
                    raise _with_param(exc, "method") from None
                self._methods[name] = method
        return method

    def set_default_options(self, method: str, options: dict | Options | None) -> None:
        """Set this engine's defaults of `method`'s options, engine settings included (e.g. EAGLE's `compile`,
        which a request may not change): a request's options apply over these. `paradec serve --opt` and
        `paradec generate --opt` call it; a dict's text values are converted as from the CLI."""
        self.method(method).set_defaults(options)

    # --- public API -----------------------------------------------------------------------------------------
    def request(
        self,
        prompt: Prompt | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        method: str = "vanilla",
        options: dict | Options | None = None,
        sampling: SamplingParams | dict | None = None,
        max_new_tokens: int = 128,
        stop: str | list[str] | None = None,
        n: int = 1,
    ) -> Request:
        """A checked `Request` for `prompt` (text or token ids) or chat `messages` (rendered by the model's chat
        template; exactly one of the two). `options` apply over the engine's defaults for `method`; `n` samples of
        it (1..16; sample i seeded seed + i). Raises `ParadecError` with `param` naming the bad parameter."""
        if (prompt is None) == (messages is None):
            raise ParadecError(
                "give either a prompt or chat messages" + (", not both" if prompt is not None else ""),
                param="prompt" if prompt is None else "messages",
            )
        sampling = sampling_params(sampling)
        n = check_n(n, sampling)
        decoding = self.method(method)
        try:
            parsed = decoding.request_options(options)
        except ParadecError as exc:
            raise _with_param(exc, "method_options") from None
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        stops = stop_strings(stop)
        if messages is None:
            prompt_ids, param = self.encode(prompt), "prompt"
        else:
            prompt_ids, param = self.encode_chat(messages), "messages"
        context = self.target.max_length
        if len(prompt_ids) >= context:
            raise ParadecError(
                f"the prompt is {len(prompt_ids)} tokens, the model's context is {context} tokens", param=param
            )
        total = len(prompt_ids) + max_new_tokens
        if total > context:
            raise ParadecError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's context of {context} tokens",
                param="max_new_tokens",
            )
        return Request(
            prompt_ids=tuple(prompt_ids),
            method=method,
            drafter=decoding.drafter_class,
            options=parsed,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            stops=stops,
            n=n,
        )

    def generate(
        self,
        prompt: Request | Prompt | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        method: str = "vanilla",
        sampling: SamplingParams | dict | None = None,
        max_new_tokens: int = 128,
        stop: str | list[str] | None = None,
        options: dict | Options | None = None,
        n: int = 1,
        speculate: str = "auto",
    ) -> Result | list[Result]:
        """Run a `Request`, or one built from the keywords as by `request`; returns text, new token ids and stats.

        With `n` > 1 (or a Request of n samples): the list of the n samples' results, by sample index (sample i
        seeded seed + i, so the choices differ and are reproducible; greedy gives n equal answers). On the native
        runner they decode as n sequences of one batch (`batch_decoder`; `speculate` is its speculation policy: auto,
        always or never), elsewhere one after another (`samples`)."""
        request = self._request_of(prompt, messages, method, sampling, max_new_tokens, stop, options, n)
        if request.n == 1:
            return self._generation(request).run()
        from paradec.batch import SPECULATE
        from paradec.runners.native import NativeRunner

        if speculate not in SPECULATE:
            raise ParadecError(f"speculate must be one of {', '.join(SPECULATE)}, got {speculate!r}", param="speculate")
        if not isinstance(self.target, NativeRunner) or not request.drafter.batchable:
            return [generation.run() for generation in self.samples(request)]
        decoder = self.batch_decoder(request.n, speculate=speculate)
        items = decoder.submit_samples(request)
        for _ in decoder.run(items):
            pass
        self.last_batch_counts = decoder.counts  # what its steps were (`paradec.batch.StepCounts`), for reports
        for item in items:
            if item.error is not None:
                raise item.error
        return [item.result for item in items]

    def stream(
        self,
        prompt: Request | Prompt | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        method: str = "vanilla",
        sampling: SamplingParams | dict | None = None,
        max_new_tokens: int = 128,
        stop: str | list[str] | None = None,
        options: dict | Options | None = None,
    ) -> Generation:
        """Like `generate`, but iterate the returned object for text pieces as tokens are accepted;
        its `.result` is set when the iteration ends. One sample: a Request of n > 1 streams through `samples`."""
        request = self._request_of(prompt, messages, method, sampling, max_new_tokens, stop, options, 1)
        if request.n != 1:
            raise ParadecError(
                f"stream() runs one sample, the request has n={request.n}: iterate Engine.samples(request) for one "
                "generation per sample, or call generate(n=...)",
                param="n",
            )
        return self._generation(request)

    def samples(self, request: Request) -> Iterator[Generation]:
        """The generations of `request`'s samples (`Request.samples`), one after another: each is opened once the
        one before was iterated to its end (or dropped), so its drafter may read the earlier samples' tokens as its
        siblings (`multisample`). How a runner that does not batch decodes n > 1."""
        from paradec.batch import Siblings, TokenView

        earlier: list[TokenView] = []
        shared: dict = {}
        for i, sample in enumerate(request.samples()):
            drafter = None
            if getattr(sample.drafter, "reads_siblings", False):
                siblings = Siblings(i, lambda: list(earlier), shared)
                drafter = self.method(sample.method).open_for(_SampleResources(self, siblings), sample.options)
            generation = self._generation(sample, drafter)
            yield generation
            state = generation.decoding.state
            earlier.append(TokenView(state.tokens, state.prompt_len, i))

    def _request_of(self, prompt, messages, method, sampling, max_new_tokens, stop, options, n) -> Request:
        """`prompt` itself when it is a Request (no other keyword may then be given), else the Request of them."""
        if isinstance(prompt, Request):
            given = (messages, method, sampling, max_new_tokens, stop, options, n)
            if given != (None, "vanilla", None, 128, None, None, 1):
                raise TypeError("stream()/generate() take a Request or a prompt with keywords, not both")
            return prompt
        return self.request(
            prompt,
            messages=messages,
            method=method,
            options=options,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            stop=stop,
            n=n,
        )

    def _generation(self, request: Request, drafter=None) -> Generation:
        """The generation of a request of one sample (with `drafter`, or one its method opens)."""
        if drafter is None:
            drafter = self.method(request.method).open(request.options)
        return Generation(
            self.target,
            drafter,
            self.tokenizer,
            list(request.prompt_ids),
            request.sampling,
            request.max_new_tokens,
            self.eos_token_ids,
            list(request.stops),
            request.method,
            lock=self._busy,
        )

    # --- batches ------------------------------------------------------------------------------------------------
    def batch_decoder(
        self,
        max_running: int = 16,
        *,
        speculate: str = "auto",
        prefill_chunk: int | None = None,
        overlap: bool = True,
    ):
        """A `paradec.batch.BatchDecoder` over this engine's batched runner (made on first use with `max_running`
        cache slots, sharing the target's weights; a later call may ask for at most as many). Needs the native
        runner; the generic HF runner decodes one sequence at a time. `overlap`: steps without proposals launch
        before the step in flight lands (`BatchDecoder`)."""
        from paradec.batch import DEFAULT_PREFILL_CHUNK, BatchDecoder, StepTimings
        from paradec.runners.native import BatchedNativeRunner, NativeRunner

        if not isinstance(self.target, NativeRunner):
            raise ParadecError(
                f"batched decoding needs the native runner; this engine runs {type(self.target).__name__} "
                "(load with runner='native', or decode one request at a time)",
                param="runner",
            )
        if not isinstance(max_running, int) or isinstance(max_running, bool) or max_running < 1:
            raise ParadecError(f"max_running must be an integer >= 1, got {max_running!r}", param="max_running")
        with self._methods_lock:
            runner = self._batched
            if runner is None or runner.slots < max_running:
                runner = BatchedNativeRunner.sharing(self.target, max_running)
                self._batched = runner
                self._batched_draft = None
                self._batch_timings = StepTimings()
            timings = self._batch_timings

        def draft_runner():
            if self._batched_draft is None:
                draft = self.draft_runner()
                if not isinstance(draft, NativeRunner):
                    raise ParadecError("batched decoding with method 'draft' needs a native-runner draft model")
                self._batched_draft = BatchedNativeRunner.sharing(draft, runner.slots)
            return self._batched_draft

        return BatchDecoder(
            self,
            runner,
            max_running=max_running,
            prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK,
            speculate=speculate,
            draft_runner=draft_runner,
            overlap=overlap,
            timings=timings,
        )

    def generate_batch(
        self,
        prompts: list[Request | Prompt],
        *,
        method: str = "vanilla",
        sampling: SamplingParams | dict | None = None,
        max_new_tokens: int = 128,
        stop: str | list[str] | None = None,
        options: dict | Options | None = None,
        max_batch: int | None = None,
        speculate: str = "auto",
        n: int = 1,
    ) -> list[Result] | list[list[Result]]:
        """Decode `prompts` (Requests, or prompts with the keywords as for `request`) together, at most `max_batch`
        sequences at a time (default: all), with continuous batching; results in the order given. Each result is
        what `generate` returns for it alone: a Result, or the list of its samples' results for a request of n > 1
        (its n samples are n sequences of the batch). On the generic HF runner they run one after another."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ParadecError("prompts must be a non-empty list", param="prompts")
        requests = [
            p
            if isinstance(p, Request)
            else self.request(
                p, method=method, options=options, sampling=sampling, max_new_tokens=max_new_tokens, stop=stop, n=n
            )
            for p in prompts
        ]
        from paradec.runners.native import NativeRunner

        if not isinstance(self.target, NativeRunner):
            return [self.generate(r) for r in requests]
        decoder = self.batch_decoder(max_batch or sum(r.n for r in requests), speculate=speculate)
        groups = [decoder.submit_samples(r) if r.n > 1 else [decoder.submit(r)] for r in requests]
        items = [item for group in groups for item in group]
        for _ in decoder.run(items):
            pass
        self.last_batch_counts = decoder.counts  # what its steps were (`paradec.batch.StepCounts`), for reports
        for item in items:
            if item.error is not None:
                raise item.error
        return [
            group[0].result if r.n == 1 else [i.result for i in group]
            for r, group in zip(requests, groups, strict=True)
        ]

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt -> token ids, validated (non-empty, ids inside the vocabulary); errors have param="prompt"."""
        if isinstance(prompt, str):
            if not prompt:
                raise ParadecError("prompt is empty", param="prompt")
            if self.tokenizer is None:
                raise ParadecError("this engine has no tokenizer: pass the prompt as token ids", param="prompt")
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.dim() != 1 or prompt.dtype not in (torch.int32, torch.int64):
                raise ParadecError(
                    f"prompt tensor must be 1-D integer token ids, got shape {tuple(prompt.shape)}", param="prompt"
                )
            ids = prompt.tolist()
        elif isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ParadecError("prompt list must hold integer token ids", param="prompt")
            ids = list(prompt)
        else:
            raise ParadecError(f"prompt must be a string or token ids, got {type(prompt).__name__}", param="prompt")
        if not ids:
            raise ParadecError("prompt is empty (it encodes to no tokens)", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise ParadecError(
                f"prompt token id {shown(bad[0])} is outside the vocabulary [0, {self.target.vocab_size})",
                param="prompt",
            )
        return ids

    def has_chat_template(self) -> bool:
        return has_chat_template(self.tokenizer)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation (OpenAI-style `{"role", "content"}` dicts, the last one from the user or a system) ->
        the prompt token ids of the model's own chat template, with the assistant turn opened; validated like
        `encode`. Raises `ParadecError` (param="messages") when the model has no chat template or a message is
        malformed."""
        if not self.has_chat_template():
            raise ParadecError(
                f"model {self.config.model!r} has no chat template: give a plain prompt instead of chat messages",
                param="messages",
            )
        try:
            text = chat_text(self.tokenizer, messages)
            # the template writes the special tokens itself (a BOS included, where the model has one)
            return self.encode(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        except ParadecError as exc:
            raise _with_param(exc, "messages", force=True) from None


class _SampleResources:
    """What the drafter of one of a request's samples decoded one after another (`Engine.samples`) is lent: the
    engine's resources, and the earlier samples' tokens as its siblings."""

    def __init__(self, engine: Engine, siblings) -> None:
        self._engine = engine
        self._siblings = siblings
        self.target = engine.target

    def draft_runner(self) -> Runner:
        return self._engine.draft_runner()

    def heads(self, kind: str) -> torch.nn.Module:
        return self._engine.heads(kind)

    def siblings(self):
        return self._siblings


def _with_param(exc: ParadecError, param: str, *, force: bool = False) -> ParadecError:
    """`exc` with `param` set (kept when it already names one, unless `force`)."""
    if exc.param is not None and not force:
        return exc
    return ParadecError(str(exc), param=param)


def _eos_ids(path: Path, tokenizer) -> set[int]:
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return ids


def load(
    model: str | Path | None = None,
    draft: str | Path | None = None,
    *,
    heads: str | Path | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    runner: str = "auto",
    exact: bool = False,
    tensor_parallel: bool = False,
) -> Engine:
    """Load a target and optionally a draft model with the same vocabulary.

    `model`: a zoo name (`paradec zoo list`, `code-8m`), a checkpoint directory, a `.gguf` file or a hub id;
    None = `paradec.zoo.DEFAULT_MODEL`, fetched on first use. `draft`: the same kinds of names; None = the draft
    registered for a zoo model, loaded when method 'draft' first needs it, else no draft. `heads`: a directory of
    trained heads; None = the model's own or packaged heads (`resolve_heads`). `exact`: the target runs the native
    runner's batch-invariant kernels, so every method's output is bitwise the vanilla output in bf16 too (True needs
    the native runner; off by default until its cost is measured on a GPU). Drafts never need them.
    `tensor_parallel`: this process is one rank of an initialised torch.distributed group
    (`paradec.runners.native.tp.init`): the target loads this rank's slices of its heads, MLP, embedding and LM head
    (its logits gathered whole on every rank); drafts, drafters and the decode loop run whole on every rank (SPMD,
    `paradec.runners.native.tp`)."""
    from paradec import zoo

    model = zoo.DEFAULT_MODEL if model is None else model
    model_dir = resolve_model_dir(model, "model")
    name = zoo.zoo_name(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(model_dir)
    load_draft = partial(_load_draft, model_dir=model_dir, tokenizer=tokenizer, runner=runner, device=dev, dtype=dt)
    draft_runner = None
    if draft is not None:
        draft_runner = load_draft(draft)
    else:
        draft = zoo.registered_draft(name)
    tp = None
    if tensor_parallel:
        from paradec.runners.native.tp import TensorParallel

        tp = TensorParallel.current()
    target = load_runner(model_dir, runner, dev, dt, exact=bool(exact), tensor_parallel=tp)
    heads_dir = resolve_heads(heads, model_dir, name)
    config = EngineConfig(
        model=str(model_dir),
        draft=None if draft is None else str(draft),
        heads=None if heads_dir is None else str(heads_dir),
        device=str(dev),
        dtype=str(dt).removeprefix("torch."),
        runner=type(target).__name__,
        exact=bool(exact),
    )
    return Engine(
        target,
        tokenizer,
        config,
        draft=draft_runner,
        draft_loader=None if draft_runner is not None or draft is None else partial(load_draft, draft),
        heads_dir=heads_dir,
        eos_token_ids=_eos_ids(model_dir, tokenizer),
    )


def _load_draft(
    draft: str | Path, *, model_dir: Path, tokenizer, runner: str, device: torch.device, dtype: torch.dtype
) -> Runner:
    draft_dir = resolve_model_dir(draft, "draft model")
    _check_same_vocab(model_dir, tokenizer, draft_dir)
    return load_runner(draft_dir, runner, device, dtype)


def resolve_heads(heads: str | Path | None, model_dir: Path, zoo_name: str | None) -> Path | None:
    """The trained heads for a target, first found of: `heads` (the user's), `<model dir>/heads` (where
    `paradec train` writes them by default), the heads packaged for the zoo model `zoo_name`; None if none."""
    from paradec import zoo

    if heads is not None:
        return resolve_heads_dir(heads)
    if (model_dir / "heads").is_dir():
        return model_dir / "heads"
    return None if zoo_name is None else zoo.packaged_heads_dir(zoo_name)


def resolve_heads_dir(heads: str | Path) -> Path:
    path = Path(heads).expanduser()
    if not path.is_dir():
        raise ParadecError(f"heads path {str(heads)!r} does not exist or is not a directory")
    return path


def _check_same_vocab(model_dir: Path, tokenizer, draft_dir: Path) -> None:
    from paradec.loading import read_config

    try:
        draft_vocab = load_tokenizer(draft_dir).get_vocab()
    except ParadecError:
        draft_vocab = None
    if draft_vocab is not None:
        if draft_vocab != tokenizer.get_vocab():
            raise ParadecError(
                f"draft model {str(draft_dir)!r} has a different vocabulary ({len(draft_vocab)} tokens) from the "
                f"target {str(model_dir)!r} ({len(tokenizer.get_vocab())} tokens); speculative decoding needs the "
                "same tokenizer"
            )
        return
    target_size, draft_size = read_config(model_dir).get("vocab_size"), read_config(draft_dir).get("vocab_size")
    if target_size != draft_size:
        raise ParadecError(
            f"draft model {str(draft_dir)!r} has vocab_size {draft_size}, the target {str(model_dir)!r} has {target_size}"
        )
