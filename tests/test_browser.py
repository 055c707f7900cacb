"""The web page end to end in a real browser: Debian's chromium driven by Playwright (the system browser; nothing
downloaded). Types a prompt, waits for streamed text and a finished image, checks a screenshot; the stop button
cancels a running generation on the server."""

from __future__ import annotations

import io
import os
import shutil

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run does)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def page(tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 700})
        finally:
            browser.close()


def test_page_streams_text_and_an_image_and_stop_cancels(page, tmp_path):
    import numpy as np
    from PIL import Image
    from test_server import metric, running_server
    from test_serving import engine

    from transfusion.serving.protocol import ServeLimits
    from transfusion.serving.server import create_app

    app = create_app(engine(boi_bias=50.0), model_name="tiny", limits=ServeLimits(max_steps=250))
    with running_server(app) as base:
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        page.fill("#prompt", "blue")
        page.fill("#steps", "20")
        page.fill("#max_tokens", "12")
        page.fill("#preview_every", "5")
        page.click("#go")
        page.wait_for_selector("#answer figure.final img", timeout=60_000)
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
        text = page.inner_text("#answer .text")
        assert len(text) > 0
        natural = page.eval_on_selector("#answer figure.final img", "img => [img.naturalWidth, img.complete]")
        assert natural == [8, True]  # a decoded PNG of the model's size, shown upscaled
        shot = page.screenshot(path=str(tmp_path / "page.png"))
        pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float32)
        box = page.eval_on_selector("#answer figure.final img", "e => { const r = e.getBoundingClientRect(); "
                                    "return [r.x, r.y, r.width, r.height]; }")
        x, y, w, h = (int(v) for v in box)
        assert w >= 150 and pixels[y + 2:y + h - 2, x + 2:x + w - 2].std() > 1.0  # the image is drawn, not blank
        assert page.is_disabled("#stop") and page.is_enabled("#go")

        before = metric(base, "transfusion_cancellations_total")
        page.fill("#steps", "250")
        page.fill("#max_images", "4")
        page.fill("#max_tokens", "64")
        page.click("#go")
        page.wait_for_selector("#answer figure", timeout=60_000)  # an image has started
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=30_000)
        for _ in range(100):  # the server sees the disconnect and frees the slot
            if metric(base, "transfusion_cancellations_total") > before:
                break
            page.wait_for_timeout(100)
        assert metric(base, "transfusion_cancellations_total") == before + 1
        assert metric(base, "transfusion_running_requests") == 0
