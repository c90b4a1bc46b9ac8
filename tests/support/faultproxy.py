"""A TCP fault proxy for HTTP object stores on loopback (moto's S3 server in the tests).

``FaultProxy`` listens on 127.0.0.1 and forwards each HTTP/1.1 request to an upstream server
on 127.0.0.1 (it refuses any other host), parsing just enough of the stream (request and
status lines, headers, ``Content-Length`` or chunked bodies) to cut it at request boundaries.
At ``rate`` it injects one fault instead of a clean exchange:

- ``drop``: the connection is closed without an answer (half of them before the request
  reaches the server, half after: the write happened, the answer was lost);
- ``500`` (InternalError) and ``503`` (SlowDown): an S3 error answer, the server not asked;
- ``stall``: nothing is answered for ``stall_s`` (past the client's read timeout), then the
  connection is closed;
- ``truncate``: half of its body is sent (answers with a body only): with the server's
  full ``Content-Length`` and the connection then closed, or, for half of the ranged reads,
  as a complete-looking short answer (``Content-Length`` and ``Content-Range`` cut to match).

Decisions are deterministic given ``seed``: whether (and how) the n-th request with a given
signature (method, path, query, ``Range``) is faulted is a hash of the seed, the signature and
n, whatever the interleaving of concurrent clients; at most ``max_in_a_row`` consecutive
requests of one signature are faulted, so a client with more retries than that always gets
through. ``counts`` tells what was injected, by kind; ``events`` lists every fault.
"""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

KINDS = ("drop", "500", "503", "stall", "truncate")
LOOPBACK = "127.0.0.1"
_ERRORS = {"500": ("500 Internal Server Error", "InternalError", "We encountered an internal error."),
           "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate.")}


class _Message:
    """One HTTP message: its head (start line and headers, as received) and raw body bytes."""

    def __init__(self, start: str, headers: list[tuple[str, str]], body: bytes):
        self.start, self.headers, self.body = start, headers, body

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")

    def head_bytes(self, drop: tuple[str, ...] = ()) -> bytes:
        lines = [self.start] + [f"{k}: {v}" for k, v in self.headers if k.lower() not in drop]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_head(stream) -> tuple[str, list[tuple[str, str]]] | None:
    start = stream.readline(65537)
    if not start:
        return None
    headers = []
    while True:
        line = stream.readline(65537)
        if not line:
            raise ConnectionError("stream ended in the headers")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return start.decode("latin-1").rstrip("\r\n"), headers


