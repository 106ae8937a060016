"""The HTTP API of one simulated engine, shaped like vLLM's OpenAI-compatible server, plus the
/sim/state ground truth and /sim/faults switches."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvroute.errors import EngineError
from kvroute.sim.engine import Generation, SimEngine

__all__ = ["create_engine_app"]

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _error(message: str, status: int = 400, kind: str = "BadRequestError") -> JSONResponse:
    # vLLM's ErrorResponse, which the openai SDK turns into BadRequestError / NotFoundError.
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class _EngineCollector(Collector):
    """vLLM's gauges and counters, read from the engine at scrape time (one series per rank)."""

    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self._engine
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=labels,
        )
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels
        )
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels=labels,
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            labels=labels,
        )
        prompt = CounterMetricFamily(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels
        )
        generation = CounterMetricFamily(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels=labels
        )
        # vLLM's info gauge: the cache configuration in its labels, value 1, one per rank.
        config = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "enable_prefix_caching", "num_gpu_blocks", "engine"],
        )
        for r in e.all_ranks():
            s = r.scheduler
            values = [e.model, str(r.rank)]
            config.add_metric(
                [str(s.pool.block_size), "True", str(s.pool.num_blocks), str(r.rank)], 1.0
            )
            running.add_metric(values, r.num_running)
            waiting.add_metric(values, s.num_waiting)
            usage.add_metric(values, s.pool.usage())
            queries.add_metric(values, s.prefix_queries_tokens)
            hits.add_metric(values, s.prefix_hit_tokens)
            prompt.add_metric(values, s.prompt_tokens_total)
            generation.add_metric(values, s.generation_tokens_total)
        yield from (running, waiting, usage, queries, hits, prompt, generation, config)


def _sim_headers(gen: Generation) -> dict[str, str]:
    headers = {"x-sim-rank": str(gen.rank)}
    if gen.ttft_ms is not None:
        headers["x-sim-ttft-ms"] = f"{gen.ttft_ms:.6f}"
    if gen.e2e_ms is not None:
        headers["x-sim-e2e-ms"] = f"{gen.e2e_ms:.6f}"
    return headers


def _sim_block(gen: Generation) -> dict[str, Any]:
    """The simulator's own facts about a request (not in vLLM's responses): its times, the
    engine and rank that served it (a client behind any router can tell) and its cache hit."""
    return {
        "engine": gen.engine_name,
        "ttft_ms": gen.ttft_ms,
        "e2e_ms": gen.e2e_ms,
        "rank": gen.rank,
        "cached_tokens": gen.request.cached_tokens,
    }


def _usage(gen: Generation, completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = len(gen.request.prompt)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.request.cached_tokens},
    }


