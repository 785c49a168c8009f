"""The OpenAI-compatible HTTP routes (FastAPI): completions, chat completions, models, health, metrics."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..sampling import SamplingParams
from .engine_loop import EngineLoop, Handle
from .metrics import Metrics
from .protocol import APIError, GenerationRequest, bad, parse_json, parse_request
from .responses import Choice, chunk, choice_chunk, usage, whole_response


class Server:
    """What the routes share: the engine loop, the tokenizer, limits."""

    def __init__(self, engine, tokenizer, model_name: str, *, api_key: str | None = None,
                 max_body_bytes: int = 16 << 20, max_waiting: int = 256):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.max_body_bytes = api_key or None, max_body_bytes
        self.metrics = Metrics(engine, model_name)
        self.loop = EngineLoop(engine, self.metrics, max_waiting)
        self.max_model_len = engine.cfg.max_model_len
        self.vocab = engine.model.config.vocab_size
        self.created = int(time.time())
        # end-of-turn ids the tokenizer knows (generation_config.json) but the model config does not
        self.extra_eos = [t for t in getattr(tokenizer, "eos_token_ids", None) or [] if t not in engine.eos_ids]

    # ----- request -> engine inputs ---------------------------------------------------------------------------
    async def read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise self._too_large(len(body))
        return bytes(body)

    def _too_large(self, n: int) -> APIError:
        return APIError(413, f"request body of {n} bytes exceeds the limit of {self.max_body_bytes} bytes",
                        "body")

    def _encode(self, req: GenerationRequest) -> list[list[int]]:
        tok = self.tokenizer
        if req.chat:
            if tok is None:
                raise bad("messages", "this model has no tokenizer, so chat is not available; use "
                          "/v1/completions with token-id prompts")
            try:
                text = tok.apply_chat_template(req.messages, add_generation_prompt=True)
            except ValueError as e:
                raise bad("messages", str(e)) from None
            return [tok.encode(text, add_special_tokens=False)]
        out = []
        for p in req.prompts:
            if isinstance(p, str):
                if tok is None:
                    raise bad("prompt", "this model has no tokenizer: send prompts as lists of token ids")
                p = tok.encode(p)
            out.append(p)
        return out

    def _check(self, req: GenerationRequest, prompts: list[list[int]]) -> list[int]:
        """Per prompt, the number of tokens to generate; 400 for whatever cannot run."""
        if req.model is not None and req.model != self.model_name:
            raise bad("model", f"model {req.model!r} does not exist; this server serves {self.model_name!r}")
        if req.stop and self.tokenizer is None:
            raise bad("stop", f"stop strings {req.stop!r} need a tokenizer; this model has none")
        budgets = []
        for ids in prompts:
            if not ids:
                raise bad("prompt", "the prompt is empty after tokenization")
            wrong = [t for t in ids if not 0 <= t < self.vocab]
            if wrong:
                raise bad("prompt", f"token id {wrong[0]} is outside the vocabulary [0, {self.vocab})")
            room = self.max_model_len - len(ids)
            if room < 1:
                raise bad("messages" if req.chat else "prompt",
                          f"the prompt has {len(ids)} tokens, but the maximum model length is {self.max_model_len} "
                          "(prompt plus at least one generated token)")
            if req.max_tokens is not None and req.max_tokens > room:
                raise bad("max_tokens", f"max_tokens={req.max_tokens} plus the prompt's {len(ids)} tokens exceeds "
                          f"the maximum model length of {self.max_model_len}")
            budgets.append(req.max_tokens or (room if req.chat else min(16, room)))
            need = self.engine.blocks.blocks_for(len(ids) + budgets[-1])
            if need > self.engine.blocks.num_blocks:
                raise bad("max_tokens", f"the prompt ({len(ids)} tokens) plus max_tokens={budgets[-1]} needs "
                          f"{need} KV pages; the cache holds {self.engine.blocks.num_blocks}")
        return budgets

    # ----- generation -------------------------------------------------------------------------------------------
    async def generate(self, request: Request, chat: bool):
        req = parse_request(parse_json(await self.read_body(request)), chat)
        prompts = await asyncio.to_thread(self._encode, req)  # long prompts take a while to tokenize
        budgets = self._check(req, prompts)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        handles, choices = [], []
        for p, (ids, budget) in enumerate(zip(prompts, budgets)):
            for i in range(req.n):
                index = p * req.n + i
                params = SamplingParams(max_tokens=budget, temperature=req.temperature, top_p=req.top_p,
                                        top_k=req.top_k, seed=None if req.seed is None else req.seed + index,
                                        stop=list(req.stop), ignore_eos=req.ignore_eos, logprobs=req.logprobs,
                                        stop_token_ids=[] if req.ignore_eos else list(self.extra_eos))
                handles.append(Handle(f"{rid}-{index}", index, ids, params, out, loop))
                choices.append(Choice(index, p, self.tokenizer, req.stop, chat))
        self.loop.submit(handles)
        prompt_lens = [len(ids) for ids in prompts]
        self.metrics.count_request(sum(prompt_lens))
        watcher = asyncio.create_task(_watch_disconnect(request, out))  # until the response starts
        try:
            if not req.stream:
                await self._collect(out, choices, handles)
                return JSONResponse(whole_response(rid, self.model_name, chat, choices, prompt_lens))
            first = await _next(out)  # decides between an error response and a stream
            if first.error is not None:
                raise first.error
        except BaseException:
            self.loop.abort(handles)
            raise
        finally:
            watcher.cancel()
        return AbortingStream(self._sse(rid, req, out, first, handles, choices, prompt_lens),
                              on_close=lambda: self.loop.abort(handles), media_type="text/event-stream")

    async def _collect(self, out: asyncio.Queue, choices: list[Choice], handles: list[Handle]) -> None:
        pending = len(choices)
        while pending:
            ev = await _next(out)
            if ev.error is not None:
                raise ev.error
            c = choices[ev.index]
            c.feed(ev)
            if c.finish_reason is not None:
                handles[ev.index].finished = True
                pending -= 1

    async def _sse(self, rid, req: GenerationRequest, out: asyncio.Queue, ev, handles, choices, prompt_lens):
        chat, name = req.chat, self.model_name
        try:
            if chat:
                yield chunk(rid, name, chat, [choice_chunk(c, "", [], chat, first=True) for c in choices],
                            req.include_usage)
            pending = len(choices)
            while True:
                if ev.error is not None:
                    yield f"data: {json.dumps(ev.error.body(), ensure_ascii=False)}\n\n"
                    break
                c = choices[ev.index]
                delta, lps = c.feed(ev)
                if c.finish_reason is not None:
                    handles[ev.index].finished = True
                    pending -= 1
                if delta or lps or c.finish_reason is not None:
                    yield chunk(rid, name, chat, [choice_chunk(c, delta, lps, chat)], req.include_usage)
                if not pending:
                    break
                ev = await out.get()
                if ev is _GONE:  # the client left while the response was starting
                    return
            if req.include_usage and not pending:
                yield chunk(rid, name, chat, [], True, usage(choices, prompt_lens))
            yield "data: [DONE]\n\n"
        finally:
            self.loop.abort(handles)


_GONE = object()  # put on a request's event queue when its client disconnects


async def _watch_disconnect(request: Request, out: asyncio.Queue) -> None:
    """Tell the waiting handler that the client went away (a long prefill or a whole response can take long)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            out.put_nowait(_GONE)
            return


async def _next(out: asyncio.Queue):
    ev = await out.get()
    if ev is _GONE:
        raise APIError(499, "the client disconnected")
    return ev


class AbortingStream(StreamingResponse):
    """A streamed response that stops its requests however it ends (done, client gone, error)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class ApiKeyGuard:
    """ASGI middleware: every route but /health needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.key):
                err = APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               type="authentication_error")
                return await _error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.shutdown()

    app = FastAPI(title="indexcache", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if server.api_key:
        app.add_middleware(ApiKeyGuard, api_key=server.api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error"))

    @app.get("/health")
    async def health():
        if not server.loop.alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "indexcache", "max_model_len": server.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.generate(request, chat=True)

    return app
