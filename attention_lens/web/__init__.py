"""The local web explorer: `create_app` builds it, `run_server` serves it on a local port."""

from __future__ import annotations

import socket

from ..errors import AttentionLensError
from .app import Limits, create_app

__all__ = ["Limits", "bind", "create_app", "run_server"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, opened here so a busy port is one clear error rather than a server log."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise AttentionLensError(f"cannot listen on {host}:{port} ({error.strerror}); pass another --port") from None
    sock.listen(128)
    return sock


def run_server(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` until interrupted (Ctrl-C). Logs go to stderr."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    server.run(sockets=[sock])
