"""The HTTP layer under the endpoints: what a hostile or broken client can reach before a handler runs.

* :func:`error_response` — the one error shape, ``{"error": message, "field": name}``, ASCII
  JSON (so no string a client sent can make the error itself unencodable); the errors after
  which the server will not read another request on the connection (408, 413, 400, an escaped
  exception) say ``Connection: close``.
* :class:`BodyGate` — reads the whole body before the application sees it: 413 over
  ``max_body_bytes`` (by Content-Length up front, or while a chunked body streams), 408 when
  the body does not arrive within ``body_timeout_s``. A slow client then holds a connection for
  a bounded time and never reaches the worker with half a request.
* :class:`CatchAll` — any exception a handler lets escape becomes a logged 500 with no
  exception text, and the connection is closed cleanly (``Connection: close``) instead of
  being reset after the response (what Starlette's error middleware does: it re-raises, and
  uvicorn then drops the connection, so a client could not tell whether its add happened).
* :func:`parse_json` — the request body as JSON, every failure a 422 on ``body``: invalid
  UTF-8, malformed JSON, nesting too deep, integers too long, strings that are not valid
  Unicode (lone surrogates, which break the tokenizer and UTF-8 encoding later).
* :func:`protocol_class` — uvicorn's h11 protocol with a header timeout (a client must finish
  a request's headers within ``header_timeout_s`` of its first byte) and the JSON error shape
  for requests h11 cannot parse.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["error_response", "BodyGate", "CatchAll", "parse_json", "protocol_class"]


def error_body(status: int, field: str, message: str) -> bytes:
    return json.dumps({"error": message, "field": field}, ensure_ascii=True).encode("ascii")


def error_response(status: int, field: str, message: str) -> Any:
    """A response in the error shape for a handler (the connection stays open)."""
    from starlette.responses import Response
    return Response(error_body(status, field, message), status_code=status, media_type="application/json")


async def _send_error(send: Any, status: int, field: str, message: str) -> None:
    body = error_body(status, field, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyGate:
    """Reads the request body completely (size and time limits) before calling the application."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, 413, "body", f"request body of {int(length)} bytes exceeds the limit "
                                                        f"of {self.max_bytes} bytes")
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            return await _send_error(send, 408, "body", f"the request body did not arrive within "
                                                        f"{self.timeout_s:g} s")
        except _TooLarge:
            return await _send_error(send, 413, "body", f"request body exceeds the limit of {self.max_bytes} bytes")
        except _Disconnected:
            return None
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only http.disconnect is left to come

        await self.app(scope, replay, send)

    async def _read(self, receive: Any) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class CatchAll:
    """Innermost safety net: an escaped exception is logged and answered as a plain 500 (and the
    connection closed), never re-raised to the server and never shown to the client."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_error(send, 500, "", "internal error (the server logged it)")


def parse_json(raw: bytes) -> Any:
    """The body as JSON; any problem is a RequestError(422, 'body' or the offending field)."""
    from reolm.serve.service import RequestError
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(422, "body", f"the body is not valid UTF-8 (byte {err.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(422, "body", f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") \
            from None
    except RecursionError:  # the C decoder recurses once per level
        raise RequestError(422, "body", "JSON nested too deeply") from None
    except ValueError:  # an integer of more than 4,300 digits (int's limit on decimal conversion)
        raise RequestError(422, "body", "not acceptable JSON: a number too long to read") from None
    _check_strings(value)
    return value


def _check_strings(value: Any) -> None:
    """Refuse strings (keys and values) that are not valid Unicode: JSON escapes can encode lone
    surrogates, which no UTF-8 encoder or tokenizer accepts."""
    from reolm.serve.service import RequestError
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError(422, where or "body", "text is not valid Unicode (lone surrogate)") from None
        elif isinstance(item, dict):
            for key, sub in item.items():
                stack.append((key, where or "body"))  # checked before any message names it
                stack.append((sub, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}[{i}]") for i, sub in enumerate(item))


def protocol_class(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol plus a header timeout and JSON 400s (see the module docstring)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            # IDLE: h11 has not seen a complete request line and headers yet (a new connection, or
            # bytes of the next request on a kept-alive one). The keep-alive timer covers silence.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)
            else:
                self._disarm_header_timer()

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            body = error_body(400, "request", "not a valid HTTP/1.1 request")
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

    return GuardedH11
