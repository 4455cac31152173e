"""uvicorn's HTTP/1.1 protocol (h11) with the two guards it lacks against slow and hostile clients.

- A deadline on request headers: uvicorn waits forever for a request line and headers sent a
  byte at a time (slowloris); here a connection whose headers are not complete within
  `header_timeout_s` of its first byte (or of connecting) gets 408 and is closed.
- Headers over the size limit get 431 naming the limit (uvicorn answers a bare 400).

Its settings come from the app's lifespan state (key `STATE_KEY`), which uvicorn hands to every
protocol it creates, so the class itself stays importable by name in `--workers` processes.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

STATE_KEY = "vitkit.header_timeout_s"
"""Lifespan state: the header deadline in seconds."""
MAX_HEADER_BYTES = 16 * 1024
"""Request line + headers (h11's default, as uvicorn's): `server_options` passes it to h11."""


class Protocol(H11Protocol):
    """H11Protocol + a header deadline + 431 for headers over `MAX_HEADER_BYTES`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s: float = self.app_state.get(STATE_KEY, 10.0)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_header_timer()  # a request begun, its headers not complete yet
        else:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request; say why, naming the limit when it was the header size."""
        buffered = self.conn.trailing_data[0]
        if len(buffered) > MAX_HEADER_BYTES and b"\r\n\r\n" not in buffered:
            kib = MAX_HEADER_BYTES // 1024
            self._refuse(431, f"request line and headers over the limit of {kib} KiB")
        else:
            self._refuse(400, "malformed HTTP request")

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            seconds = f"{self.header_timeout_s:g}"
            self._refuse(408, f"request headers not complete within {seconds} s "
                              "(vitkit serve --header-timeout-s)")  # fmt: skip

    def _refuse(self, status: int, reason: str) -> None:
        """Write a JSON error and close the connection (h11's state may be an error already)."""
        self._disarm_header_timer()
        body = json.dumps({"error": reason}).encode()
        phrase = {400: "Bad Request", 408: "Request Timeout",
                  431: "Request Header Fields Too Large"}[status]  # fmt: skip
        head = (
            f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()
