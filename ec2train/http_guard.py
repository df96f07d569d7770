"""Limits that keep `ec2train serve` answering when clients are idle, slow or too many.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive` and can answer 503
beyond `limit_concurrency`, but it never closes a connection that sends no request, or only
part of its headers, and it counts such connections against `limit_concurrency`: 1,000 idle
sockets would turn every request, /ping included, into a 503 or use up the process's file
descriptors. `GuardedHTTP` (uvicorn's own HTTP protocol, subclassed) adds the three missing
rules:

- a connection must send a complete request head within HEADER_TIMEOUT_S of connecting or of
  its previous answer, or it is closed;
- when live connections reach the limit, the longest-idle ones (no request in progress) are
  closed to make room, as nginx does with keep-alive connections;
- a request body may arrive in at most FREE_BODY_PIECES pieces plus one per MIN_PIECE_BYTES
  bytes (chunks of a chunked body, or reads of one with a Content-Length); past that it gets a
  400 and the connection is closed. Each piece costs the event loop a round of Python (h11 parses
  chunks in Python), so a body of 1-byte chunks would otherwise hold the loop, /ping included,
  for seconds per megabyte.

Imported by uvicorn by name (`http="ec2train.http_guard:GuardedHTTP"`), in every worker
process; it needs uvicorn (the `serve` extra), so nothing else imports it at start-up.
"""

from __future__ import annotations

import json
import os
import resource

from uvicorn.protocols.http.auto import AutoHTTPProtocol

# Seconds a client has to send a request's headers (from connecting, or from the last answer).
HEADER_TIMEOUT_S = 10.0
# Seconds an idle keep-alive connection stays open after an answer (uvicorn's timeout_keep_alive).
KEEP_ALIVE_S = 5
# Bytes of an incomplete request head uvicorn buffers before answering 400 (its h11 default is 16 KiB).
MAX_HEAD_BYTES = 16 * 1024
# File descriptors kept back from connections: the model file, thread pools, logs, workers' pipes.
FD_RESERVE = 64
# Accept bursts that can be in flight before their connections are seen (connection_budget).
ACCEPT_BURSTS = 4
# Overrides HEADER_TIMEOUT_S; read in each worker process (tests shorten the wait with it).
ENV_HEADER_TIMEOUT = "EC2TRAIN_SERVE_HEADER_TIMEOUT"
# Pieces a request body may arrive in: this many, and one more per MIN_PIECE_BYTES bytes (a 6 MB
# body in 4 KB chunks, or in 1,460-byte network segments read one at a time, is well within it).
FREE_BODY_PIECES = 1024
MIN_PIECE_BYTES = 512


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the soft limit.

    Each connection is a file descriptor, and many boxes start services with a soft limit of
    1,024 under a much higher hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65_536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
        except (ValueError, OSError):  # some sandboxes refuse: keep what we have
            pass
    return soft


def connection_budget() -> tuple[int, int]:
    """(listen backlog, most connections open) that fit this process's file descriptors.

    asyncio accepts up to `backlog` connections in one go, and a connection is only seen
    (and an idle one closed for it) a few loop turns later; descriptors for ACCEPT_BURSTS
    such bursts are kept free, or a flood of connections would still hit "Too many open
    files" before idle ones could be closed.
    """
    soft = raise_fd_limit()
    backlog = max(8, min(2048, soft // 16))
    return backlog, max(16, soft - FD_RESERVE - ACCEPT_BURSTS * backlog)


def header_timeout() -> float:
    return float(os.environ.get(ENV_HEADER_TIMEOUT, "") or HEADER_TIMEOUT_S)


def uvicorn_settings() -> dict:
    """Keyword arguments for uvicorn.Config / uvicorn.run that put the limits in place.

    `limit_concurrency` answers 503 (and closes) once every connection has a request in
    progress; GuardedHTTP keeps idle ones from counting towards it.
    """
    backlog, connections = connection_budget()
    return dict(
        http="ec2train.http_guard:GuardedHTTP",
        backlog=backlog,
        limit_concurrency=connections,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )


def too_many_pieces(pieces: int, size: int) -> bool:
    """Whether a body that came in `pieces` pieces of `size` bytes in all is over the rule above. Pure."""
    return pieces > FREE_BODY_PIECES + size // MIN_PIECE_BYTES


class GuardedHTTP(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol plus a request-head deadline, eviction of idle connections and a
    bound on the pieces of a request body. Works over either of uvicorn's parsers: h11 (its
    events are counted as they are parsed) and httptools (its on_body callback)."""

    _timer = None
    _waiting_for = None  # the request cycle that was current when the deadline was armed
    _idle_since = 0.0
    _pieces = 0
    _body_bytes = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        # Room for this connection's request under uvicorn's limit_concurrency (always set: see uvicorn_settings).
        _evict_idle(self.connections, keep=max(1, (self.limit_concurrency or 2) - 1), new=self)
        conn = getattr(self, "conn", None)
        if conn is not None and hasattr(conn, "next_event"):  # h11: count its events as they are parsed
            parse = conn.next_event
            conn.next_event = lambda: self._counted(parse())

    def _counted(self, event):
        import h11

        if isinstance(event, h11.Request):
            self._pieces = self._body_bytes = 0
        elif isinstance(event, h11.Data) and self._body_piece(len(event.data)):
            return h11.PAUSED  # the connection is closing: parse nothing more
        return event

    def on_message_begin(self) -> None:  # httptools
        self._pieces = self._body_bytes = 0
        super().on_message_begin()

    def on_body(self, body: bytes) -> None:  # httptools
        if not self._body_piece(len(body)):
            super().on_body(body)

    def _body_piece(self, size: int) -> bool:
        """Counts a piece of the current body; True (and the connection answered 400 and closing)
        once the body is over the rule."""
        if self.transport.is_closing():
            return True
        self._pieces += 1
        self._body_bytes += size
        if not too_many_pieces(self._pieces, self._body_bytes):
            return False
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            message = (
                f"request body came in more than {self._pieces - 1} pieces for {self._body_bytes} bytes (at most "
                f"{FREE_BODY_PIECES} and one per {MIN_PIECE_BYTES} bytes); send it with a Content-Length or in "
                "larger chunks"
            )
            self.transport.write(_raw_response(400, "Bad Request", {"error": message}))
        self.transport.close()  # the app sees the client as gone and answers nothing more
        return True

    def on_response_complete(self) -> None:
        self._arm()  # before super(): a pipelined request that starts inside it counts as progress
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def is_idle(self) -> bool:
        cycle = self.cycle
        return cycle is None or cycle.response_complete

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._idle_since = self.loop.time()
        self._waiting_for = self.cycle
        self._timer = self.loop.call_later(header_timeout(), self._deadline)

    def _deadline(self) -> None:
        self._timer = None
        if self.cycle is self._waiting_for and not self.transport.is_closing():
            self.transport.close()  # no request head in time: slow, idle or abandoned


def _raw_response(status: int, phrase: str, doc: dict) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, written past the parser's state."""
    body = json.dumps(doc).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _evict_idle(connections, keep: int, new) -> None:
    """Close the longest-idle connections until at most `keep` stay open (never `new`)."""
    live = [c for c in connections if not c.transport.is_closing()]
    excess = len(live) - keep
    if excess <= 0:
        return
    idle = sorted(
        (c for c in live if c is not new and isinstance(c, GuardedHTTP) and c.is_idle()), key=lambda c: c._idle_since
    )
    for conn in idle[:excess]:
        conn.transport.close()
