"""From an HTTP request to an engine call: who may ask, what was sent, and what it asks of the engine.

    authorize       API key (401)
    read_json       content type (415), declared and actual size (413), a read deadline (408), JSON (400), schema (422)
    completion_ask  the body's values as an `Ask` (unsupported OpenAI features: 400; another model's name: 404)
    chat_ask
    PromptBound     a prompt whose bytes cannot fit the context: 400 before any tokenization
    prepare         the engine checks the `Ask` (`Engine.request`) and builds its generation (400 naming the parameter)

`prepare` is the only place the server hands a request's values to the engine; the app calls it on a thread, since
it tokenizes.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from paradec.decode import Generation
from paradec.errors import ParadecError, shown
from paradec.request import Request as EngineRequest
from paradec.server.errors import CLIENT_CLOSED, APIError, schema_error
from paradec.server.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)
CLOSE = {"Connection": "close"}  # on an error that leaves a body unread which may be huge, or never come

RequestT = TypeVar("RequestT", bound=BaseModel)


def authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
        raise APIError(
            401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
        )


async def read_json(request: Request, schema: type[RequestT], *, max_bytes: int, timeout: float) -> RequestT:
    """The body as `schema`, read within `timeout` seconds of the call (a client that stalls its body gets 408)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            f"the request body must be JSON with 'Content-Type: application/json', got {shown(media_type or 'none')}",
            code="unsupported_media_type",
        )
    too_large = APIError(413, f"the request body exceeds {max_bytes} bytes", code="request_too_large", headers=CLOSE)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise too_large
    except TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {timeout:g} s", code="request_timeout", headers=CLOSE
        ) from None
    except ClientDisconnect:
        raise APIError(CLIENT_CLOSED, "the client disconnected before sending the whole body") from None
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise schema_error(exc) from None


@dataclass(frozen=True)
class Ask:
    """What a request asks of the engine, before the engine has checked it."""

    prompt: str | list[int] | None  # a completion's prompt (text or token ids)
    messages: list[dict[str, str]] | None  # a chat's conversation, in the engine's `encode_chat` form
    method: str
    options: dict[str, Any] | None  # over the engine's defaults for `method` (the server's --opt); None: those
    sampling: dict[str, Any]  # SamplingParams' fields
    max_new_tokens: int | None  # None: the rest of the model's context
    stop: str | list[str] | None
    max_tokens_param: str = "max_tokens"  # the name the request gave `max_new_tokens`: errors answer under it
    n: int = 1  # choices: samples of the prompt (the engine checks the range)

    def text_size(self) -> int:
        """UTF-8 bytes of the prompt's text (0 for token ids): a chat prompt holds at least its messages' contents."""
        if self.messages is not None:
            texts = [turn["content"] for turn in self.messages]
        else:
            texts = [self.prompt] if isinstance(self.prompt, str) else []
        return sum(len(text.encode()) for text in texts)


