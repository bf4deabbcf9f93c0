"""Headless Chromium (the system's, driven by Playwright) for the viewer's browser test.

WebGL without a GPU runs on SwiftShader (``--use-angle=swiftshader --enable-unsafe-swiftshader``).
Playwright's own browser downloads are not used: ``executable_path`` points at the installed Chromium.
"""

from __future__ import annotations

import io
import os
import shutil
import time

import numpy as np
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]
INSTALL_HINT = ("the viewer's browser test needs Chromium: `apt-get install chromium` on Debian/Ubuntu (what "
                "`make browser` runs), or set LIGHTNING_GRENDEL_CHROMIUM to a Chromium or Chrome binary")

# Hide every element that is not the WebGL canvas or one of its ancestors (control panel, notifications),
# so that the screenshot holds only what the 3-D view draws.
HIDE_OVERLAYS = """() => {
  const keep = new Set();
  for (const canvas of document.querySelectorAll('canvas')) {
    for (let e = canvas; e; e = e.parentElement) keep.add(e);
  }
  for (const e of document.body.querySelectorAll('*')) {
    if (!keep.has(e) && !e.querySelector('canvas')) e.style.visibility = 'hidden';
  }
}"""
SHOW_OVERLAYS = "() => { for (const e of document.body.querySelectorAll('*')) e.style.visibility = ''; }"


def chromium_path() -> str | None:
    """The Chromium to drive: ``$LIGHTNING_GRENDEL_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / Chrome."""
    configured = os.environ.get("LIGHTNING_GRENDEL_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255.0


def screenshots(url: str, width: int, height: int, deadline_s: float = 120.0) -> tuple[np.ndarray, np.ndarray, str]:
    """(3-D view only, whole page, page text) of ``url`` in a ``width`` x ``height`` window, in [0, 1].

    The 3-D view is taken once two screenshots in a row are identical and not blank (the splats
    arrived, were sorted and finished fading in); ``deadline_s`` only bounds a page that never settles.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError(INSTALL_HINT)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_function("() => document.querySelector('canvas') !== null", timeout=deadline_s * 1000)
            page.wait_for_function("() => document.body.innerText.includes('Gaussians')", timeout=deadline_s * 1000)
            text = page.inner_text("body")
            page.evaluate(HIDE_OVERLAYS)
            previous, end = None, time.monotonic() + deadline_s
            while time.monotonic() < end:
                view = _image(page.screenshot())
                if previous is not None and np.array_equal(view, previous) and view.std() > 0.02:
                    break
                previous = view
                time.sleep(0.3)
            page.evaluate(SHOW_OVERLAYS)
            return view, _image(page.screenshot()), text
        finally:
            browser.close()


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    return float(-10.0 * np.log10(np.mean((image - reference) ** 2)))