def _read_body(stream, msg: _Message, until_eof: bool) -> bytes:
    """The raw body bytes (chunk framing kept, so that they forward as they came)."""
    if "chunked" in msg.header("transfer-encoding").lower():
        parts = []
        while True:
            line = stream.readline(65537)
            parts.append(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:   # trailers, up to the blank line
                    line = stream.readline(65537)
                    parts.append(line)
                    if line in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
            parts.append(stream.read(size + 2))
    length = msg.header("content-length")
    if length:
        return stream.read(int(length))
    return stream.read() if until_eof else b""


class FaultProxy:
    """The proxy (see the module docstring); a context manager that starts and stops it.

    Args:
        upstream: the server's base URL, ``http://127.0.0.1:PORT``.
        rate: the fraction of requests faulted (0 to 1).
        seed: the seed of the decisions.
        kinds: the faults drawn from (``KINDS`` or a subset).
        stall_s: how long a stalled request is held before its connection is closed.
        max_in_a_row: most consecutive faulted requests of one signature.
        methods: the request methods faulted (None: all).
    """

    def __init__(self, upstream: str, rate: float, seed: int, kinds: tuple[str, ...] = KINDS,
                 stall_s: float = 3.0, max_in_a_row: int = 2, methods: tuple[str, ...] | None = None):
        parts = urlsplit(upstream)
        if parts.hostname != LOOPBACK or parts.scheme != "http":
            raise ValueError(f"the fault proxy talks to http://{LOOPBACK} only, not {upstream}")
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds or not 0 <= rate <= 1:
            raise ValueError(f"kinds must be a subset of {KINDS} and 0 <= rate <= 1 ({kinds}, {rate})")
        self.upstream = (LOOPBACK, parts.port)
        self.rate, self.seed, self.kinds = rate, seed, tuple(kinds)
        self.stall_s, self.max_in_a_row, self.methods = stall_s, max_in_a_row, methods
        self.counts: Counter = Counter()           # kind -> faults injected
        self.requests = 0                          # requests received
        self.events: list[tuple[str, str, str]] = []   # (kind, method, target)
        self._seen: Counter = Counter()            # signature -> requests so far
        self._streak: Counter = Counter()          # signature -> consecutive faults
        self._holds: list[tuple[str, str, threading.Event, threading.Event]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = socket.create_server((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self._server.getsockname()[1]}"
        self._threads: list[threading.Thread] = []

    # -- control -----------------------------------------------------------------------

    def __enter__(self) -> "FaultProxy":
        thread = threading.Thread(target=self._accept, daemon=True, name="faultproxy")
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._server.close()
        with self._lock:
            for *_, release in self._holds:
                release.set()

    def set_rate(self, rate: float) -> None:
        """Fault ``rate`` of the requests from now on (0: a clean pass-through)."""
        with self._lock:
            self.rate = rate

    @contextmanager
    def hold(self, method: str, part: str) -> Iterator[threading.Event]:
        """Hold every ``method`` request whose target contains ``part`` while the block runs,
        then close its connection unanswered: it never reaches the server (a client killed
        meanwhile never gets it done). Yields an event set when the first one arrived.

        Args:
            method: ``PUT``, ``GET``...
            part: a substring of the request target.
        """
        arrived = threading.Event()
        release = threading.Event()
        entry = (method, part, arrived, release)
        with self._lock:
            self._holds.append(entry)
        try:
            yield arrived
        finally:
            with self._lock:
                self._holds.remove(entry)
            release.set()

    def summary(self) -> dict:
        """What the proxy did: requests received, faults injected by kind."""
        with self._lock:
            return {"requests": self.requests, "faults": sum(self.counts.values()),
                    "by_kind": {kind: self.counts.get(kind, 0) for kind in self.kinds}}

    # -- deciding ----------------------------------------------------------------------

    def _draw(self, signature: str, n: int, salt: str) -> float:
        digest = hashlib.blake2b(f"{self.seed}|{salt}|{n}|{signature}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2 ** 64

    def decide(self, method: str, target: str, range_header: str) -> str | None:
        """The fault for this request (None: a clean exchange), recorded as drawn.

        Args:
            method: the request method.
            target: the request target (path and query).
            range_header: its ``Range`` header ("" if none).
        """
        signature = f"{method} {target} {range_header}"
        with self._lock:
            self.requests += 1
            n = self._seen[signature]
            self._seen[signature] += 1
            kind = None
            eligible = (self.methods is None or method in self.methods) and \
                self._streak[signature] < self.max_in_a_row
            if eligible and self._draw(signature, n, "rate") < self.rate:
                usable = [k for k in self.kinds if k != "truncate" or method in ("GET", "POST")]
                if usable:
                    kind = usable[int(self._draw(signature, n, "kind") * len(usable))]
            self._streak[signature] = self._streak[signature] + 1 if kind else 0
            if kind:
                self.counts[kind] += 1
                self.events.append((kind, method, target))
            return kind

    def _held(self, method: str, target: str) -> threading.Event | None:
        with self._lock:
            for m, part, arrived, release in self._holds:
                if m == method and part in target:
                    arrived.set()
                    return release
        return None

    # -- serving -------------------------------------------------------------------------

    def _forward(self, upstream: socket.socket | None, request: _Message,
                 method: str) -> tuple[socket.socket, _Message, bool]:
        """The server's answer, on the kept connection or a new one. A kept connection the
        server closed meanwhile is reopened once: only the faults drawn may reach the client."""
        if upstream is not None:
            try:
                return (upstream, *_exchange(upstream, request, method))
            except OSError:
                upstream.close()
        upstream = socket.create_connection(self.upstream)
        return (upstream, *_exchange(upstream, request, method))

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True, name="faultproxy-conn")
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            reader = client.makefile("rb")
            while not self._closing.is_set():
                head = _read_head(reader)
                if head is None:
                    return
                request = _Message(*head, b"")
                if request.header("expect").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")   # the body, then our answer
                request.body = _read_body(reader, request, until_eof=False)
                method, target = request.start.split(" ")[:2]
                release = self._held(method, target)
                if release is not None:   # held, then dropped: it never reaches the server
                    release.wait()
                    return
                kind = self.decide(method, target, request.header("range"))
                if kind in _ERRORS:
                    client.sendall(_error_answer(*_ERRORS[kind], method, target))
                    continue
                if kind == "stall":
                    self._closing.wait(self.stall_s)
                    return
                if kind == "drop" and self._draw(target, 0, "before") < 0.5:
                    return
                upstream, response, ends = self._forward(upstream, request, method)
                if kind == "drop":   # the server did it; its answer is lost
                    return
                if kind == "truncate" and response.body:
                    short = _short_answer(response, request.header("range"), self._draw(target, 0, "short"))
                    if short is not None:
                        client.sendall(short)
                        continue
                    client.sendall(response.head_bytes() + response.body[: len(response.body) // 2])
                    return
                if kind == "truncate":   # nothing to cut: the connection goes instead
                    return
                client.sendall(response.head_bytes() + response.body)
                if ends:
                    return
        except (OSError, ValueError):
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()


def _exchange(upstream: socket.socket, request: _Message, method: str) -> tuple[_Message, bool]:
    upstream.sendall(request.head_bytes(drop=("expect",)) + request.body)
    return _read_answer(upstream.makefile("rb"), method)


def _read_answer(stream, method: str) -> tuple[_Message, bool]:
    """The server's final answer (interim 1xx ones skipped) and whether it ends the connection."""
    while True:
        head = _read_head(stream)
        if head is None:
            raise ConnectionError("the server closed the connection")
        status = int(head[0].split(" ")[1])
        if not 100 <= status < 200:
            break
    response = _Message(*head, b"")
    no_body = method == "HEAD" or status in (204, 304)
    framed = response.header("content-length") or "chunked" in response.header("transfer-encoding").lower()
    response.body = b"" if no_body else _read_body(stream, response, until_eof=True)
    ends = response.header("connection").lower() == "close" or (not no_body and not framed)
    return response, ends


def _short_answer(response: _Message, range_header: str, draw: float) -> bytes | None:
    """Half of a ranged answer's body under headers that match it (for half of the draws), or
    None (the truncation is then a connection closed in the middle of the body)."""
    length, content_range = response.header("content-length"), response.header("content-range")
    if draw >= 0.5 or not range_header or not length or not content_range.startswith("bytes "):
        return None
    first, _, rest = content_range[6:].partition("-")
    total = rest.partition("/")[2]
    body = response.body[: len(response.body) // 2]
    cut = {"content-length": str(len(body)), "content-range": f"bytes {first}-{int(first) + len(body) - 1}/{total}"}
    headers = [(k, cut.get(k.lower(), v)) for k, v in response.headers]
    return _Message(response.start, headers, body).head_bytes() + body


def _error_answer(status: str, code: str, message: str, method: str, target: str) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{target.split('?')[0]}</Resource><RequestId>faultproxy</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"x-amz-request-id: faultproxy\r\n\r\n")
    return head.encode() + (b"" if method == "HEAD" else body)   # a HEAD answer has headers only


def wait_until(predicate, timeout: float, what: str, poll_s: float = 0.05) -> None:
    """Poll ``predicate()`` until true; ``TimeoutError`` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(poll_s)