def check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(
            404,
            f"model {shown(name)} does not exist: this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def completion_ask(body: CompletionRequest, served: str, method: str) -> Ask:
    for name, unsupported in (
        ("echo", body.echo),
        ("logprobs", body.logprobs is not None),
        ("suffix", bool(body.suffix)),
        ("best_of", body.best_of not in (None, 1)),
    ):
        if unsupported:
            raise APIError(400, f"{name} is not supported by paradec", param=name, code="unsupported_parameter")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    return _ask(body, served, method, prompt=prompt, messages=None, max_new_tokens=max_tokens)


def chat_ask(body: ChatCompletionRequest, served: str, method: str) -> Ask:
    if body.logprobs or body.top_logprobs is not None:
        raise APIError(400, "logprobs is not supported by paradec", param="logprobs", code="unsupported_parameter")
    conversation = []
    for message in body.messages:
        turn = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        if message.name is not None:
            turn["name"] = message.name
        conversation.append(turn)
    given = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _ask(body, served, method, prompt=None, messages=conversation, max_new_tokens=max_tokens, param=given)


def _ask(
    body: GenerationRequest,
    served: str,
    method: str,
    *,
    prompt: str | list[int] | None,
    messages: list[dict[str, str]] | None,
    max_new_tokens: int | None,
    param: str = "max_tokens",
) -> Ask:
    """The fields both endpoints share; `method` is the server's, for a request that names none."""
    check_model(body.model, served)
    for name, value, neutral in (
        ("presence_penalty", body.presence_penalty, 0.0),
        ("frequency_penalty", body.frequency_penalty, 0.0),
    ):
        if value != neutral:
            raise APIError(
                400,
                f"{name}={shown(value)} is not supported (only {neutral})",
                param=name,
                code="unsupported_parameter",
            )
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    return Ask(
        prompt=prompt,
        messages=messages,
        method=method if body.method is None else body.method,
        options=body.method_options,
        sampling=dict(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed
        ),
        max_new_tokens=max_new_tokens,
        stop=body.stop,
        max_tokens_param=param,
        n=body.n,
    )


class PromptBound:
    """Refuses, before tokenization, a prompt too long for the model's context.

    A token stands for at most `max_token_bytes` bytes of text: 4 (the most bytes of a UTF-8 character) times the
    characters of the tokenizer's longest token (a byte-level BPE's characters are single bytes, so this is loose
    there, never too tight). A text of more than `context * max_token_bytes` bytes therefore needs more tokens than
    the context holds; a token-id prompt is simply counted. (Only a normalizer that deletes text, collapsing runs of
    spaces say, could make a refused text fit: such a prompt is refused anyway.)
    """

    def __init__(self, context: int, tokenizer) -> None:
        self.context = context
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        self.max_token_bytes = 4 * max((len(token) for token in vocab), default=0)

    @property
    def max_bytes(self) -> int:
        return self.context * self.max_token_bytes

    def check(self, ask: Ask) -> None:
        param = "prompt" if ask.messages is None else "messages"
        if isinstance(ask.prompt, list) and len(ask.prompt) >= self.context:
            raise APIError(
                400,
                f"the prompt is {len(ask.prompt)} tokens, the model's context is {self.context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        size = ask.text_size()
        if self.max_token_bytes and size > self.max_bytes:
            raise APIError(
                400,
                f"the prompt is {size} bytes, more than the model's context of {self.context} tokens can hold "
                f"(at most {self.max_bytes} bytes with this tokenizer)",
                param=param,
                code="context_length_exceeded",
            )


@dataclass(frozen=True)
class Prepared:
    """An `Ask` the engine accepted: `start()` builds the generation (on the worker's thread; n > 1: `samples()`
    the samples' generations, one after another); `request` is its checked input, which a batched scheduler decodes
    in its batch instead (n > 1: as n sequences)."""

    start: Callable[[], Generation]
    prompt_tokens: int
    request: EngineRequest | None = None
    samples: Callable[[], Iterator[Generation]] | None = None

    @property
    def n(self) -> int:
        return 1 if self.request is None else self.request.n


def prepare(engine, ask: Ask) -> Prepared:
    """The engine's checks of `ask` (`Engine.request`: each failure a `ParadecError` whose `param` names the
    parameter; see `engine_error` for the names the API uses), and the call that will run it.

    A chat is rendered and tokenized first, because its default length is the rest of the context."""
    prompt = ask.prompt
    max_new_tokens = ask.max_new_tokens
    if ask.messages is not None:
        prompt = engine.encode_chat(ask.messages)
        if max_new_tokens is None:
            max_new_tokens = max(engine.target.max_length - len(prompt), 1)
    request = engine.request(
        prompt,
        method=ask.method,
        options=ask.options,
        sampling=ask.sampling,
        max_new_tokens=max_new_tokens,
        stop=ask.stop,
        n=ask.n,
    )
    if request.n > 1:
        first = request.samples()[0]
        samples = functools.partial(engine.samples, request)
        return Prepared(functools.partial(engine.stream, first), len(request.prompt_ids), request, samples)
    return Prepared(functools.partial(engine.stream, request), len(request.prompt_ids), request)


def engine_error(exc: ParadecError, ask: Ask) -> APIError:
    """The engine's refusal of `ask` as a 400, under the API's names of the parameter: `max_new_tokens` is what the
    request called it (`max_tokens`, `max_completion_tokens`), and a chat's prompt is its `messages`."""
    param = exc.param
    if param == "max_new_tokens":
        param = ask.max_tokens_param
    elif param == "prompt" and ask.messages is not None:
        param = "messages"
    return APIError(400, str(exc), param=param)
