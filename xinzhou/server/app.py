"""`xinzhou serve`: one model behind OpenAI Chat Completions, OpenAI Responses and Anthropic
Messages, with interleaved thinking kept across tool calls.

    xinzhou serve --model runs/speedrun/sft/ckpt [--host 127.0.0.1] [--port 8000] [--api-key K] [--served-name NAME]

Routes: POST /v1/chat/completions, POST /v1/responses, POST /v1/messages (also ?beta=true),
POST /v1/messages/count_tokens, GET /v1/models (Anthropic's shape when the request carries
`anthropic-version`), GET /health. Every error is a 4xx/5xx in the protocol's own error format and
the server keeps serving; every response carries an `x-request-id`, and one JSON log line per
request goes to stderr. Listens on 127.0.0.1 unless told otherwise, and only with an API key then;
with a key every route but /health and the chat page at / needs it (`Authorization: Bearer K` or
`x-api-key: K`).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from xinzhou.server import anthropic, openai_chat, openai_responses
from xinzhou.server.common import APIError
from xinzhou.server.web import PAGE
from xinzhou.server.worker import EngineWorker

MAX_BODY = 8 << 20  # bytes of a request body
log = logging.getLogger("xinzhou.serve")


def _error_body(protocol: str, e: APIError) -> dict:
    if protocol == "anthropic":
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 413: "request_too_large", 500: "api_error"}
        return {"type": "error", "error": {"type": kinds.get(e.status, e.kind), "message": e.message}}
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}}


def _protocol(path: str, headers: Any) -> str:
    return "anthropic" if path.startswith("/v1/messages") or (
        path == "/v1/models" and "anthropic-version" in headers) else "openai"


class _Frame:
    """Around every request (plain ASGI, so streamed bodies pass straight through): the API key,
    the body-size limit from content-length, the request id on the response, and one JSON log
    line when the response has been sent."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        rid = headers.get("x-request-id") or secrets.token_hex(8)
        proto = _protocol(path, headers)
        extra = [(b"x-request-id", rid.encode())] + ([(b"request-id", rid.encode())] if proto == "anthropic" else [])
        t0, status = time.time(), 500

        async def send_framed(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            refusal = self._refusal(path, method, headers)
            if refusal is not None:
                await JSONResponse(_error_body(proto, refusal), status_code=refusal.status)(scope, receive, send_framed)
            else:
                await self.app(scope, receive, send_framed)
        finally:
            log.info(json.dumps({"request_id": rid, "method": method, "path": path, "status": status,
                                 "ms": round(1000 * (time.time() - t0), 1)}))

    def _refusal(self, path: str, method: str, headers: dict[str, str]) -> APIError | None:
        # the chat page itself is public (a browser cannot send a header when it opens it); its requests carry the key
        public = path == "/health" or (path == "/" and method in ("GET", "HEAD"))
        if self.api_key is not None and not public:
            given = headers.get("x-api-key") or ""
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = given or auth[7:]
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return APIError(401, "invalid or missing API key (Authorization: Bearer KEY or x-api-key: KEY)",
                                "authentication_error")
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            return APIError(413, f"request body of {size} bytes exceeds the limit of {MAX_BODY}", "request_too_large")
        return None


def create_app(worker: EngineWorker, served_name: str = "xinzhou", api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="xinzhou", docs_url=None, redoc_url=None, openapi_url=None)
    signing_key = secrets.token_bytes(32)  # thinking signatures are this server's own
    created = int(time.time())

    def protocol_of(request: Request) -> str:
        return _protocol(request.url.path, request.headers)

    app.add_middleware(_Frame, api_key=api_key)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {MAX_BODY}", "request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "missing required field 'model' (a string)", param="model")
        if model != served_name:
            raise APIError(404, f"model {model!r} is not served here; this server serves {served_name!r}",
                           "not_found_error", "model")
        return body

    def failure(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(_error_body(protocol_of(request), e), status_code=e.status)

    def sse(gen: Any) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served_name}

    @app.head("/")
    @app.get("/")
    async def root() -> Response:
        return HTMLResponse(PAGE)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        if "anthropic-version" in request.headers:
            entry = {"type": "model", "id": served_name, "display_name": served_name,
                     "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}
            return {"data": [entry], "has_more": False, "first_id": served_name, "last_id": served_name}
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                            "owned_by": "xinzhou"}]}

    async def handle(request: Request, protocol: Any, *extra: Any) -> Any:
        """Parse, then answer whole or as a stream; an APIError anywhere becomes the protocol's error."""
        try:
            req = protocol.parse_request(worker, await body_of(request), *extra)
            if req["stream"]:
                return sse(protocol.stream(worker, req, served_name, *extra))
            return await protocol.complete(worker, req, served_name, *extra)
        except APIError as e:
            return failure(request, e)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle(request, openai_chat)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        return await handle(request, openai_responses)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        return await handle(request, anthropic, signing_key)

    @app.post("/v1/messages/count_tokens")
    async def count(request: Request) -> Any:
        try:
            return anthropic.count_tokens(worker, await body_of(request), signing_key)
        except APIError as e:
            return failure(request, e)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return failure(request, APIError(404, f"no route {request.method} {request.url.path}", "not_found_error"))

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return failure(request, APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    return app


def load_worker(model_dir: str | Path, **engine_kw: Any) -> EngineWorker:
    """The model and tokenizer of a checkpoint directory, behind one engine thread."""
    import torch

    from xinzhou.errors import DataError
    from xinzhou.hf import load_hf
    from xinzhou.tokenizer import Tokenizer

    d = Path(model_dir)
    model = load_hf(d, device="cuda" if torch.cuda.is_available() else "cpu").eval()
    if not (d / "tokenizer.json").is_file():
        raise DataError(f"{d / 'tokenizer.json'}: no tokenizer.json there (the server needs the checkpoint's tokenizer)")
    return EngineWorker(model, Tokenizer.load(d), **engine_kw)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_name: str = "xinzhou", max_batch: int = 16) -> None:
    from xinzhou.errors import OutputError

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise OutputError(f"--host {host}: listening beyond localhost needs --api-key (every route but /health "
                          "will then require it)")
    import uvicorn

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    worker = load_worker(model_dir, max_batch=max_batch)
    app = create_app(worker, served_name, api_key)
    print(f"xinzhou serve: {served_name} from {model_dir} on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        worker.close()
