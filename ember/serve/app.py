"""The OpenAI-compatible HTTP server (FastAPI) over the engine runner.

    GET  /health                 200 {"status": "ok"} (no key needed; 503 once the engine has failed)
    GET  /v1/models              the served model
    POST /v1/completions         prompt(s) -> text; stream (SSE), echo, logprobs, n, stop, seed, ...
    POST /v1/chat/completions    messages -> the model's chat template -> reply; stream, logprobs
    GET  /metrics                Prometheus text: requests running / waiting, KV blocks, tokens/s, TTFT
    GET  /                       the chat page (static HTML; it asks for the key and sends it itself)

Every route but /health and the page needs `Authorization: Bearer KEY` when keys are set. Errors
have OpenAI's shape {"error": {"message", "type", "param", "code"}} with 400 (bad field), 401 (key),
404 (model or route), 413 (body too large), 429 (queue full) and 503 (engine stopped). A client that
disconnects, streaming or not, has its request aborted and its KV blocks freed before the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.infer.engine import Request, RequestParams, SeqDelta
from ember.serve import protocol as P
from ember.serve.runner import TTFT_BUCKETS, EngineRunner, Finished
from ember.tokenizer.chat import NEW_TURN

PAGE = Path(__file__).with_name("static") / "chat.html"
OPEN_PATHS = ("/health", "/", "/favicon.ico")


@dataclass
class ServerSettings:
    model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    max_queue: int = 256
    """Requests that may wait beyond the running batch; more get 429."""
    max_prompt_tokens: Optional[int] = None
    max_tokens: Optional[int] = None
    max_n: int = 8


def create_app(runner: EngineRunner, tokenizer: Any, settings: ServerSettings):
    engine = runner.engine
    ctx = engine.max_model_len
    limits = P.Limits(context=ctx, max_prompt_tokens=min(settings.max_prompt_tokens or ctx, ctx),
                      max_tokens=min(settings.max_tokens or ctx, ctx), max_n=settings.max_n)
    capacity = engine.cfg.max_num_seqs + settings.max_queue
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        runner.shutdown()

    app = FastAPI(title="ember", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def err(status: int, message: str, kind: str, param: Optional[str] = None) -> JSONResponse:
        return JSONResponse(P.error_body(message, kind, status, param), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return err(exc.status_code, msg, kind)

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        if settings.api_keys and request.url.path not in OPEN_PATHS:
            auth = request.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
                return err(401, "missing or invalid API key: send 'Authorization: Bearer KEY'.",
                           "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return err(413, f"the request body is {length} bytes, more than this server's limit of "
                            f"{settings.max_body_bytes}.", "invalid_request_error")
        return await call_next(request)

    async def read_json(request: HTTPRequest) -> dict:
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise P.BadRequest(f"the request body is more than this server's limit of "
                                   f"{settings.max_body_bytes} bytes.", None, 413)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise P.BadRequest("the body must be a JSON object.")
        model = body.get("model")
        if model is not None and model != settings.model_name:
            raise P.BadRequest(f"the model '{model}' does not exist; this server serves "
                               f"'{settings.model_name}'.", "model", 404, "not_found_error")
        return body

    def admit(n: int) -> None:
        if runner.failed:
            raise P.BadRequest(f"the engine has stopped: {runner.failed}", None, 503, "server_error")
        if runner.in_flight + n > capacity:
            raise P.BadRequest(f"the server is at capacity ({runner.in_flight} requests in flight, at most "
                               f"{capacity}); retry later.", None, 429, "rate_limit_error")

    def submit_all(prompts: list[list[int]], params: RequestParams, prefix: str) -> list[tuple[str, asyncio.Queue]]:
        out = []
        for i, p in enumerate(prompts):
            rid = f"{prefix}-{i}"
            out.append((rid, runner.submit(p, params, rid)))
        return out

    async def items(queues: list[tuple[str, asyncio.Queue]], request: HTTPRequest) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, SeqDelta or Finished) as they arrive; aborts everything if the client leaves."""
        pending = {i: q for i, (_, q) in enumerate(queues)}
        getters: dict[int, asyncio.Task] = {}
        try:
            while pending:
                for i, q in pending.items():
                    if i not in getters:
                        getters[i] = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait(getters.values(), timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                if not done and await request.is_disconnected():
                    return
                for i in [i for i, t in getters.items() if t in done]:
                    item = getters.pop(i).result()
                    if isinstance(item, Finished):
                        del pending[i]
                    yield i, item
        finally:
            for t in getters.values():
                t.cancel()
            for rid, _ in queues:
                runner.abort(rid)  # a no-op for finished requests

    def finished_error(item: Finished) -> Optional[P.BadRequest]:
        if item.error is None:
            return None
        if runner.failed:
            return P.BadRequest(item.error, None, 503, "server_error")
        return P.BadRequest(item.error.removeprefix("request: "))

    def stream_chunk(cid: str, kind: str, choices: list, include_usage: bool, usage: Optional[dict]) -> dict:
        """One streamed event body; with stream_options.include_usage every chunk has "usage" (null but
        in the last one), as OpenAI sends it."""
        out = {"id": cid, "object": kind, "created": int(time.time()), "model": settings.model_name,
               "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # ----------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        if runner.failed:
            return err(503, f"the engine has stopped: {runner.failed}", "server_error")
        return {"status": "ok"}

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "ember", "max_model_len": ctx}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(runner), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        try:
            body = await read_json(request)
            prompts = P.completion_prompts(body, tokenizer)
            params = P.sampling_params(body, limits, chat=False, prompt_len=max(len(p) for p in prompts))
            echo = bool(body.get("echo"))
            stream = bool(P.get_field(body, "stream", (bool,), False))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
            admit(len(prompts))
        except P.BadRequest as e:
            return err(e.status, e.message, e.kind, e.param)
        cid = f"cmpl-{uuid.uuid4().hex}"
        queues = submit_all(prompts, params, cid)
        n = params.n

        def chunk(choices: list, usage: Optional[dict] = None) -> dict:
            return stream_chunk(cid, "text_completion", choices, include_usage, usage)

        if stream:
            async def gen():
                reqs: list[Request] = []
                if echo:
                    for i, p in enumerate(prompts):
                        for j in range(n):
                            yield sse(chunk([{"index": i * n + j, "text": tokenizer.decode(p), "logprobs": None,
                                              "finish_reason": None}]))
                async for i, item in items(queues, request):
                    if isinstance(item, Finished):
                        e = finished_error(item)
                        if e is not None:
                            yield sse(P.error_body(e.message, e.kind, e.status))
                            return
                        reqs.append(item.request)
                        continue
                    lp = None
                    if params.logprobs is not None:
                        lp = P.completion_logprobs(tokenizer, item.logprobs, item.token_ids)
                    yield sse(chunk([{"index": i * n + item.index, "text": item.text, "logprobs": lp,
                                      "finish_reason": item.finish_reason if item.finished else None}]))
                if include_usage:
                    yield sse(chunk([], P.usage(reqs)))
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        done: dict[int, Request] = {}
        async for i, item in items(queues, request):
            if isinstance(item, Finished):
                e = finished_error(item)
                if e is not None:
                    return err(e.status, e.message, e.kind, e.param)
                done[i] = item.request
        if len(done) < len(prompts):
            return Response(status_code=499)  # the client left
        choices = []
        for i in range(len(prompts)):
            req = done[i]
            for s in req.seqs:
                text, lp = s.text, None
                if echo:
                    text = tokenizer.decode(req.prompt) + text
                if params.logprobs is not None:
                    ids, lps = s.output, s.logprobs
                    if echo:
                        ids, lps = req.prompt + ids, list(req.prompt_logprobs or [None] * len(req.prompt)) + lps
                    lp = P.completion_logprobs(tokenizer, lps, ids)
                choices.append({"index": i * n + s.index, "text": text, "logprobs": lp,
                                "finish_reason": s.finish_reason})
        return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": settings.model_name,
                "choices": choices, "usage": P.usage([done[i] for i in range(len(prompts))])}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        try:
            body = await read_json(request)
            prompt = P.chat_prompt(body, tokenizer)
            params = P.sampling_params(body, limits, chat=True, prompt_len=len(prompt))
            params.stop = tuple(params.stop) + NEW_TURN  # a model that opens a new turn has ended its reply
            stream = bool(P.get_field(body, "stream", (bool,), False))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
            admit(1)
        except P.BadRequest as e:
            return err(e.status, e.message, e.kind, e.param)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        queues = submit_all([prompt], params, cid)

        def chunk(choices: list, usage: Optional[dict] = None) -> dict:
            return stream_chunk(cid, "chat.completion.chunk", choices, include_usage, usage)

        if stream:
            async def gen():
                for j in range(params.n):
                    yield sse(chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]))
                req = None
                async for _, item in items(queues, request):
                    if isinstance(item, Finished):
                        e = finished_error(item)
                        if e is not None:
                            yield sse(P.error_body(e.message, e.kind, e.status))
                            return
                        req = item.request
                        continue
                    d: SeqDelta = item
                    lp = P.chat_logprobs(tokenizer, d.logprobs) if params.logprobs is not None else None
                    if d.text or lp:
                        yield sse(chunk([{"index": d.index, "delta": {"content": d.text}, "logprobs": lp,
                                          "finish_reason": None}]))
                    if d.finished:
                        yield sse(chunk([{"index": d.index, "delta": {}, "logprobs": None,
                                          "finish_reason": d.finish_reason}]))
                if include_usage and req is not None:
                    yield sse(chunk([], P.usage([req])))
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        req = None
        async for _, item in items(queues, request):
            if isinstance(item, Finished):
                e = finished_error(item)
                if e is not None:
                    return err(e.status, e.message, e.kind, e.param)
                req = item.request
        if req is None:
            return Response(status_code=499)
        choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                    "logprobs": P.chat_logprobs(tokenizer, s.logprobs) if params.logprobs is not None else None,
                    "finish_reason": s.finish_reason} for s in req.seqs]
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": settings.model_name,
                "choices": choices, "usage": P.usage([req])}

    @app.exception_handler(P.BadRequest)
    async def bad_request(request, exc: P.BadRequest):
        return err(exc.status, exc.message, exc.kind, exc.param)

    return app


