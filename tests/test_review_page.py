"""The review page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Set AUTOCONTOUR_SCREENSHOTS=docs/screenshots to write the README's screenshots
(with the shipped weights, so the contours are meaningful).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest
from conftest import EXAMPLE_CT, ROOT
from servers import start_server

from autocontour.config import Settings
from autocontour.model.weights import sha256_of
from autocontour.pipeline.calibration import ConfidenceCalibration
from autocontour.server.auth import hash_key

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def review_server(folder: Path, small_weights: Path):
    """A server with the planner's key. Screenshots for the docs: the shipped weights and the CPU defaults;
    tests: small and fast."""
    if os.environ.get("AUTOCONTOUR_SCREENSHOTS"):  # the project ships no calibration: the pictures show none
        weights, settings = Settings().default_weights, {"cpu_support_size": str(Settings().cpu_support_size)}
    else:  # the page shows the estimated surface Dice a calibration gives: here 0.1 + 0.8 x confidence
        weights, calibration = small_weights, folder / "calibration.json"
        line = ConfidenceCalibration.fit([0.0, 1.0], [0.1, 0.9], sha256_of(weights), "test")
        calibration.write_text(line.model_dump_json())
        settings = {"confidence_calibration": str(calibration)}
    return start_server(folder, weights, **settings,
                        api_keys={"planner": {"sha256": hash_key("planner-key"), "scopes": ["segment", "read"]}})


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_weights):
    s = review_server(tmp_path_factory.mktemp("page"), small_weights)
    yield s
    s.stop()


def test_upload_review_toggle_and_download(browser, server, screenshots, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    assert "DRAFT CONTOURS" in page.inner_text("header")
    page.wait_for_selector("text=An API key may be needed")  # the server requires a key
    page.click("summary")
    page.fill("#api-key", "planner-key")
    page.press("#api-key", "Tab")  # the change reloads the catalogue with the key
    page.wait_for_selector("input[name=structures][value=bladder]:checked")
    assert page.is_disabled("input[name=structures][value=ctvp]")  # no support set: cannot be chosen
    page.set_input_files("#ct-file", str(EXAMPLE_CT))
    page.click("#submit-button")
    page.wait_for_selector("#review-section:not([hidden])", timeout=600_000)
    page.wait_for_function("() => document.getElementById('slice-label').textContent.includes('/')")
    page.screenshot(path=str(screenshots / "review-axial.png"))
    if not os.environ.get("AUTOCONTOUR_SCREENSHOTS"):
        bladder = page.evaluate("() => state.info.structures.bladder")
        assert bladder["estimated_surface_dice"] == pytest.approx(0.1 + 0.8 * bladder["confidence"], abs=1e-3)
        shown = re.search(r"surface Dice about (\d\.\d\d)", page.inner_text("#structure-table"))
        assert shown and float(shown[1]) == pytest.approx(bladder["estimated_surface_dice"], abs=0.006)

    start = int(page.input_value("#slice"))
    page.focus("#canvas")
    for _ in range(3):
        page.keyboard.press("ArrowUp")
    page.wait_for_function(f"() => document.getElementById('slice').value == '{start + 3}'")
    page.keyboard.press("PageDown")
    page.wait_for_function(f"() => document.getElementById('slice').value == '{start - 7}'")
    assert "z = " in page.inner_text("#slice-label")
    assert page.inner_text("#slice-label").startswith(f"slice {start - 7} /")  # counted from 0, as summary.json

    assert page.evaluate("() => state.visible.bladder") is True
    page.uncheck("#show-bladder")
    assert page.evaluate("() => state.visible.bladder") is False
    page.check("#show-bladder")

    flagged = page.query_selector_all("#flagged li button")
    if flagged:
        flagged[0].click()
        page.wait_for_function("() => state.plane === 'axial'")

    page.select_option("#window-preset", "400,1800")
    page.wait_for_function("() => document.getElementById('width').value == '1800'")
    page.select_option("#plane", "coronal")
    page.wait_for_function("() => state.shown.startsWith('coronal/')")
    page.screenshot(path=str(screenshots / "review-coronal.png"))
    _assert_orientation_and_flags(page, "coronal", {"top": "S", "bottom": "I", "left": "R", "right": "L"},
                                  "top superior, left patient's right")
    page.select_option("#plane", "sagittal")
    page.wait_for_function("() => state.shown.startsWith('sagittal/')")
    _assert_orientation_and_flags(page, "sagittal", {"top": "S", "bottom": "I", "left": "A", "right": "P"},
                                  "top superior, left anterior")

    with page.expect_download() as info:
        page.click("#download-zip")
    zip_path = tmp_path / "result.zip"
    info.value.save_as(str(zip_path))
    with zipfile.ZipFile(zip_path) as archive:
        assert {"bladder.nii.gz", "anorectum.nii.gz", "ctvn.nii.gz", "summary.json", "preview.png"} <= set(
            archive.namelist())
    with page.expect_download() as info:
        page.click("button[aria-label='download the Bladder mask']")
    assert info.value.suggested_filename == "bladder.nii.gz"

    assert all(url.startswith(server.url) or url.startswith("blob:") or url.startswith("data:") for url in requests)
    page.close()


# The axial slices whose height the canvas marks red at both sides (the flag colour, #ff3030).
MARKED_ROWS = """() => {
  const canvas = document.getElementById('canvas'), ctx = canvas.getContext('2d');
  const rows = state.info.planes.axial.count, marked = [];
  for (let z = 0; z < rows; z++) {
    const y = Math.floor((rows - 1 - z + 0.5) * canvas.height / rows);
    const red = (x) => {
      const d = ctx.getImageData(x, y, 1, 1).data;
      return d[0] === 255 && d[1] === 48 && d[2] === 48;
    };
    if (red(3) && red(canvas.width - 4)) marked.push(z);
  }
  return marked;
}"""


def _assert_orientation_and_flags(page, plane: str, edges: dict[str, str], described: str) -> None:
    """The view names the direction at each edge, and marks every flagged axial slice, and no other, by red
    ticks at both sides at its height (superior at the top)."""
    assert page.evaluate(f"() => state.info.planes.{plane}.edges") == edges
    assert described in page.get_attribute("#canvas", "aria-label")
    flagged = sorted(set(page.evaluate("() => state.flagged.map((f) => f.slice)")))
    assert flagged, "the small weights' drafts flag slices: the markers must show"
    assert page.evaluate(MARKED_ROWS) == flagged


def test_page_is_keyboard_and_label_friendly(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    for control in ("#ct-file", "#api-key", "#level", "#width", "#plane", "#slice"):
        label = page.query_selector(f"label[for='{control[1:]}']")
        assert label is not None, control
    assert page.get_attribute("#canvas", "tabindex") == "0" and page.get_attribute("#canvas", "aria-label")
    assert page.get_attribute("#status", "aria-live") == "polite"
    page.close()
    assert (ROOT / "autocontour" / "server" / "static" / "app.js").is_file()
