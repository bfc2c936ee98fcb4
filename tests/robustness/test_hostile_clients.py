"""`attention-lens serve` against hostile clients on raw sockets: clients that vanish mid-body, trickle their
headers or body, or open more connections than the cap. The server answers everyone else throughout, stops on
SIGINT, and its log holds no traceback. Every loop is bounded; the server listens on 127.0.0.1 only."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest
from clirun import run, served_port, start, wait_for
from conftest import make_model_dir

pytestmark = pytest.mark.robustness

TIMEOUT_S, MAX_CONNECTIONS = 2, 4
BODY = json.dumps({"text": "The quick brown fox", "k": 1}).encode()


def request(method: str, path: str, body: bytes = b"", length: int | None = None) -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def answer(port: int, data: bytes, wait: float = 60) -> tuple[int, bytes]:
    """Send `data` on a fresh connection, read the whole answer: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        received = read_until_closed(sock, wait)
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def read_until_closed(sock: socket.socket, wait: float) -> bytes:
    sock.settimeout(wait)
    chunks = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model, log = make_model_dir(root / "model"), root / "server.log"
    process = start("serve", "--model", model, "--host", "127.0.0.1", "--port", 0, "--request-timeout", TIMEOUT_S,
                    "--max-connections", MAX_CONNECTIONS, log=log)
    try:
        port = wait_for(lambda: served_port(log), "the server to listen", process, log=log)
        assert answer(port, request("POST", "/api/decode", BODY))[0] == 200  # warm: the first decode is slow
        yield process, port, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def decodes_seen(log) -> int:
    return log.read_text().count('"POST /api/decode HTTP/1.1" 200')


def test_client_that_disconnects_mid_body_costs_nothing(server):
    process, port, log = server
    before = decodes_seen(log)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request("POST", "/api/decode", BODY[:10], length=len(BODY)))  # then hang up
    time.sleep(0.5)
    assert process.poll() is None and decodes_seen(log) == before  # no decode ran for them
    assert answer(port, request("POST", "/api/decode", BODY))[0] == 200
    assert "Traceback" not in log.read_text() and "Exception in ASGI" not in log.read_text()


def test_slow_body_gets_408_within_the_timeout(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(request("POST", "/api/decode", BODY[:10], length=len(BODY)))
        received = read_until_closed(sock, 30)
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"did not arrive within" in received and elapsed < TIMEOUT_S + 20


def test_trickled_headers_are_dropped(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        for piece in (b"POST /api/de", b"code HTTP/1.1\r\nHo"):
            sock.sendall(piece)
            time.sleep(0.2)
        received = read_until_closed(sock, 30)  # the server closes it; nothing is answered
        assert time.monotonic() - started < TIMEOUT_S + 20 and not received.startswith(b"HTTP/1.1 200")


def test_connections_over_the_cap_get_503_until_idle_ones_are_dropped(server):
    process, port, _ = server
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        assert answer(port, request("GET", "/api/info"))[0] == 503
        for sock in idle:  # silent connections are closed by the server after the timeout
            assert read_until_closed(sock, TIMEOUT_S + 20) == b""
    finally:
        for sock in idle:
            sock.close()
    status, body = answer(port, request("POST", "/api/decode", BODY))
    assert status == 200 and json.loads(body)["heads"] and process.poll() is None


def test_nan_in_a_request_is_400(server):
    _, port, _ = server
    status, body = answer(port, request("POST", "/api/decode", b'{"text": "hi", "k": NaN}'))
    assert status == 400 and "NaN" in json.loads(body)["error"]


def test_server_stops_on_sigint_and_its_log_has_no_traceback(server):
    """Last in this module: it stops the shared server."""
    process, _, log = server
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI" not in text and "ERROR" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == "interrupted"


@pytest.mark.parametrize("args, fragment", [
    (["--port", "99999"], "--port"),
    (["--port", "-1"], "--port"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-connections", "0"], "--max-connections"),
    (["--request-timeout", "nan"], "--request-timeout"),
])
def test_bad_server_settings_are_one_line(tmp_path, args, fragment):
    run("serve", "--model", tmp_path / "not-loaded", *args).assert_one_line_error(fragment)
