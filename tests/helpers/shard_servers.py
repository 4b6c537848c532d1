"""Local servers that hold shards, for tests of streaming: an HTTP server and an S3-compatible one.

Both listen on 127.0.0.1 only, on a free port, in a thread of the test process, and stop when their
``with`` block ends::

    with serve_http(folder) as server:            # GET/HEAD of the files under ``folder``
        url = server.url + "/train-000000.tar"
    with serve_http(folder, drops=2) as server:    # the first 2 GETs send half the body, then close
        ...
    with serve_http(folder, fail_always=True):     # every GET closes the connection mid-body
        ...
    with serve_http(folder, delay_s=0.3):          # each GET waits before its body (overlapping clients)
        ...
    with serve_s3({"bucket": {"dir/a.tar": b"..."}}) as endpoint:  # moto; env has fake credentials
        ...                                         # and AWS_ENDPOINT_URL=endpoint meanwhile

``server.gets`` counts the GET requests per path, so a test can prove a shard was fetched once.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading
import time
from collections import Counter
from typing import Iterator


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory``; a GET may be cut short on purpose (``server.drops`` / ``fail_always``)."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        server: _ShardHTTPServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.gets[self.path] += 1
            cut = server.fail_always or server.drops > 0
            if cut and not server.fail_always:
                server.drops -= 1
        if server.delay_s:
            time.sleep(server.delay_s)
        if not cut:
            super().do_GET()
            return
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as file:
            body = file.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # the peer sees the body end early


class _ShardHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: str, drops: int, fail_always: bool, delay_s: float):
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=folder))
        self.lock = threading.Lock()
        self.gets: Counter[str] = Counter()
        self.drops, self.fail_always, self.delay_s = drops, fail_always, delay_s

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


@contextlib.contextmanager
def serve_http(folder, drops: int = 0, fail_always: bool = False, delay_s: float = 0.0
               ) -> Iterator[_ShardHTTPServer]:
    """An HTTP server for the files under ``folder`` on 127.0.0.1 (see the module docstring)."""
    server = _ShardHTTPServer(str(folder), drops, fail_always, delay_s)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def serve_s3(buckets: dict[str, dict[str, bytes]]) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 holding ``{bucket: {key: bytes}}``; yields its endpoint URL.

    Meanwhile the environment holds fake credentials and ``AWS_ENDPOINT_URL`` (botocore, hence s3fs,
    reads it), so ``s3://bucket/key`` reaches this server and nothing else.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in (*_S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(_S3_ENV, AWS_ENDPOINT_URL=endpoint)
    _clear_fsspec_instances()
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for bucket, objects in buckets.items():
            client.create_bucket(Bucket=bucket)
            for key, data in objects.items():
                client.put_object(Bucket=bucket, Key=key, Body=data)
        yield endpoint
    finally:
        _clear_fsspec_instances()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _clear_fsspec_instances() -> None:
    """fsspec caches one filesystem object per set of options; a new endpoint needs a new one."""
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
