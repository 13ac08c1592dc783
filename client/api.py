"""`swarm api`: an OpenAI-compatible HTTP server backed by the client library.

    swarm api --model /models/Llama-3.1-8B --initial-peers MADDR... --port 8000

Serves /v1/models, /v1/completions and /v1/chat/completions (the tokenizer's chat template), with
`stream: true` as server-sent events, temperature, top_p, max_tokens and stop. Every request generates in a
worker thread with its own inference session through the swarm (DistributedModelForCausalLM.generate), so
concurrent requests share the swarm's nodes, and their decode steps share the client's forward
(client/batching.py); tokens reach the event loop as they are chosen. Errors come in
OpenAI's format: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from aiohttp import web
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from client.cli import add_model_arguments, load_model, render, sampling_options
from client.session import NodeError
from swarm import logs
from swarm.routing import RoutingError

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as OpenAI's API


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]

    @classmethod
    def parse(cls, request: dict, default_max_tokens: int) -> Sampling:
        for name in ("n", "best_of"):
            if request.get(name, 1) not in (1, None):
                raise APIError(400, f"{name} must be 1: one completion per request", param=name)
        if request.get("echo") or request.get("logprobs") or request.get("top_logprobs"):
            raise APIError(400, "echo and logprobs are not supported", param="logprobs")
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or default_max_tokens
        temperature, top_p = request.get("temperature", 1.0), request.get("top_p", 1.0)
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        checks = [(isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1, "max_tokens",
                   "a positive integer"),
                  (_number(temperature) and 0 <= temperature <= 2, "temperature", "a number in [0, 2]"),
                  (_number(top_p) and 0 < top_p <= 1, "top_p", "a number in (0, 1]"),
                  (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in stop),
                   "stop", f"a string or a list of up to {MAX_STOP_STRINGS} non-empty strings")]
        for ok, name, what in checks:
            if not ok:
                raise APIError(400, f"{name} must be {what}", param=name)
        return cls(max_tokens, float(temperature), float(top_p), stop)

    def generate_options(self) -> dict:
        return sampling_options(self.temperature, self.top_p)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _TokenStream:
    """A transformers streamer that hands each new token to the event loop; the first put is the prompt."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.flatten().tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, error)


