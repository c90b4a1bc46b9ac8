"""Real storage servers on 127.0.0.1 for the tests: moto's S3 server and Python's http.server.

Both run in a thread of the test process (started and stopped by the tests' fixtures), so the
processes a test spawns (gloo ranks, loader workers, CLI subprocesses) reach them over TCP
like any S3 or HTTP endpoint. Each can be told to answer the next requests for a path with
an HTTP error (``fail(path_part, times, status)``), and keeps a log of the requests it served,
so that tests see retries and write order from the server's side.
"""
from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

# What boto3, s3fs and botocore read from the environment (never clicktower itself).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class Faults:
    """Planned failures and the request log shared by a server's threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.planned: list[list] = []   # [path part, times left, status, method]
        self.log: list[tuple[str, str, int]] = []   # (method, path, status)

    def fail(self, path_part: str, times: int, status: int = 503, method: str = "GET") -> None:
        """Answer the next ``times`` ``method`` requests whose path contains ``path_part``
        with ``status``."""
        with self.lock:
            self.planned.append([path_part, times, status, method])

    def take(self, method: str, path: str) -> int | None:
        with self.lock:
            for plan in self.planned:
                if plan[0] in path and plan[3] == method and plan[1] > 0:
                    plan[1] -= 1
                    return plan[2]
        return None

    def record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((method, path, status))


class _FaultMiddleware:
    """WSGI middleware in front of moto: planned errors, then moto; every request logged."""

    def __init__(self, app, faults: Faults):
        self.app, self.faults = app, faults

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        status = self.faults.take(method, path)
        if status is not None:
            self.faults.record(method, path, status)
            body = (b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>"
                    b"<Message>injected</Message></Error>")
            start_response(f"{status} Injected", [("Content-Type", "application/xml"),
                                                   ("Content-Length", str(len(body)))])
            return [body]
        codes = []

        def start(status_line, headers, exc_info=None):
            codes.append(int(status_line.split()[0]))
            return start_response(status_line, headers, exc_info)

        result = self.app(environ, start)
        self.faults.record(method, path, codes[0] if codes else 0)
        return result


@contextmanager
def moto_s3() -> Iterator[tuple[str, Faults]]:
    """moto's S3 server (``ThreadedMotoServer``) on a free port of 127.0.0.1, with faults:
    yields ``(endpoint URL, faults)``; stopped on exit."""
    from moto.moto_server.threaded_moto_server import MotoRequestHandler, ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
    faults = Faults()

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:   # moto's own entry, with the middleware in front
            app = _FaultMiddleware(DomainDispatcherApplication(create_backend_app),
                                   faults)
            self._server = make_server(self._ip_address, self._port, app, True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = Server(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}", faults
    finally:
        server.stop()


class _RangeHandler(SimpleHTTPRequestHandler):
    """http.server's file handler plus single ``Range: bytes=a-b`` requests (what object
    stores and web servers answer) and planned faults."""

    faults: Faults

    def log_message(self, *args) -> None:   # quiet
        pass

    def send_head(self):
        status = self.faults.take(self.command, self.path)
        if status is not None:
            self.faults.record(self.command, self.path, status)
            self.send_error(status, "injected")
            return None
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match is None or not os.path.isfile(path):
            self.faults.record(self.command, self.path, 200 if os.path.isfile(path) else 404)
            return super().send_head()
        size = os.path.getsize(path)
        start = int(match.group(1))
        end = min(int(match.group(2)) + 1 if match.group(2) else size, size)
        fh = open(path, "rb")
        fh.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(max(0, end - start)))
        self.end_headers()
        self.faults.record(self.command, self.path, 206)
        self._remaining = end - start
        return fh

    def copyfile(self, source, outputfile):
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(remaining))
        self._remaining = None


@contextmanager
def http_server(root: str) -> Iterator[tuple[str, Faults]]:
    """Python's ``http.server`` serving folder ``root`` on a free port of 127.0.0.1 (with
    Range requests and faults): yields ``(base URL, faults)``; stopped on exit."""
    faults = Faults()
    handler = type("Handler", (_RangeHandler,), {"faults": faults})
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=root))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def make_bucket(endpoint: str, name: str) -> None:
    """Create bucket ``name`` on the server at ``endpoint`` (boto3, as a user would)."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
