"""The HTTP JSON API (FastAPI on uvicorn) over :class:`reolm.serve.service.Service`.

Handlers validate shapes and limits, turn the request into a job, and await its future; the
worker thread does the model and index work. Every error is ``{"error": message, "field":
name}`` with a 4xx status: 422 for a bad value (the field names it, e.g. ``history[2]`` or
``items[0].image_feature``), 404 for an unknown item in a path, 413 for a body over
``max_body_bytes``. ``docs/serving.md`` documents the endpoints.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from reolm.serve.catalogue import Catalogue
from reolm.serve.config import ServeConfig
from reolm.serve.model import ServingModel
from reolm.serve.service import (AddJob, DeleteJob, ItemSpec, RecommendJob, RequestError, SaveJob, Service)

__all__ = ["create_app", "open_service", "serve"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- request bodies

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendBody(_Strict):
    history: list[Any] = Field(min_length=1, description="item ids (strings) or item objects, oldest first")
    k: int = 10
    exclude_history: bool = True


class ItemBody(_Strict):
    id: str = Field(min_length=1, max_length=512)
    attributes: dict[str, str]
    image_feature: list[float] | None = None


class ItemsBody(_Strict):
    items: list[ItemBody] = Field(min_length=1)


class HistoryObject(_Strict):
    attributes: dict[str, str]
    image_feature: list[float] | None = None


# ----------------------------------------------------------------------------- validation

def _field_name(loc: tuple) -> str:
    parts = [p for p in loc if p != "body"]
    name = ""
    for p in parts:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else str(p))
    return name or "body"


class Validator:
    """Checks that need the served index: attribute names, image feature width, limits."""

    def __init__(self, attributes: tuple[str, ...], image_dim: int, cfg: ServeConfig):
        self.attributes, self.image_dim, self.cfg = attributes, image_dim, cfg

    def spec(self, attributes: dict[str, str], image_feature: list[float] | None, field: str,
             item_id: str | None = None) -> ItemSpec:
        unknown = sorted(set(attributes) - set(self.attributes))
        if unknown:
            raise RequestError(422, f"{field}.attributes.{unknown[0]}",
                               f"unknown attribute {unknown[0]!r}; this index's attributes are "
                               f"{', '.join(self.attributes)}")
        feature = None
        if image_feature is not None:
            if len(image_feature) != self.image_dim:
                raise RequestError(422, f"{field}.image_feature", f"image_feature has {len(image_feature)} values; "
                                   f"the model's image features have {self.image_dim}")
            feature = np.asarray(image_feature, dtype=np.float32)
            if not np.isfinite(feature).all() or np.abs(feature).max(initial=0) > 65504:
                raise RequestError(422, f"{field}.image_feature", "image_feature values must be finite float16 "
                                   "numbers (|x| <= 65504)")
        return ItemSpec({a: attributes.get(a, "") for a in self.attributes}, feature, item_id)

    def recommend(self, body: RecommendBody) -> RecommendJob:
        if not 1 <= body.k <= self.cfg.max_k:
            raise RequestError(422, "k", f"k must be between 1 and {self.cfg.max_k}, got {body.k}")
        if len(body.history) > self.cfg.max_history:
            raise RequestError(422, "history", f"history has {len(body.history)} entries; at most "
                               f"{self.cfg.max_history} are accepted")
        entries: list[str | ItemSpec] = []
        for i, entry in enumerate(body.history):
            if isinstance(entry, str):
                entries.append(entry)
            elif isinstance(entry, dict):
                try:
                    obj = HistoryObject.model_validate(entry)
                except ValidationError as err:  # name the first bad field
                    first = err.errors()[0]
                    raise RequestError(422, _field_name(("history", i, *first["loc"])), first["msg"]) from None
                entries.append(self.spec(obj.attributes, obj.image_feature, f"history[{i}]"))
            else:
                raise RequestError(422, f"history[{i}]", "expected an item id (string) or an item object "
                                   "{\"attributes\": {...}}")
        return RecommendJob(entries, body.k, body.exclude_history)

    def add(self, body: ItemsBody) -> AddJob:
        if len(body.items) > self.cfg.max_items_per_request:
            raise RequestError(422, "items", f"{len(body.items)} items; at most {self.cfg.max_items_per_request} "
                               f"per request")
        seen: dict[str, int] = {}
        specs = []
        for i, item in enumerate(body.items):
            if item.id in seen:
                raise RequestError(422, f"items[{i}].id", f"id {item.id!r} repeats items[{seen[item.id]}].id")
            seen[item.id] = i
            specs.append(self.spec(item.attributes, item.image_feature, f"items[{i}]", item.id))
        return AddJob(specs)


# ----------------------------------------------------------------------------- middleware

class PayloadTooLarge(StarletteHTTPException):
    """Raised while a body streams in past the limit (an HTTPException, so FastAPI re-raises it as is)."""

    def __init__(self) -> None:
        super().__init__(413)


class BodyLimit:
    """413 for a body over ``max_bytes``: by Content-Length up front, else while it streams in."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _error(413, "body", f"request body of {int(length)} bytes exceeds the limit of "
                                           f"{self.max_bytes} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge()
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Counts and latencies per endpoint (a sliding window per endpoint for the percentiles)."""

    def __init__(self, app: Any, window: int):
        self.app, self.window = app, window
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.latencies: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=self.window))
        self.started = time.time()

    @staticmethod
    def endpoint(method: str, path: str) -> str:
        if path.startswith("/items/"):
            path = "/items/{id}"
        elif path not in ("/recommend", "/items", "/health", "/metrics", "/admin/save"):
            path = "other"
        return f"{method} {path}"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            name = self.endpoint(scope["method"], scope["path"])
            self.counts[name][str(status[0])] += 1
            self.latencies[name].append((time.perf_counter() - start) * 1000)

    def snapshot(self) -> dict[str, Any]:
        out = {}
        for name, counter in sorted(self.counts.items()):
            lat = np.asarray(self.latencies[name], dtype=np.float64)
            pct = {f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)} if len(lat) else {}
            out[name] = {"count": sum(counter.values()), "status": dict(counter),
                         "latency_ms": {**pct, "mean": round(float(lat.mean()), 3) if len(lat) else None,
                                        "max": round(float(lat.max()), 3) if len(lat) else None,
                                        "window": len(lat)}}
        return out


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


# ----------------------------------------------------------------------------- the app

def create_app(service: Service, cfg: ServeConfig) -> RequestMetrics:
    """The ASGI application (FastAPI app wrapped in the metrics and body-limit layers)."""
    catalogue, model = service.catalogue, service.model
    check = Validator(catalogue.attributes, catalogue.image_dim, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # uvicorn has stopped accepting and finished every in-flight request by now.
        saved = await asyncio.to_thread(service.close, cfg.save_on_shutdown)
        if saved:
            log.info("added/deleted items saved to %s", catalogue.folder)

    app = FastAPI(title="Reo-LM recommendations", version="1", lifespan=lifespan)

    async def run(job: Any) -> Any:
        return await asyncio.wrap_future(service.submit(job))

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, err.field, err.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        field = _field_name(tuple(first.get("loc", ("body",))))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            field, message = "body", f"not valid JSON: {first.get('ctx', {}).get('error', message)}"
        return _error(422, field, f"{field}: {message}")

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:  # logged by the worker or uvicorn
        return _error(500, "", f"internal error: {type(err).__name__}: {err}")

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(_: Request, __: PayloadTooLarge) -> JSONResponse:
        return _error(413, "body", f"request body exceeds the limit of {cfg.max_body_bytes} bytes")

    @app.post("/recommend")
    async def recommend(body: RecommendBody) -> dict:
        hits = await run(check.recommend(body))
        return {"items": [{"id": item_id, "score": score} for item_id, score in hits]}

    @app.post("/items")
    async def add_items(body: ItemsBody) -> dict:
        return await run(check.add(body))

    @app.delete("/items/{item_id:path}")
    async def delete_item(item_id: str) -> dict:
        return await run(DeleteJob(item_id))

    @app.post("/admin/save")
    async def save() -> dict:
        return await run(SaveJob())

    @app.get("/health")
    async def health() -> dict:
        identity = catalogue.manifest["model"]
        return {"status": "ok", "model": {"path": identity.get("path"), "kind": identity.get("kind"),
                                          "item_vectors": identity.get("item_vectors")},
                "items": catalogue.num_items, "rows": catalogue.num_rows, "index": catalogue.index.describe(),
                "index_dir": str(catalogue.folder), "revision": catalogue.manifest.get("revision"),
                "attributes": list(catalogue.attributes), "image_feature_dim": catalogue.image_dim,
                "max_history": model.max_history, "unsaved_changes": catalogue.changes}

    @app.get("/metrics")
    async def metrics() -> dict:
        return {"uptime_s": round(time.time() - meter.started, 3), "requests": meter.snapshot(),
                "service": service.stats()}

    meter = RequestMetrics(BodyLimit(app, cfg.max_body_bytes), cfg.latency_window)
    return meter


def open_service(model_path: str | Path, index_dir: str | Path, cfg: ServeConfig) -> Service:
    """Load the model and the index folder, check that they belong together, start the worker."""
    model = ServingModel(model_path, device=cfg.device, item_batch_size=cfg.item_batch_size)
    catalogue = Catalogue.open(index_dir)
    model.check_identity(catalogue.manifest["model"], str(Path(index_dir) / "index.json"))
    if catalogue.image_dim != model.image_dim:
        raise ValueError(f"{index_dir}: image features of width {catalogue.image_dim}, but the model takes "
                         f"{model.image_dim}")
    if len(catalogue.attributes) != model.config.num_attributes:
        raise ValueError(f"{index_dir}: {len(catalogue.attributes)} attributes {list(catalogue.attributes)}, but "
                         f"the model was trained on {model.config.num_attributes}")
    return Service(model, catalogue, cfg)


def _server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, but a graceful stop on SIGTERM/SIGINT exits with status 0.

        uvicorn re-raises the caught signal after shutting down, so the process would end as
        "killed by SIGTERM" even though it finished every request and saved; schedulers and
        tests then cannot tell a clean stop from a crash. Training exits 0 after a signal too.
        """

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


def serve(model_path: str | Path, index_dir: str | Path, cfg: ServeConfig) -> None:
    """Run the service until SIGTERM/SIGINT (in-flight requests finish, then changes are saved)."""
    import uvicorn

    service = open_service(model_path, index_dir, cfg)
    app = create_app(service, cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, lifespan="on",
                            timeout_graceful_shutdown=max(1, math.ceil(cfg.graceful_timeout_s)), access_log=False)
    try:
        _server_class()(config).run()
    finally:
        service.close(cfg.save_on_shutdown)  # no-op when the lifespan already closed it
