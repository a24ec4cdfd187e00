"""README's curl and Python examples, extracted from README.md and run verbatim from the repository
root against a live `tokenlean serve` (the server listens on a free port: `localhost:8000` in the
examples is the one substitution)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import start

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def curl_commands() -> list[str]:
    return [line for block in code_blocks("bash") for line in block.splitlines() if line.startswith("curl ")]


def python_examples() -> list[str]:
    return [block for block in code_blocks("python") if "localhost:8000" in block]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("readme"))
    try:
        yield server
    finally:
        server.terminate()


def on(server, text: str) -> str:
    return text.replace("localhost:8000", f"127.0.0.1:{server.port}")


def test_the_examples_use_images_shipped_in_the_repository():
    named = set(re.findall(r"docs/examples/[\w.-]+", "\n".join(curl_commands() + python_examples())))
    assert len(named) >= 3
    for path in named:
        assert (ROOT / path).is_file() and (ROOT / path).stat().st_size < 8192, path


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_readme_curl_examples_run_as_written(server):
    commands = curl_commands()
    assert len(commands) >= 5
    answers = []
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", on(server, command)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, (command, result.stderr)
        body = json.loads(result.stdout)
        assert "error" not in body, (command, body)
        answers.append(body)
    vqa, classify, texts, images, base64_json = answers
    assert vqa["answer"] == "red"
    assert classify["label"] == "blue triangle"
    assert texts["ranking"][0]["text"] == "a red circle"
    assert images["ranking"][0]["index"] == 1
    assert base64_json["label"] == "green rectangle" and len(base64_json["labels"]) == 2


def test_readme_python_example_runs_as_written(server):
    [example] = python_examples()
    # What the example's comments say it shows, checked after it ran.
    checks = (
        '\nassert body["answer"] == "circle", body\n'
        'assert r.json()["ranking"][0]["index"] == 1, r.json()\n'
        'print("ok")\n'
    )
    result = subprocess.run(
        [sys.executable, "-"],
        input=on(server, example) + checks,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
