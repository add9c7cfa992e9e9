"""The HTTP JSON API (FastAPI on uvicorn) over :class:`reolm.serve.service.Service`.

Handlers parse and validate the body (strict types, valid Unicode, text limits), tokenise
items given by content in a thread, turn the request into a job, and await its future; the
worker thread does the model and index work. Every error is ``{"error": message, "field":
name}``: 422 for a bad value or body (the field names it, e.g. ``history[2]`` or
``items[0].image_feature``), 404 for an unknown item or path, 405, 408 / 413 for a body too
slow / too large, 500 (no exception text) for a failure of the server's own. The layers a
request crosses before a handler are in :mod:`reolm.serve.http`. ``docs/serving.md``
documents the endpoints and what the service guarantees.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from reolm.serve.catalogue import Catalogue
from reolm.serve.config import ServeConfig
from reolm.serve.http import BodyGate, CatchAll, error_response, parse_json, protocol_class
from reolm.serve.model import ServingModel
from reolm.serve.service import (AddJob, DeleteJob, ItemSpec, RecommendJob, RequestError, SaveJob, Service)

__all__ = ["create_app", "open_service", "serve"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- request bodies

class _Strict(BaseModel):
    # strict: no coercion ("10" is not 10, "yes" is not true); extra keys are errors
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendBody(_Strict):
    history: list[Any] = Field(min_length=1, description="item ids (strings) or item objects, oldest first")
    k: int = 10
    exclude_history: bool = True


MAX_ID_CHARS = 512


class ItemBody(_Strict):
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
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
        for name, value in attributes.items():  # bound the tokenizer's work per value and per item
            if len(value) > self.cfg.max_attribute_chars:
                raise RequestError(422, f"{field}.attributes.{name}", f"{len(value)} characters; at most "
                                   f"{self.cfg.max_attribute_chars} per attribute (max_attribute_chars)")
        total = sum(len(v) for v in attributes.values())
        if total > self.cfg.max_item_chars:
            raise RequestError(422, f"{field}.attributes", f"{total} characters of attributes; at most "
                               f"{self.cfg.max_item_chars} per item (max_item_chars)")
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
                if not 1 <= len(entry) <= MAX_ID_CHARS:  # ids are echoed in errors: keep those short
                    raise RequestError(422, f"history[{i}]", f"an item id has 1 to {MAX_ID_CHARS} characters")
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


def create_app(service: Service, cfg: ServeConfig) -> RequestMetrics:
    """The ASGI application: metrics, then the body gate, then FastAPI (with the catch-all inside)."""
    catalogue, model = service.catalogue, service.model
    check = Validator(catalogue.attributes, catalogue.image_dim, cfg)
    heavy = asyncio.Semaphore(1)  # created in the server's event loop, on first use

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # uvicorn has stopped accepting and finished every in-flight request by now.
        await asyncio.to_thread(service.close, cfg.save_on_shutdown)

    app = FastAPI(title="Reo-LM recommendations", version="1", lifespan=lifespan, openapi_url=None)
    app.add_middleware(CatchAll)  # inside Starlette's error middleware, which would re-raise

    async def tokenize(specs: list[ItemSpec]) -> None:
        # Off the event loop and off the worker: the tokenizer releases the GIL, and text that
        # breaks it fails this request alone. Heavy requests queue behind each other.
        if not specs:
            return
        if sum(len(v) for s in specs for v in s.attributes.values()) > cfg.heavy_request_chars:
            async with heavy:
                await asyncio.to_thread(service.tokenize, specs)
        else:
            await asyncio.to_thread(service.tokenize, specs)

    async def run(job: Any) -> Any:
        # If this handler is cancelled (client gone, shutdown), wrap_future cancels the job's future:
        # the worker drops it if it has not taken it yet, and finishes it otherwise.
        return await asyncio.wrap_future(service.submit(job))

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, err: RequestError) -> Response:
        return error_response(err.status, err.field, err.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> Response:
        first = err.errors()[0]
        field = _field_name(tuple(first.get("loc", ("body",))))
        return error_response(422, field, f"{field}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        if err.status_code == 404:
            return error_response(404, "path", f"no endpoint {request.method} {request.url.path}")
        if err.status_code == 405:
            return error_response(405, "method", f"{request.url.path} does not take {request.method}")
        return error_response(err.status_code, "", str(err.detail))

    @app.post("/recommend")
    async def recommend(request: Request) -> Response:
        job = check.recommend(_body(RecommendBody, await request.body()))
        # Only the entries the model reads are tokenised (all were validated).
        await tokenize([e for e in job.history[-model.max_history:] if isinstance(e, ItemSpec)])
        hits = await run(job)
        return _json({"items": [{"id": item_id, "score": score} for item_id, score in hits]})

    @app.post("/items")
    async def add_items(request: Request) -> Response:
        job = check.add(_body(ItemsBody, await request.body()))
        await tokenize(job.items)
        return _json(await run(job))

    @app.delete("/items/{item_id:path}")
    async def delete_item(item_id: str) -> Response:
        return _json(await run(DeleteJob(item_id)))

    @app.post("/admin/save")
    async def save() -> Response:
        return _json(await run(SaveJob()))

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "model": _model_identity(catalogue.manifest["model"]),
                      "items": catalogue.num_items, "rows": catalogue.num_rows,
                      "index": {**catalogue.index.describe(), "revision": catalogue.manifest.get("revision")},
                      "revision": catalogue.manifest.get("revision"), "attributes": list(catalogue.attributes),
                      "image_feature_dim": catalogue.image_dim, "max_history": model.max_history,
                      "precision": model.precision,
                      "unsaved_changes": catalogue.changes})

    @app.get("/metrics")
    async def metrics() -> Response:
        return _json({"uptime_s": round(time.time() - meter.started, 3), "requests": meter.snapshot(),
                      "service": service.stats()})

    meter = RequestMetrics(BodyGate(app, cfg.max_body_bytes, cfg.body_timeout_s), cfg.latency_window)
    return meter


def _model_identity(recorded: dict) -> dict:
    """The served model by identity (kind, weights' sha256), never by server path."""
    return {"kind": recorded.get("kind"), "item_vectors": recorded.get("item_vectors"),
            "user_encoder_sha256": (recorded.get("user_encoder") or {}).get("weights_sha256"),
            "item_encoder_sha256": (recorded.get("item_encoder") or {}).get("weights_sha256")}


def _json(value: Any) -> Response:
    # Straight to bytes: FastAPI's jsonable_encoder walk costs event-loop time on every response.
    return Response(json.dumps(value, ensure_ascii=True).encode("ascii"), media_type="application/json")


def _body(model: type[BaseModel], raw: bytes) -> Any:
    """Parse and validate a request body strictly ("10" is not an int, "yes" not a bool)."""
    value = parse_json(raw)
    try:
        return model.model_validate(value)
    except ValidationError as err:  # name the first bad field
        first = err.errors()[0]
        field = _field_name(tuple(first.get("loc", ())))
        raise RequestError(422, field, f"{field}: {first.get('msg', 'invalid value')}") from None


def _set_torch_threads(requested: int) -> None:
    import os

    import torch
    torch.set_num_threads(requested or max(1, (os.cpu_count() or 2) // 2))


def open_service(model_path: str | Path, index_dir: str | Path, cfg: ServeConfig) -> Service:
    """Load the model and the index folder, check that they belong together, start the worker."""
    _set_torch_threads(cfg.torch_threads)
    model = ServingModel(model_path, device=cfg.device, item_batch_size=cfg.item_batch_size,
                         precision=cfg.precision)
    catalogue = Catalogue.open(index_dir)
    model.check_identity(catalogue.manifest["model"], str(Path(index_dir) / "index.json"))
    catalogue.check_token_ids(model.vocab_size)
    if catalogue.image_dim != model.image_dim:
        raise ValueError(f"{index_dir}: image features of width {catalogue.image_dim}, but the model takes "
                         f"{model.image_dim}")
    if len(catalogue.attributes) != model.config.num_attributes:
        raise ValueError(f"{index_dir}: {len(catalogue.attributes)} attributes {list(catalogue.attributes)}, but "
                         f"the model was trained on {model.config.num_attributes}")
    return Service(model, catalogue, cfg)


def _server_class(service: Service, graceful_s: float) -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, but a graceful stop on SIGTERM/SIGINT exits with status 0 and never
        cuts a batch the worker is running.

        uvicorn re-raises the caught signal after shutting down, so the process would end as
        "killed by SIGTERM" even though it finished every request and saved; schedulers and
        tests then cannot tell a clean stop from a crash. Training exits 0 after a signal too.
        uvicorn's own graceful timeout cancels every request still open when it expires,
        including ones whose batch is half computed; here the wait ends at ``graceful_s`` only
        once the worker is between batches, and only requests still queued or still sending
        are cancelled (the worker drops those jobs: nothing was acknowledged).
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

        async def _wait_tasks_to_complete(self) -> None:
            state, loop = self.server_state, asyncio.get_running_loop()
            deadline = loop.time() + graceful_s
            while (state.connections or state.tasks) and not self.force_exit:
                if loop.time() > deadline and not service.running:
                    break
                await asyncio.sleep(0.05)
            if state.tasks:
                log.warning("shutdown: cancelling %d request(s) still queued or sending after %g s",
                            len(state.tasks), graceful_s)
                for task in list(state.tasks):
                    task.cancel()
                await asyncio.sleep(0.05)
            for connection in list(state.connections):
                connection.transport.close()
            for server in self.servers:
                await server.wait_closed()

    return GracefulServer


def serve(model_path: str | Path, index_dir: str | Path, cfg: ServeConfig) -> None:
    """Run the service until SIGTERM/SIGINT (in-flight requests finish, then changes are saved)."""
    import uvicorn

    service = open_service(model_path, index_dir, cfg)
    app = create_app(service, cfg)
    # timeout_graceful_shutdown=None: our server class bounds the wait itself (see above).
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, lifespan="on",
                            http=protocol_class(cfg.header_timeout_s), timeout_graceful_shutdown=None,
                            access_log=False)
    try:
        _server_class(service, cfg.graceful_timeout_s)(config).run()
    finally:
        service.close(cfg.save_on_shutdown)  # no-op when the lifespan already closed it
