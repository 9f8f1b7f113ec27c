"""Listening sockets and a server running in a background thread (for tests and the README screenshot)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from rqvae.errors import UserError
from rqvae.serve.app import create_app
from rqvae.serve.engine import Engine
from rqvae.serve.models import load_models


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a UserError naming the fix (port 0 picks a free port)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535, got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return socket.create_server(address[:2], family=family)
    except socket.gaierror:
        raise UserError(f"--host {host} is not a known address; use 127.0.0.1 (or 0.0.0.0 for all)") from None
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port "
                        "(or --port 0 for a free one)") from None


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def make_server(app):
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))


@contextmanager
def running(paths: list[str | Path], *, device: str = "cpu", timeout: float = 60.0,
            **engine_kw) -> Iterator[str]:
    """Serve ``paths`` on a free 127.0.0.1 port in a background thread; yields the page's URL and stops the
    server on exit. ``engine_kw``: :class:`~rqvae.serve.engine.Engine` options and ``max_upload_mb``."""
    max_upload_mb = engine_kw.pop("max_upload_mb", 10.0)
    engine = Engine(load_models(paths, device=device), **engine_kw)
    sock = bind("127.0.0.1", 0)
    server = make_server(create_app(engine, max_upload_mb=max_upload_mb))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the rqvae serve test server did not start")
            time.sleep(0.05)
        yield url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        engine.close()
        sock.close()
