"""Open a report in headless Chromium (Debian's ``chromium``; ``make test`` installs it)
and say what rendered: each image's state, console messages, page errors, and every
request that was not the page itself or an inline ``data:`` URI."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from needs import missing

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network: Chromium's background services would otherwise try
# Google's hosts at every start.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Rendered:
    images: list[dict]  # figure, complete, width, height
    console: list[tuple[str, str]]  # (type, text)
    page_errors: list[str]
    requests: list[str]  # other than the page and data: URIs


def require_chromium() -> str:
    if not Path(CHROMIUM).exists():
        missing("Debian's chromium is not installed (make test installs it: apt-get install chromium)")
    return CHROMIUM


def render(html: Path, screenshot: Path) -> Rendered:
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    page_url = html.resolve().as_uri()
    console, errors, requests = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.on("console", lambda msg: console.append((msg.type, msg.text)))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url)
                    if req.url != page_url and not req.url.startswith("data:") else None)
            page.goto(page_url, wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({figure: e.dataset.figure, complete: e.complete,"
                       " width: e.naturalWidth, height: e.naturalHeight}))")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return Rendered(images, console, errors, requests)
