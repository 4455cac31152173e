"""What stands between the network and the model: the guard every /v1 route runs behind, and
the server's behaviour on SIGTERM.

`guarded(handler)` checks, in order: the access token (401), readiness (503), admission to the
queue (503 with Retry-After past --max-queue, or while draining), the body (413 past
--max-body-mb, 408 past --body-timeout-s); then it runs the handler with a deadline
(--timeout-s after the body arrived) and cancels it if the client disconnects first. The
handler reaches the model only through `batched`, `in_model_thread` and `explain_slot`, which
drop work whose deadline passed while it waited (504). `drain_on_sigterm` turns SIGTERM into a
drain; `HeaderLimit` refuses oversized headers (431). `service` is always the app's
`vitkit.serve.app.Service` (not imported here: app imports this module).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import math
import signal
import sys
import threading
import time
from typing import Any

from torch import Tensor

from vitkit.serve.batcher import Batcher, Expired
from vitkit.serve.protocol import MAX_HEADER_BYTES

QUIET_S = 0.5  # SIGTERM: the drain ends once nothing has been in flight for this long


def guarded(handler):
    """`handler` behind the guard of every /v1 route: token, readiness, admission to the queue,
    the body, then the handler itself, cancelled if its client disconnects first."""

    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    @functools.wraps(handler)
    async def endpoint(request):
        service = request.app.state.service  # vitkit.serve.app.Service
        authorize(request, service)
        if service.state != "ready":
            reason = f"model {service.state}" + (f": {service.error}" if service.error else "")
            fail(503, reason, {"Retry-After": "1"} if service.state == "loading" else None)
        admit(service)
        service.in_flight += 1
        service.metrics.in_flight = service.in_flight
        try:
            try:
                request.state.body = await receive_body(request, service)
            except ClientDisconnect:  # gone before its body was in
                service.metrics.observe_shed("disconnected")
                return Response(status_code=499)
            loop = asyncio.get_running_loop()
            request.state.deadline = loop.time() + service.settings.timeout_s
            response = await _unless_disconnected(request, service, handler(request))
            if service.draining:
                response.headers["Connection"] = "close"
            return response
        finally:
            service.in_flight -= 1
            service.metrics.in_flight = service.in_flight

    return endpoint


def authorize(request, service) -> None:
    """401 unless the request carries the server's token (compared in constant time)."""
    key = service.settings.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": 'Bearer realm="vitkit"'}
    if scheme.lower() != "bearer" or not given.strip():
        fail(401, "this server needs an access token: send 'Authorization: Bearer <token>'",
              challenge)  # fmt: skip
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        fail(401, "wrong access token", challenge)


def admit(service) -> None:
    """503 with Retry-After when draining or when --max-queue requests are in already."""
    if service.draining:
        service.metrics.observe_shed("draining")
        fail(503, "the server is shutting down; retry elsewhere",
              {"Retry-After": "1", "Connection": "close"})  # fmt: skip
    limit = service.settings.queue_limit
    if service.in_flight >= limit:
        service.metrics.observe_shed("queue_full")
        batches = limit / service.settings.max_batch  # how long the queue takes to clear
        wait = max(1, math.ceil(batches * service.metrics.mean_batch_seconds()))
        fail(503, f"server busy: {limit} requests queued, the limit (vitkit serve --max-queue)",
              {"Retry-After": str(wait)})  # fmt: skip


