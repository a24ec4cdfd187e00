"""SIGTERM with requests in flight, against a real `tokenlean serve`: requests that cannot finish
within the shutdown timeout are answered the JSON 503 of a closing server (never uvicorn's
text/plain 500), and the process exits 0 once it has drained."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import png_bytes
from live_server import open_request, read_response, start, wait_until

from models.demo.paths import CHECKPOINTS, VIT_CLASSIFY

BATCH = 4


def classify(base: str) -> tuple[int, str, dict]:
    r = httpx.post(f"{base}/v1/classify", files={"image": ("a.png", png_bytes())}, timeout=120)
    return r.status_code, r.headers.get("content-type", ""), r.json()


def test_sigterm_answers_every_request_in_json_and_exits_0(tmp_path):
    server = start(
        tmp_path,
        TOKENLEAN_SHUTDOWN_TIMEOUT_S="1",
        TOKENLEAN_MODELS__VQA__ENABLED="false",
        TOKENLEAN_MODELS__RETRIEVAL__ENABLED="false",
        # The drain, not the model: the small classifier answers its full batches in milliseconds.
        TOKENLEAN_MODELS__CLASSIFY__CHECKPOINT=str(CHECKPOINTS / VIT_CLASSIFY),
        # A batch runs only when full: the requests after the last full batch stay queued, in
        # flight when the signal comes, however fast this machine is.
        TOKENLEAN_BATCHING__MAX_BATCH_SIZE=str(BATCH),
        TOKENLEAN_BATCHING__MAX_WAIT_MS="600000",
        TOKENLEAN_BATCHING__DEADLINE_MS="600000",
        TOKENLEAN_LIMITS__BODY_TIMEOUT_S="600",
        # Not an admission test: a busy machine must not turn any of these requests away.
        TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS="600000",
        TOKENLEAN_BATCHING__MAX_EVENT_LOOP_LAG_MS="600000",
    )
    try:
        # An upload still under way at the signal, and left so until the server gives up on it.
        uploading = open_request(server.port, "/v1/classify", 100_000)
        uploading.sendall(b'{"image": "iVBORw0KGgo')
        with ThreadPoolExecutor(3 * BATCH) as pool:
            futures = [pool.submit(classify, server.base) for _ in range(2 * BATCH + BATCH - 1)]
            wait_until(
                lambda: sum(f.done() for f in futures) == 2 * BATCH,
                what="two full batches answered",
                then=lambda: [f.result()[:2] for f in futures if f.done()],
            )
            wait_until(
                lambda: server.count("tokenlean_queue_depth", task="classify") == BATCH - 1,
                what="the rest queued",
            )
            server.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        late = read_response(uploading)
        code = server.proc.wait(120)
    finally:
        uploading.close()
        if server.proc.poll() is None:
            server.proc.kill()
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * (2 * BATCH) + [503] * (BATCH - 1), answers
    assert all(content_type == "application/json" for _, content_type, _ in answers)
    assert {body["error"]["code"] for status, _, body in answers if status == 503} == {"unavailable"}
    assert (late.status, late.headers["content-type"]) == (503, "application/json"), late
    assert late.json()["error"]["code"] == "unavailable"
    assert code == 0, server.log.read_text()[-3000:]
    # uvicorn reports that it cut the stalled upload off (which the app then answered 503); nothing
    # else is an error, and nothing logs a traceback.
    errors = [line for line in server.log_lines() if line["level"] in ("error", "critical")]
    assert [e["message"] for e in errors] == ["Cancel 1 running task(s), timeout graceful shutdown exceeded"]
    assert not [line for line in server.log_lines() if "exception" in line]


def test_sigterm_on_an_idle_server_exits_0(tmp_path):
    server = start(
        tmp_path, TOKENLEAN_MODELS__VQA__ENABLED="false", TOKENLEAN_MODELS__RETRIEVAL__ENABLED="false"
    )
    assert classify(server.base)[0] == 200
    assert server.terminate() == 0
