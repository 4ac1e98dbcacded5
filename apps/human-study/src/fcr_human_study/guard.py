"""What the study server accepts before Gradio sees a request: small bodies, no uploads.

The rating app sends only short JSON (a token, a choice, the admin secret), so every route takes a
body of at most :data:`MAX_BODY_BYTES`; a larger one is answered ``413`` without being read
(declared ``Content-Length``) or as soon as the limit is passed (chunked), so the server's memory
does not grow with what a client sends. The app has no upload component, so Gradio's upload routes
answer ``403`` and nothing a client sends is kept on disk or served back.

This is a plain ASGI middleware (no Gradio import): :func:`fcr_human_study.app.launch_app` installs
it on the FastAPI app Gradio builds.

Example:
    >>> from starlette.middleware import Middleware
    >>> demo.launch(app_kwargs={"middleware": [Middleware(RequestLimits)]})
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["MAX_BODY_BYTES", "UPLOAD_ROUTES", "RequestLimits"]

logger = logging.getLogger(__name__)

#: The largest request body any route accepts. A vote or an admin call is well under 4 KiB.
MAX_BODY_BYTES = 64 * 1024

#: Path endings of Gradio's routes that store what a client sends (files, recordings, streams).
UPLOAD_ROUTES = ("/upload", "/process_recording", "/stream")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class RequestLimits:
    """ASGI middleware: refuse upload routes (403) and bodies over ``max_body_bytes`` (413).

    Args:
        app: the ASGI app to protect.
        max_body_bytes: the largest body accepted on any route.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes = {max_body_bytes} must be >= 1")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "").rstrip("/")
        if scope.get("method") == "POST" and _is_upload(path):
            logger.warning("upload refused: %s %s", scope.get("method"), path)
            await _respond(send, 403, "This study server takes no uploads.")
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            logger.warning("request refused: %s %s declares a %d-byte body (limit %d)", scope.get("method"),
                           path, declared, self.max_body_bytes)
            await _respond(send, 413, f"Request body too large (limit {self.max_body_bytes} bytes).")
            return
        # Read the body here, at most the limit, and hand it on only if it fits: a chunked body
        # that never says its length cannot make the server hold more than the limit.
        body: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                body.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                logger.warning("request refused: %s %s sent more than %d bytes", scope.get("method"), path,
                               self.max_body_bytes)
                await _respond(send, 413, f"Request body too large (limit {self.max_body_bytes} bytes).")
                return
            body.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return body.pop(0) if body else await receive()

        await self.app(scope, replay, send)


def _is_upload(path: str) -> bool:
    return any(path.endswith(route) or f"{route}/" in path for route in UPLOAD_ROUTES)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _respond(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
