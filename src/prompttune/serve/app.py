"""The HTTP server: OpenAI-compatible completions and chat (with SSE streaming), classification, prompt hot
loading, health and Prometheus metrics, over one backbone and every loaded prompt.

Every request passes the same gate: bearer API key (constant-time compare) when configured, a body size limit
checked before and while reading, JSON parsing, field validation. Whatever goes wrong is answered as a JSON error
in OpenAI's shape with a 4xx code (5xx only for a bug), and no request can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..backbones.base import Backbone
from ..errors import PromptTuneError
from . import responses as R
from .config import ServeConfig
from .endpoints import Endpoints
from .engine import Engine
from .metrics import server_metrics
from .prompts import LoadedPrompt, PromptRegistry
from .protocol import APIError, parse_load

log = logging.getLogger("prompttune.serve")
Handler = Callable[[Request], Awaitable[Response]]


def read_api_keys(path: str | Path) -> list[bytes]:
    """Non-empty lines of the key file.

    Raises:
        PromptTuneError: the file is missing or holds no key.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptTuneError(f"{path}: no such API key file")
    keys = [line.strip().encode() for line in path.read_text().splitlines() if line.strip()]
    if not keys:
        raise PromptTuneError(f"{path}: the API key file holds no key")
    return keys


class PromptServer(Endpoints):
    """Backbone + prompt registry + engine + the Starlette app (`self.app`).

    Args:
        backbone: the shared frozen model.
        prompts: startup artifacts as `{name: path}` (the operator chose them: no directory check).
        config: limits and batching.
        api_keys: accepted bearer keys; empty means no authentication.
    """

    def __init__(
        self,
        backbone: Backbone,
        prompts: dict[str, str | Path] | None = None,
        config: ServeConfig | None = None,
        api_keys: list[bytes] | None = None,
    ):
        self.cfg = config or ServeConfig()
        self.backbone = backbone
        prompts = prompts or {}
        dirs = self.cfg.prompt_dirs or sorted({str(Path(p).resolve().parent) for p in prompts.values()})
        self.registry = PromptRegistry(backbone, dirs)
        for name, path in prompts.items():
            try:
                self.registry.load(path, name, check_dir=False)
            except APIError as err:
                raise PromptTuneError(err.message) from None
        self.keys = list(api_keys or [])
        self.metrics = server_metrics()
        self.engine = Engine(backbone, self.cfg, self.metrics)
        self.metrics.gauge(
            "prompttune_queue_depth", "requests waiting for a batch slot", lambda: self.engine.queue_depth
        )
        self.metrics.gauge("prompttune_active_sequences", "sequences decoding", lambda: self.engine.active_sequences)
        self.metrics.gauge("prompttune_loaded_prompts", "prompts loaded", lambda: len(self.registry))
        self.started = R.now()
        self.stopping = False
        tok = backbone.tokenizer
        gen_eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
        eos = {tok.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.stop_ids = frozenset(i for i in eos if i is not None)
        self.chat_stop_ids = self.stop_ids | R.turn_end_ids(tok)
        routes = [
            Route("/health", self._wrap("health", self.health, auth=False), methods=["GET"]),
            Route("/metrics", self._wrap("metrics", self.metrics_text), methods=["GET"]),
            Route("/v1/models", self._wrap("models", self.models), methods=["GET"]),
            Route("/v1/completions", self._wrap("completions", self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._wrap("chat", self.chat), methods=["POST"]),
            Route("/v1/classify", self._wrap("classify", self.classify), methods=["POST"]),
            Route("/v1/prompts", self._wrap("prompts_load", self.load_prompt), methods=["POST"]),
            Route("/v1/prompts/{name}", self._wrap("prompts_unload", self.unload_prompt), methods=["DELETE"]),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error, Exception: self._crash},
            lifespan=self._lifespan,
        )

    # ---- the gate -----------------------------------------------------------------------------------------------
    def _wrap(self, name: str, handler: Handler, auth: bool = True) -> Handler:
        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            try:
                if auth:
                    self._check_key(request)
                response = await handler(request)
            except APIError as err:
                response = _error(err)
            except PromptTuneError as err:
                response = _error(APIError(400, str(err)))
            except Exception:  # noqa: BLE001 - a bug: logged with its traceback, answered 500, server keeps running
                log.exception("unhandled error in %s", name)
                response = _error(APIError(500, "internal server error", type="server_error"))
            if isinstance(response, StreamingResponse):
                response.body_iterator = self._timed(response.body_iterator, name, start)
            else:
                self.metrics.observe("prompttune_request_latency_seconds", time.perf_counter() - start, endpoint=name)
            self.metrics.inc("prompttune_requests_total", endpoint=name, status=str(response.status_code))
            _echo_id(request, response)
            return response

        return endpoint

    async def _timed(self, body: AsyncIterator[str], name: str, start: float) -> AsyncIterator[str]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.metrics.observe("prompttune_request_latency_seconds", time.perf_counter() - start, endpoint=name)

    def _check_key(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given_bytes = given.strip().encode()
        ok = False
        for key in self.keys:  # every key is compared, in constant time each
            ok |= hmac.compare_digest(given_bytes, key)
        if scheme.lower() != "bearer" or not ok:
            raise APIError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def _json(self, request: Request) -> dict[str, Any]:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if not declared.isdigit():
                raise APIError(400, "invalid Content-Length header")
            raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as err:
            raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        self.metrics.inc("prompttune_requests_total", endpoint="other", status=str(exc.status_code))
        response = _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind))
        _echo_id(request, response)
        return response

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return _error(APIError(500, "internal server error", type="server_error"))

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        # Uvicorn has stopped accepting and waited for in-flight requests; finish anything still queued.
        self.stopping = True
        await asyncio.to_thread(self.engine.close, self.cfg.timeout_graceful_shutdown)

    # ---- admin --------------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        status = "stopping" if self.stopping else "ok"
        body = {
            "status": status,
            "model": self.registry.backbone_name,
            "prompts": len(self.registry),
            "queue_depth": self.engine.queue_depth,
            "active_sequences": self.engine.active_sequences,
        }
        return JSONResponse(body, status_code=503 if self.stopping else 200)

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    def _describe(self, prompt: LoadedPrompt) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": prompt.kind if prompt.name else "backbone"}
        if prompt.name:
            info.update(
                method=prompt.method.name,
                head=getattr(prompt.head, "name", None),
                labels=list(prompt.head.labels),
                multi_label=bool(prompt.head.multi_label),
                template=prompt.model.template.text,
            )
        return {
            "id": prompt.model_id(self.registry.backbone_name),
            "object": "model",
            "created": prompt.created if prompt.name else self.started,
            "owned_by": "prompttune",
            "prompttune": info,
        }

    async def models(self, request: Request) -> Response:
        data = [self._describe(p) for p in [self.registry.bare, *self.registry.all()]]
        return JSONResponse({"object": "list", "data": data})

    async def load_prompt(self, request: Request) -> Response:
        req = parse_load(await self._json(request))
        prompt = await asyncio.to_thread(self.registry.load, req.path, req.name)
        return JSONResponse(self._describe(prompt))

    async def unload_prompt(self, request: Request) -> Response:
        name = request.path_params["name"]
        prompt = self.registry.unload(self.registry.check_name(name))
        return JSONResponse({"id": prompt.model_id(self.registry.backbone_name), "object": "model", "deleted": True})


def _echo_id(request: Request, response: Response) -> None:
    """Send a client's X-Request-Id back, so it can match answers to requests."""
    rid = request.headers.get("x-request-id")
    if rid and len(rid) <= 128 and rid.isascii() and rid.isprintable():
        response.headers["X-Request-Id"] = rid


def _error(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ---- running ----------------------------------------------------------------------------------------------------
class RunningServer:
    """A server started in a background thread on a loopback port (tests, benchmarks, notebooks)."""

    def __init__(self, server: PromptServer, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.host, self.port = sock.getsockname()[:2]
        config = uvicorn.Config(
            server.app,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=server.cfg.timeout_graceful_shutdown,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PromptTuneError("the server did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: in-flight requests finish, then the engine stops."""
        self._uvicorn.should_exit = True
        self._thread.join(timeout)