def prometheus(runner: EngineRunner) -> str:
    """The /metrics page (Prometheus text format 0.0.4)."""
    eng = runner.engine
    kv = eng.kv_usage()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: Any, labels: str = "") -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

    metric("ember_requests_running", "gauge", "Sequences in the running batch.", len(eng.running))
    metric("ember_requests_waiting", "gauge", "Sequences waiting to be scheduled.", len(eng.waiting))
    metric("ember_kv_blocks_used", "gauge", "KV cache blocks in use.", kv["blocks_used"])
    metric("ember_kv_blocks_total", "gauge", "KV cache blocks in the pool.", kv["blocks_total"])
    metric("ember_kv_usage_ratio", "gauge", "Share of KV blocks in use.", round(kv["blocks_used"] / kv["blocks_total"], 6))
    metric("ember_kv_waste_ratio", "gauge", "Share of allocated KV slots that hold no token.", round(kv["waste"], 6))
    metric("ember_generation_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           round(runner.tokens_per_second(), 3))
    metric("ember_prompt_tokens_total", "counter", "Prompt tokens computed.", eng.stats["prompt_tokens"])
    metric("ember_generation_tokens_total", "counter", "Tokens generated.", eng.stats["generated_tokens"])
    metric("ember_cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
           eng.stats["cached_tokens"])
    metric("ember_preemptions_total", "counter", "Sequences preempted (recomputed later).", eng.stats["preemptions"])
    metric("ember_spec_proposed_tokens_total", "counter", "Tokens proposed by speculative decoding.",
           eng.stats["spec_proposed"])
    metric("ember_spec_accepted_tokens_total", "counter", "Proposed tokens the model accepted.",
           eng.stats["spec_accepted"])
    lines += ["# HELP ember_request_finished_total Finished sequences by finish reason.",
              "# TYPE ember_request_finished_total counter"]
    for reason, count in sorted(runner.finished_by_reason.copy().items()):  # copy: the engine thread writes it
        lines.append(f'ember_request_finished_total{{finish_reason="{reason}"}} {count}')
    lines += ["# HELP ember_time_to_first_token_seconds Time from arrival to the first token.",
              "# TYPE ember_time_to_first_token_seconds histogram"]
    total = 0
    for b, c in zip(TTFT_BUCKETS, runner.ttft_counts):
        total += c
        lines.append(f'ember_time_to_first_token_seconds_bucket{{le="{b}"}} {total}')
    total += runner.ttft_counts[-1]
    lines.append(f'ember_time_to_first_token_seconds_bucket{{le="+Inf"}} {total}')
    lines.append(f"ember_time_to_first_token_seconds_sum {round(runner.ttft_sum, 6)}")
    lines.append(f"ember_time_to_first_token_seconds_count {total}")
    return "\n".join(lines) + "\n"
