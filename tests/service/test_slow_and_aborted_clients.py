"""Clients that stall or go away, against a real `tokenlean serve` over raw sockets: a half-sent body
is answered 408 and its connection closed once the body deadline passes, stalled connections
cannot take more than the connection cap, and an aborted upload is counted as status 499 and
logged as one INFO line, not as a server error with tracebacks."""

from __future__ import annotations

import socket
import struct

import httpx
import pytest
from conftest import png_bytes
from live_server import closed_by_peer, open_request, read_response, start, wait_until

MAX_CONNECTIONS = 6
BODY_TIMEOUT_S = 5  # long enough that the stalled clients outlive the probes of the cap test


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(
        tmp_path_factory.mktemp("clients"),
        TOKENLEAN_LIMITS__BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        TOKENLEAN_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        TOKENLEAN_MODELS__RETRIEVAL__ENABLED="false",
    )
    try:
        yield server
    finally:
        server.terminate()


def stalled(port: int, path: str = "/v1/vqa") -> socket.socket:
    """A request that announced 100 kB of JSON and sent a few bytes of it."""
    sock = open_request(port, path, 100_000)
    sock.sendall(b'{"question": "what shape?", "image": "iVBORw0KGgo')
    return sock


def test_a_half_sent_body_is_answered_408_and_its_connection_closed(server):
    before = server.count("tokenlean_requests_total", status="408")
    sock = stalled(server.port)
    try:
        r = read_response(sock)
        assert r.status == 408, r.body
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "request_timeout"
        assert f"{BODY_TIMEOUT_S} s" in r.json()["error"]["message"]
        assert closed_by_peer(sock)
    finally:
        sock.close()
    assert server.count("tokenlean_requests_total", status="408") == before + 1


def test_a_body_trickling_in_past_the_deadline_is_also_408(server):
    sock = open_request(server.port, "/v1/classify", 10_000)
    try:
        sock.settimeout(0.2)
        for _ in range(400):  # one byte at a time until the server answers
            sock.sendall(b" ")
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                continue
        sock.settimeout(60)
        assert read_response(sock).status == 408
    finally:
        sock.close()


def test_stalled_connections_are_capped_and_released_by_the_body_deadline(server):
    image = {"image": ("a.png", png_bytes(), "image/png")}
    socks = [stalled(server.port, "/v1/classify") for _ in range(MAX_CONNECTIONS)]
    try:
        # With the cap taken by stalled clients, a new request is refused at once, not queued.
        refused = wait_until(
            lambda: httpx.post(f"{server.base}/v1/classify", files=image, timeout=60).status_code == 503,
            what="a request refused by the connection cap",
        )
        assert refused
        # uvicorn counts the connection asking too: the last stalled one may have been refused too.
        statuses = sorted(read_response(s).status for s in socks)
        assert statuses[:-1] == [408] * (MAX_CONNECTIONS - 1) and statuses[-1] in (408, 503), statuses
    finally:
        for s in socks:
            s.close()
    assert httpx.post(f"{server.base}/v1/classify", files=image, timeout=60).status_code == 200


def abort(sock: socket.socket, reset: bool) -> None:
    if reset:  # RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_aborted_uploads_are_499_and_one_info_line_each(server, reset):
    before = server.count("tokenlean_requests_total", status="499")
    server_errors = server.count("tokenlean_requests_total", status="500")
    seen = len(server.log_lines())
    json_upload = stalled(server.port)
    boundary = "b0undary"
    multipart = open_request(server.port, "/v1/vqa", 100_000, f"multipart/form-data; boundary={boundary}")
    multipart.sendall(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()
        + png_bytes()[:100]
    )
    abort(json_upload, reset)
    abort(multipart, reset)

    wait_until(
        lambda: server.count("tokenlean_requests_total", status="499") == before + 2,
        what="two aborted uploads counted as 499",
    )
    assert server.count("tokenlean_requests_total", status="500") == server_errors
    new = server.log_lines()[seen:]
    assert not [line for line in new if line["level"] not in ("info", "debug")], new
    assert not [line for line in new if "exception" in line or "Traceback" in line["message"]], new
    aborted = [line for line in new if "closed the connection" in line["message"]]
    assert len(aborted) == 2, new
