"""The playground page (app/playground/) in a real headless browser: Debian's chromium, driven by
playwright pointed at it (playwright's own browser download is never used). A live server that
requires an API key serves the two-stream VQA model and the LookupViT classifier; the page asks
for the key, takes an uploaded image and a question, and shows every level's answer (the API's)
and token map, and the server's errors as messages.

TOKENLEAN_PLAYGROUND_SCREENSHOT=<path> saves a screenshot of the page after the VQA run (how
docs/playground.png was made)."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest
from live_server import start

from app.settings import CHECKPOINTS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
)
KEY = "playground-test-key"
IMAGE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "red-circle.png"
QUESTION = "what color is the shape?"
LEVELS = ("none", "low", "medium", "high")
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = start(
        tmp_path_factory.mktemp("playground"),
        TOKENLEAN_API_KEY=KEY,
        TOKENLEAN_WARMUP="false",
        TOKENLEAN_MODELS__RETRIEVAL__CHECKPOINT=str(CHECKPOINTS / "retrieval"),  # ViLT, 64 px
        TOKENLEAN_MODELS__CLASSIFY__CHECKPOINT=str(CHECKPOINTS / "lookupvit-classify"),
    )
    yield live
    live.terminate()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def api_answers(server, compression: str) -> list[dict]:
    body = {"image": base64.b64encode(IMAGE.read_bytes()).decode(), "question": QUESTION}
    r = httpx.post(
        f"{server.base}/v1/vqa",
        json={**body, "compression": compression, "return_token_map": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_the_page_asks_for_the_key_then_answers_every_level_with_its_token_map(server, page):
    page.goto(f"{server.base}/")  # / leads to the playground
    assert page.url.endswith("/playground")
    page.wait_for_selector("#key-form:not([hidden])")
    assert "requires an API key" in page.text_content("#message")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_selector('input[name="task"][value="vqa"]:checked')
    assert page.is_hidden("#texts-field")

    page.set_input_files("#file", str(IMAGE))
    page.fill("#question", QUESTION)
    page.click("#run:not([disabled])")
    for level in LEVELS:
        page.wait_for_selector(f'.card[data-level="{level}"] canvas.token-map[data-drawn="true"]')
    page.wait_for_selector("#run:not([disabled])")
    assert page.is_hidden("#message")

    cards = {level: page.locator(f'.card[data-level="{level}"]') for level in LEVELS}
    for level, card in cards.items():
        expected = api_answers(server, level)
        assert card.locator(".answer").text_content() == expected["answer"]
        shown = card.locator(".scores li em").all_text_contents()
        assert shown == [a["label"] for a in expected["answers"]]
        assert card.locator(".token-map").get_attribute("data-tokens") == str(expected["token_map"]["tokens"])
        saved = card.locator(".stats dd").nth(1).text_content()  # "45.2 %"
        assert abs(float(saved.rstrip(" %")) - 100 * expected["flops"]["saved"]) <= 0.051
        assert card.locator("svg.chart rect").count() == len(expected["tokens"]["per_layer"])
    none_tokens = int(cards["none"].locator(".token-map").get_attribute("data-tokens"))
    high_tokens = int(cards["high"].locator(".token-map").get_attribute("data-tokens"))
    assert none_tokens == 256 and high_tokens < none_tokens  # DINOv2-S/14 at 224 px: 16 x 16 patches

    # the maps are drawn: the image under them, and the levels' maps differ
    pictures = {
        level: card.locator(".token-map").evaluate("c => c.toDataURL()") for level, card in cards.items()
    }
    assert len(set(pictures.values())) == len(LEVELS)
    opaque = (  # the share of the canvas's pixels painted
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
        " for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n / (d.length / 4); }"
    )
    assert cards["high"].locator(".token-map").evaluate(opaque) == 1.0

    shot = os.environ.get("TOKENLEAN_PLAYGROUND_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)


def test_ranking_texts_with_vilt(server, page):
    page.check('input[name="task"][value="retrieval"]')
    assert page.is_hidden("#question-field")
    for level in ("none", "low", "medium"):
        page.uncheck(f'input[name="level"][value="{level}"]')
    page.fill("#texts", "a blue triangle\na red circle")
    page.click("#run:not([disabled])")
    page.wait_for_selector('.card[data-level="high"] canvas.token-map[data-drawn="true"]')
    r = httpx.post(
        f"{server.base}/v1/retrieval",
        json={
            "image": base64.b64encode(IMAGE.read_bytes()).decode(),
            "texts": ["a blue triangle", "a red circle"],
            "compression": "high",
        },
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    ranking = [row["text"] for row in r.json()["ranking"]]
    card = page.locator('.card[data-level="high"]')
    assert card.locator(".scores li em").all_text_contents() == ranking
    assert card.locator(".answer").text_content() == ranking[0]


def test_a_chosen_layer_and_the_lookupvit_grid(server, page):
    page.check('input[name="task"][value="classify"]')
    page.click("#run:not([disabled])")
    card = page.locator('.card[data-level="high"]')
    page.wait_for_selector('.card[data-level="high"] canvas.token-map[data-drawn="true"]')
    assert "compressed token" in card.locator(".map-caption").text_content()
    # the slider maps another layer: the request asks for it, the caption says it
    page.wait_for_selector("#run:not([disabled])")
    page.locator("#layer").evaluate(
        "el => { el.value = '1'; el.dispatchEvent(new Event('input'));"
        " el.dispatchEvent(new Event('change')); }"
    )
    page.wait_for_selector('.card[data-level="high"] .map-caption:has-text("layer 1:")')
    assert page.text_content("#layer-value") == "1"


def test_server_errors_show_as_messages(server, page):
    page.check('input[name="task"][value="vqa"]')
    page.fill("#question", " ")
    page.click("#run:not([disabled])")
    page.wait_for_selector("#message:not([hidden])")
    message = page.text_content("#message")
    assert message.startswith("422") and "question" in message
    assert page.locator('.card[data-level="high"].failed .error').text_content() == message