class _App:
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ["model_name", "engine"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        engine.ttft_observer.append(self._observe_ttft)

    def _observe_ttft(self, seconds: float, rank: int) -> None:
        self.ttft.labels(self.engine.model, str(rank)).observe(seconds)

    # -- helpers -------------------------------------------------------------------------------
    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _BadRequest(f"request body: expected JSON, got invalid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise _BadRequest(f"request body: expected a JSON object, got {type(body).__name__}")
        return body

    def _lora(self, body: dict[str, Any], *, required: bool = True) -> str | None:
        model = body.get("model")
        if model is None and not required:
            return None
        if not isinstance(model, str):
            raise _BadRequest(f"model: expected string, got {type(model).__name__}")
        try:
            return self.engine.resolve_model(model)
        except KeyError:
            raise _BadRequest(
                f"The model `{model}` does not exist.", 404, "NotFoundError"
            ) from None

    def _max_tokens(self, body: dict[str, Any], *keys: str) -> int:
        for key in keys:
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _BadRequest(f"{key}: expected a positive integer, got {value!r}")
            return value
        return self.engine.config.default_max_tokens

    def _prompt_ids(self, prompt: Any, add_special_tokens: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = tok.encode(prompt, add_special_tokens=add_special_tokens)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
            if any(t < 0 or t >= tok.vocab_size for t in ids):
                raise _BadRequest(f"prompt: token ids must be in [0, {tok.vocab_size})")
        else:
            raise _BadRequest(
                "prompt: expected a string, a list of token ids, or a batch of one of those"
            )
        if not ids:
            raise _BadRequest("prompt: expected at least one token, got none")
        return ids

    def _chat_ids(self, body: dict[str, Any], *, add_generation_prompt: bool = True) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages: expected a non-empty list of messages")
        try:
            return self.engine.tokenizer.encode_chat(
                messages, add_generation_prompt=add_generation_prompt
            )
        except ValueError as exc:
            raise _BadRequest(str(exc)) from exc

    def _submit(
        self, request: Request, ids: list[int], max_tokens: int, lora: str | None
    ) -> Generation:
        # vLLM's X-data-parallel-rank header pins a request to one DP rank.
        header = request.headers.get("x-data-parallel-rank")
        try:
            rank = None if header is None else int(header)
        except ValueError:
            raise _BadRequest(
                f"X-data-parallel-rank: expected an integer, got {header!r}"
            ) from None
        try:
            return self.engine.submit(ids, max_tokens, lora, rank=rank)
        except ValueError as exc:
            raise _BadRequest(str(exc)) from exc
        except EngineError as exc:
            raise _BadRequest(str(exc), 503, "ServiceUnavailableError") from exc

    # -- OpenAI endpoints ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        """`/v1/completions` or `/v1/chat/completions`: one request through the scheduler."""
        try:
            body = await self._json(request)
            lora = self._lora(body)
            if chat:
                ids = self._chat_ids(body)
                max_tokens = self._max_tokens(body, "max_completion_tokens", "max_tokens")
            else:
                if "prompt" not in body:
                    raise _BadRequest("prompt: field required")
                ids = self._prompt_ids(body["prompt"])
                max_tokens = self._max_tokens(body, "max_tokens")
            stream, include_usage = self._stream_flags(body)
            gen = self._submit(request, ids, max_tokens, lora)
        except _BadRequest as exc:
            return _error(str(exc), exc.status, exc.kind)
        model = body["model"]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if stream:
            return await self._stream(gen, rid, created, model, chat=chat, usage=include_usage)
        try:
            out = await gen.result()
        except EngineError as exc:
            return _error(str(exc), 500, "InternalServerError")
        finally:
            gen.cancel()
        text = self.engine.tokenizer.decode(out)
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason="length", stop_reason=None)
        payload = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _usage(gen, len(out)),
            "sim": _sim_block(gen),
        }
        return JSONResponse(payload, headers=_sim_headers(gen))

    @staticmethod
    def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest(f"stream: expected boolean, got {type(stream).__name__}")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise _BadRequest("stream_options: expected an object")
        return stream, bool(options.get("include_usage", False))

    async def _stream(
        self, gen: Generation, rid: str, created: int, model: str, *, chat: bool, usage: bool
    ) -> Response:
        """SSE. Headers wait for the first token so they can carry x-sim-ttft-ms; the end-to-end
        time only exists at the end, so it rides in a `sim` field of the last chunk."""
        tokens = gen.tokens()
        try:
            first = await anext(tokens)
        except StopAsyncIteration:
            first = None
        except EngineError as exc:
            gen.cancel()
            return _error(str(exc), 500, "InternalServerError")
        obj = "chat.completion.chunk" if chat else "text_completion"
        tok = self.engine.tokenizer

        def chunk(piece: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if piece is not None:
                    delta["content"] = piece
                choice["delta"] = delta
            else:
                choice["text"] = piece or ""
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }

        def sse(data: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        max_tokens = gen.request.max_tokens

        def piece(n: int, t: int) -> bytes:
            # The finish reason rides on the chunk of the last token, as in vLLM.
            last = n == max_tokens
            data = chunk(("" if n == 1 else " ") + tok.token_str(t), "length" if last else None)
            if last:
                data["sim"] = _sim_block(gen)
            return sse(data)

        async def body() -> AsyncIterator[bytes]:
            n = 0
            try:
                if chat:
                    yield sse(chunk("", None, role=True))
                if first is not None:
                    n += 1
                    yield piece(n, first)
                    async for t in tokens:
                        n += 1
                        yield piece(n, t)
                if usage:
                    final = {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(gen, n),
                        "sim": _sim_block(gen),
                    }
                    yield sse(final)
                yield b"data: [DONE]\n\n"
            except EngineError as exc:
                err = {"error": {"message": str(exc), "type": "InternalServerError", "code": 500}}
                yield sse(err)
            finally:
                gen.cancel()

        headers = _sim_headers(gen)
        headers["cache-control"] = "no-cache"
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    # -- vLLM's renderer: a request's token-in form, without generating ----------------------
    async def render_completions(self, request: Request) -> Response:
        """`/v1/completions/render`: a list of vLLM `GenerateRequest`s, one per prompt of the
        batch (routers such as vllm-router call it to route a text prompt on its tokens)."""
        try:
            body = await self._json(request)
            self._lora(body)
            if "prompt" not in body:
                raise _BadRequest("prompt: field required")
            prompt = body["prompt"]
            batch = (
                prompt
                if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list)
                else [prompt]
            )
            prompts = [self._prompt_ids(p) for p in batch]
            max_tokens = self._max_tokens(body, "max_tokens")
            self._stream_flags(body)
        except _BadRequest as exc:
            return _error(str(exc), exc.status, exc.kind)
        rid = f"cmpl-{uuid.uuid4().hex}"
        return JSONResponse(
            [
                _generate_request(f"{rid}-{i}", ids, body, max_tokens)
                for i, ids in enumerate(prompts)
            ]
        )

    async def render_chat(self, request: Request) -> Response:
        """`/v1/chat/completions/render`: one vLLM `GenerateRequest` (the chat template applied,
        with the generation prompt)."""
        try:
            body = await self._json(request)
            self._lora(body)
            ids = self._chat_ids(
                body, add_generation_prompt=bool(body.get("add_generation_prompt", True))
            )
            max_tokens = self._max_tokens(body, "max_completion_tokens", "max_tokens")
            self._stream_flags(body)
        except _BadRequest as exc:
            return _error(str(exc), exc.status, exc.kind)
        return JSONResponse(
            _generate_request(f"chatcmpl-{uuid.uuid4().hex}", ids, body, max_tokens)
        )

    # -- vLLM extras ---------------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        self.engine.tokenize_requests += 1
        try:
            body = await self._json(request)
            self._lora(body, required=False)
            if "messages" in body:
                add_gen = body.get("add_generation_prompt", True)
                if body.get("continue_final_message") and add_gen:
                    raise _BadRequest(
                        "continue_final_message and add_generation_prompt cannot both be true"
                    )
                ids = self._chat_ids(body, add_generation_prompt=bool(add_gen))
            elif "prompt" in body:
                prompt = body["prompt"]
                if not isinstance(prompt, str):
                    raise _BadRequest(f"prompt: expected string, got {type(prompt).__name__}")
                ids = self.engine.tokenizer.encode(
                    prompt, add_special_tokens=bool(body.get("add_special_tokens", True))
                )
            else:
                raise _BadRequest("expected either `prompt` or `messages`")
        except _BadRequest as exc:
            return _error(str(exc), exc.status, exc.kind)
        strs = (
            [self.engine.tokenizer.token_str(t) for t in ids]
            if body.get("return_token_strs")
            else None
        )
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": self.engine.config.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await self._json(request)
            self._lora(body, required=False)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**63 for t in tokens
            ):
                raise _BadRequest("tokens: expected a list of non-negative integer token ids")
        except _BadRequest as exc:
            return _error(str(exc), exc.status, exc.kind)
        return JSONResponse({"prompt": self.engine.tokenizer.decode(tokens)})

    async def models(self, request: Request) -> Response:
        e = self.engine
        created = int(time.time())
        data = [_model_card(e.model, e.model, None, created, e.config.max_model_len)]
        data += [_model_card(n, n, e.model, created, e.config.max_model_len) for n in e.lora]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def reset_prefix_cache(self, request: Request) -> Response:
        if not self.engine.reset_prefix_cache():
            return _error(
                "Failed to reset prefix cache: some blocks are still in use", 409, "ConflictError"
            )
        return Response(status_code=200)

    async def metrics(self, request: Request) -> Response:
        return Response(
            generate_latest(self.registry), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # -- simulator ground truth and faults -----------------------------------------------------
    async def sim_state(self, request: Request) -> Response:
        return JSONResponse(self.engine.state())

    async def sim_faults(self, request: Request) -> Response:
        try:
            body = await self._json(request)
            return JSONResponse(await apply_faults(self.engine, body))
        except _BadRequest as exc:
            return _error(str(exc), exc.status, exc.kind)


# Sampling fields of an OpenAI body that vLLM's renderer copies into `sampling_params`; the
# simulator returns these (and max_tokens) as given, not vLLM's every resolved default.
_SAMPLING_KEYS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "ignore_eos",
    "min_tokens",
)