async def receive_body(request, service) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed --max-body-mb (from
    Content-Length before reading, else while it streams in), and with 408 (closing the
    connection) when it takes longer than --body-timeout-s."""
    s = service.settings
    too_large = f"request body over the limit of {s.max_body_mb:g} MB"
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            fail(400, f"invalid Content-Length {length!r}")
        if int(length) > s.max_body_bytes:
            fail(413, too_large)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(s.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > s.max_body_bytes:
                    fail(413, too_large)
                chunks.append(chunk)
    except TimeoutError:
        fail(408, f"request body not complete within {s.body_timeout_s:g} s "
                   "(vitkit serve --body-timeout-s)", {"Connection": "close"})  # fmt: skip
    return b"".join(chunks)


async def _unless_disconnected(request, service, work):
    """Run the coroutine `work`; if the client disconnects first, cancel it (its image leaves
    the batcher's queue, its explanation the model thread's) and answer 499 to nobody."""
    from starlette.responses import Response

    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not gone.cancelled() and gone.done():
                service.metrics.observe_shed("disconnected")
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request": for the metrics
    return task.result()


async def _disconnected(receive) -> None:
    """Return once the client has gone (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _expired(what: str, service):
    service.metrics.observe_shed("deadline")
    fail(504, f"{what} {service.settings.timeout_s:g} s after the request arrived, past its "
               "deadline (vitkit serve --timeout-s): dropped before the model ran")  # fmt: skip


async def batched(request, batcher: Batcher, pixels: Tensor) -> Any:
    """The batcher's row for `pixels`, or 504 if the request's deadline passes in the queue."""
    try:
        return await batcher.submit(pixels, request.state.deadline)
    except Expired:
        _expired("still queued", request.app.state.service)


async def in_model_thread(request, fn, *args) -> Any:
    """fn(*args) in the model thread, unless the request's deadline passed while it waited."""
    deadline = request.state.deadline

    def unless_expired():
        if time.monotonic() > deadline:  # asyncio's loop.time() is time.monotonic()
            raise Expired
        return fn(*args)

    try:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(request.app.state.service.model_pool, unless_expired)
    except Expired:
        _expired("still queued", request.app.state.service)


@contextlib.asynccontextmanager
async def explain_slot(request, service):
    """One of --max-explain slots, waited for until the request's deadline (then 504)."""
    try:
        async with asyncio.timeout_at(request.state.deadline):
            await service.explain_slots.acquire()
    except TimeoutError:
        _expired("still waiting for an explanation slot (--max-explain)", service)
    try:
        yield
    finally:
        service.explain_slots.release()


def drain_on_sigterm(service, loop: asyncio.AbstractEventLoop) -> None:
    """On SIGTERM, refuse new /v1 requests (503) and let the admitted ones finish, for at most
    `Settings.drain_s` (the CLI's DRAIN_SECONDS), before uvicorn's own SIGTERM handler shuts the server down; a second SIGTERM
    shuts it down at once. uvicorn installs its handler only in the main thread; so does this."""
    if threading.current_thread() is not threading.main_thread():
        return
    shutdown = signal.getsignal(signal.SIGTERM)
    if not callable(shutdown):
        return

    async def drain(sig, frame) -> None:
        # until nothing is in flight for QUIET_S (a client answered a moment ago that comes
        # straight back gets its 503, not a closed connection), or --drain-s at most
        end, quiet_since = loop.time() + service.settings.drain_s, None
        while loop.time() < end:
            if service.in_flight:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= QUIET_S:
                break
            await asyncio.sleep(0.05)
        if service.in_flight:
            log(f"drain: {service.in_flight} requests unfinished after "
                 f"{service.settings.drain_s:g} s")  # fmt: skip
        shutdown(sig, frame)

    def on_sigterm(sig, frame) -> None:
        if service.draining:
            shutdown(sig, frame)
            return
        service.draining = True
        log(f"SIGTERM: draining {service.in_flight} requests; new ones get 503")

        def start() -> None:  # the loop keeps only a weak reference to a task: keep one
            service.drain_task = loop.create_task(drain(sig, frame))

        loop.call_soon_threadsafe(start)

    signal.signal(signal.SIGTERM, on_sigterm)


class HeaderLimit:
    """ASGI middleware: 431 for a request line and headers over `MAX_HEADER_BYTES` that arrived
    whole (h11, and so `serve.protocol`, only sees the ones that arrive in pieces)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > MAX_HEADER_BYTES:
                from starlette.responses import JSONResponse

                reason = (
                    f"request line and headers over the limit of {MAX_HEADER_BYTES // 1024} KiB"
                )
                response = JSONResponse({"error": reason}, 431, headers={"Connection": "close"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def fail(status: int, reason: str, headers: dict[str, str] | None = None):
    """Answer `status` with {"error": reason} (and `headers`): every refusal of the server."""
    from starlette.exceptions import HTTPException

    raise HTTPException(status, reason, headers)


def log(message: str) -> None:
    """One line on stderr, prefixed like every message of `vitkit serve`."""
    print(f"vitkit serve: {message}", file=sys.stderr, flush=True)
