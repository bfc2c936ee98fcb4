"""The local web explorer: `create_app` builds it, `run_server` serves it on a local port."""

from __future__ import annotations

import socket

from ..errors import AttentionLensError
from .app import Limits, create_app

__all__ = ["Limits", "bind", "create_app", "run_server"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, opened here so a busy port or a bad address is one clear error, not a server log."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AttentionLensError(f"port {port} is not a TCP port; give one from 1 to 65535 (0: any free port)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError, UnicodeError) as error:  # busy port, unknown host, a host name too long
        sock.close()
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise AttentionLensError(f"cannot listen on {host}:{port} ({reason}); pass another --port (or --host)") from None
    sock.listen(128)
    return sock


def run_server(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` until interrupted (Ctrl-C). Logs go to stderr.

    At most the app's `Limits.max_connections` connections are served at once (further requests get 503); a
    connection whose request headers have not arrived within `Limits.request_timeout` seconds is closed (the app
    itself times out slow bodies), and so is a keep-alive connection idle for 5 s: a crowd of silent or
    trickling clients cannot pin the server.
    """
    import uvicorn

    limits = getattr(getattr(app, "state", None), "limits", None) or Limits()
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, timeout_keep_alive=5,
                            limit_concurrency=limits.max_connections, http=_timed_protocol(limits.request_timeout))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except (OSError, RuntimeError) as error:
        raise AttentionLensError(f"the server stopped: {str(error).splitlines()[0] if str(error) else error!r}; "
                                 "check the address and port, then start it again") from None


def _timed_protocol(timeout: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent its request headers within `timeout`
    seconds (uvicorn itself waits forever for them: a trickle of header bytes would hold a connection)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.loop.call_later(timeout, self._close_if_no_request)

        def _close_if_no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request has begun on it
                self.transport.close()

    return TimedH11Protocol