class _Detokenizer:
    """The text of a growing list of tokens, as decoding them all at once gives it, at the cost per token of
    decoding a few: decoding every token so far on each new one made long completions ever slower, and held the
    GIL from the thread that generates.

    Each new piece is the text a window of recent tokens adds over the same window without its newest ones:
    the older tokens in the window give the seam the spacing that a whole decode gives it. Tokens that end
    inside a character (a partial UTF-8 sequence) wait for the rest of it."""

    CONTEXT = 4  # tokens kept in the window before the new ones

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._start = self._read = 0  # the window begins at tokens[_start]; tokens[_read:] are not in text yet

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, tokens: list[int]) -> None:
        self.tokens += tokens
        window = self._decode(self.tokens[self._start:])
        if not window.endswith("\ufffd"):
            self._take(window)

    def finish(self) -> None:
        """Take what still waits, partial characters and all (as a whole decode shows them)."""
        if self._read < len(self.tokens):
            self._take(self._decode(self.tokens[self._start:]))

    def _take(self, window: str) -> None:
        self.text += window[len(self._decode(self.tokens[self._start:self._read])):]
        self._read = len(self.tokens)
        self._start = max(0, self._read - self.CONTEXT)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Server:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_concurrency: int = 16,
                 default_max_tokens: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.name = model.swarm_model_name
        self.default_max_tokens = default_max_tokens
        self.workers = ThreadPoolExecutor(max_concurrency, thread_name_prefix="generate")
        self.max_length = getattr(model.config, "max_position_embeddings", None)
        self.eos = set(_as_list(model.generation_config.eos_token_id) or _as_list(tokenizer.eos_token_id))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.on_cleanup.append(lambda app: asyncio.to_thread(self.workers.shutdown, cancel_futures=True))
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as e:
            return web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:
            return web.json_response(APIError(e.status, e.reason, code=str(e.status)).body(), status=e.status)
        except Exception as e:
            logger.exception("request failed")
            error = _swarm_error(e)
            return web.json_response(error.body(), status=error.status)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": 0, "owned_by": "swarm"}]})

    async def _request(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") != self.name:
            raise APIError(404, f"the model {body.get('model')!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        return body

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt")
        sampling = Sampling.parse(body, 16)  # OpenAI's default for completions
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        return await self._respond(request, body, ids, sampling, "cmpl", "text_completion",
                                   lambda text: {"text": text, "logprobs": None}, lambda text: {"text": text})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise APIError(400, "messages must be a non-empty list of {role, content} with string content",
                           param="messages")
        if self.tokenizer.chat_template is None:
            raise APIError(400, f"{self.name}'s tokenizer has no chat template; use /v1/completions", param="messages")
        ids = render(self.tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
        sampling = Sampling.parse(body, self.default_max_tokens)
        return await self._respond(request, body, ids, sampling, "chatcmpl", "chat.completion",
                                   lambda text: {"message": {"role": "assistant", "content": text}},
                                   lambda text: {"delta": {"content": text}})

    async def _respond(self, request: web.Request, body: dict, ids: torch.Tensor, sampling: Sampling, prefix: str,
                       kind: str, choice, delta) -> web.StreamResponse:
        if self.max_length and ids.shape[1] + sampling.max_tokens > self.max_length:
            raise APIError(400, f"the prompt's {ids.shape[1]} tokens and max_tokens {sampling.max_tokens} exceed the "
                                f"model's {self.max_length} positions", param="max_tokens")
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        async with contextlib.aclosing(self._generate(ids, sampling)) as pieces:
            if not body.get("stream"):
                return await self._whole(head, kind, ids, pieces, choice)
            return await self._stream(request, body, head, kind, ids, pieces, delta)

    async def _whole(self, head: dict, kind: str, ids: torch.Tensor, pieces, choice) -> web.Response:
        text, finish, completion_tokens = "", None, 0
        async for piece, finish, completion_tokens in pieces:
            text += piece
        return web.json_response({**head, "object": kind, "choices": [{"index": 0, **choice(text), "finish_reason": finish}],
                                  "usage": _usage(ids.shape[1], completion_tokens)})

    async def _stream(self, request: web.Request, body: dict, head: dict, kind: str, ids: torch.Tensor, pieces,
                      delta) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind

        async def send(event: dict) -> None:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        completion_tokens = 0
        try:
            if kind == "chat.completion":
                await send({**head, "object": chunk_kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                                       "finish_reason": None}]})
            async for piece, finish, completion_tokens in pieces:
                if piece or finish:
                    await send({**head, "object": chunk_kind, "choices": [{"index": 0, **delta(piece),
                                                                           "finish_reason": finish}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                await send({**head, "object": chunk_kind, "choices": [], "usage": _usage(ids.shape[1], completion_tokens)})
        except Exception as e:  # the status line is gone: the error travels as an event, as OpenAI's does
            if isinstance(e, ConnectionResetError):
                raise
            logger.exception("streamed request failed")
            await send(_swarm_error(e).body())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _generate(self, ids: torch.Tensor, sampling: Sampling) -> AsyncIterator[tuple[str, str | None, int]]:
        """Yields (new text, finish reason or None, tokens so far). Text that may begin a stop string, or ends
        inside a multi-byte character (_Detokenizer), is held back until it is known."""
        stream, cancelled = _TokenStream(asyncio.get_running_loop()), threading.Event()
        ids = ids.to(self.model.device)

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_tokens,
                                        streamer=stream, stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                                        **sampling.generate_options())
            except BaseException as e:
                stream.fail(e)

        worker = asyncio.get_running_loop().run_in_executor(self.workers, work)
        text = _Detokenizer(self.tokenizer)
        tokens = text.tokens
        sent = 0
        try:
            while (new := await stream.queue.get()) is not None:
                if isinstance(new, BaseException):
                    raise new
                text.add(new)
                last = tokens[-1] in self.eos or len(tokens) >= sampling.max_tokens
                if last:
                    text.finish()
                stop = _find_stop(text.text, sampling.stop, max(0, sent - max(map(len, sampling.stop), default=0)))
                if stop is not None:
                    yield text.text[sent:stop], "stop", len(tokens)
                    return
                if last:
                    yield text.text[sent:], "stop" if tokens[-1] in self.eos else "length", len(tokens)
                    return
                safe = _safe_length(text.text, sampling.stop)
                if safe > sent:
                    yield text.text[sent:safe], None, len(tokens)
                    sent = safe
            text.finish()  # stopped early: cancelled or a criterion
            yield text.text[sent:], "stop", len(tokens)
        finally:
            cancelled.set()
            await asyncio.shield(worker)  # the session closes before the request ends


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of text can be sent: all but a suffix that begins a stop string."""
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return len(text) - held


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _swarm_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, (RoutingError, NodeError, TimeoutError)):
        return APIError(503, f"the swarm could not serve the request: {e}", type="server_error", code="swarm_unavailable")
    return APIError(500, f"internal error: {e!r}", type="server_error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-concurrency", type=int, default=16,
                        help="requests generating at once; more wait for a free slot")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="max_tokens of chat completions that do not set it")
    logs.add_arguments(parser)


def run(args: argparse.Namespace) -> None:
    logs.setup(args.log_format)
    model, tokenizer = load_model(args)
    server = Server(model, tokenizer, args.max_concurrency, args.default_max_tokens)
    try:
        web.run_app(server.app(), host=args.host, port=args.port, access_log=None,
                    print=lambda text: print(f"serving {server.name} at http://{args.host}:{args.port}/v1", flush=True))
    finally:
        model.shutdown()
