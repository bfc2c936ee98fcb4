"""A real uvicorn server on a free local port, in a background thread, for API and browser tests."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import uvicorn

from attention_lens.web import bind


@contextmanager
def live_server(app):
    """Yield the base URL of `app` served on 127.0.0.1:<free port>; stop the server on exit."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