def _generate_request(
    request_id: str, token_ids: list[int], body: dict[str, Any], max_tokens: int
) -> dict[str, Any]:
    """vLLM's `GenerateRequest` (vllm/entrypoints/serve/disagg/protocol.py) for one prompt."""
    sampling = {k: body[k] for k in _SAMPLING_KEYS if body.get(k) is not None}
    sampling["max_tokens"] = max_tokens
    return {
        "request_id": request_id,
        "token_ids": token_ids,
        "assistant_tokens_mask": None,
        "token_offsets": None,
        "features": None,
        "sampling_params": sampling,
        "model": body.get("model"),
        "stream": body.get("stream", False),
        "stream_options": body.get("stream_options"),
        "cache_salt": body.get("cache_salt"),
        "priority": body.get("priority", 0),
        "kv_transfer_params": body.get("kv_transfer_params"),
    }


def _model_card(
    model_id: str, root: str, parent: str | None, created: int, max_len: int
) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
        "permission": [],
    }


_FAULT_KEYS = ("rank", "drop_next", "restart", "replay", "duplicate_stores", "pause")


async def apply_faults(engine: SimEngine, body: dict[str, Any]) -> dict[str, Any]:
    """Apply /sim/faults switches: {"rank": r (default: every rank), "drop_next": N,
    "restart": true, "replay": "stop"|"start", "duplicate_stores": bool, "pause": bool}."""
    unknown = sorted(set(body) - set(_FAULT_KEYS))
    if unknown:
        raise _BadRequest(f"unknown fault switch(es) {unknown}; expected some of {_FAULT_KEYS}")
    rank = body.get("rank")
    if rank is not None and (not isinstance(rank, int) or rank not in engine.ranks):
        raise _BadRequest(f"rank: expected one of {engine.ranks}, got {rank!r}")
    drop = body.get("drop_next", 0)
    if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
        raise _BadRequest(f"drop_next: expected a non-negative integer, got {drop!r}")
    replay = body.get("replay")
    if replay not in (None, "stop", "start"):
        raise _BadRequest(f"replay: expected 'stop' or 'start', got {replay!r}")
    for key in ("restart", "duplicate_stores", "pause"):
        if key in body and not isinstance(body[key], bool):
            raise _BadRequest(f"{key}: expected boolean, got {body[key]!r}")
    if body.get("restart"):
        await engine.restart(rank)
    for r in engine.all_ranks():
        if rank is not None and r.rank != rank:
            continue
        if drop:
            r.publisher.drop_next(drop)
        if replay == "stop":
            await r.publisher.stop_replay()
        elif replay == "start":
            await r.publisher.start_replay()
        if "duplicate_stores" in body:
            r.duplicate_stores = body["duplicate_stores"]
        if body.get("pause") is True:
            r.publisher.pause()
        elif body.get("pause") is False:
            r.publisher.resume()
    return {
        "engine": engine.name,
        "ranks": [
            {
                "rank": r.rank,
                "next_seq": r.publisher.next_seq,
                "duplicate_stores": r.duplicate_stores,
            }
            for r in engine.all_ranks()
        ],
    }


def create_engine_app(engine: SimEngine) -> Starlette:
    """The Starlette app of one simulated engine (explicitly built; no module-level app)."""
    app = _App(engine)
    routes = [
        Route("/v1/completions", app.completions, methods=["POST"]),
        Route("/v1/chat/completions", app.chat, methods=["POST"]),
        Route("/v1/completions/render", app.render_completions, methods=["POST"]),
        Route("/v1/chat/completions/render", app.render_chat, methods=["POST"]),
        Route("/tokenize", app.tokenize, methods=["POST"]),
        Route("/detokenize", app.detokenize, methods=["POST"]),
        Route("/v1/models", app.models, methods=["GET"]),
        Route("/health", app.health, methods=["GET"]),
        Route("/ping", app.health, methods=["GET", "POST"]),
        Route("/reset_prefix_cache", app.reset_prefix_cache, methods=["POST"]),
        Route("/metrics", app.metrics, methods=["GET"]),
        Route("/sim/state", app.sim_state, methods=["GET"]),
        Route("/sim/faults", app.sim_faults, methods=["POST"]),
    ]
    return Starlette(routes=routes)
