"""The page in a real headless browser (Debian's chromium driven by Playwright): it loads with the demo model
chosen, a click on Generate shows an image, and a training job queued from the Train tab is watched live
(the loss curve and the sample gallery grow while it runs), after which its LoRA is offered in Generate
without a refresh. A screenshot of every tab is saved outside the repository ($LORA_STUDIO_SCREENSHOTS, or
pytest's temporary folder). Skipped where no chromium is installed (CI installs it)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="needs chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

# no sandbox as root in containers; no background traffic: the machine has no network
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip
TABS = ("Generate", "Library", "Dataset", "Train", "Merge", "Jobs")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LORA_STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(studio_app):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(studio_app[1], wait_until="load")  # the page polls its jobs: the network is never idle
        page.get_by_role("tab", name="Jobs").wait_for(timeout=30_000)
        yield page
        browser.close()


def test_page_opens_on_generate_with_the_demo_model(page):
    assert page.title() == "LoRA Studio"
    for tab in TABS:
        assert page.get_by_role("tab", name=tab).count() == 1
    model = page.get_by_label("Base model").first
    assert model.input_value() == "demo:sd15"


def generate_and_wait(page) -> str:
    """Click Generate and wait for this click's result line (each names a new file)."""
    info = page.locator("#generate-info")
    before = info.inner_text()
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(info).not_to_have_text(before, timeout=60_000)
    expect(info).to_contain_text("saved in outputs/")
    return info.inner_text()


def test_clicking_generate_shows_an_image(page, studio_app):
    generate_and_wait(page)
    image = page.locator("#generate-gallery img").first
    image.wait_for(timeout=10_000)
    assert image.evaluate("img => img.naturalWidth") == 64
    assert any(studio_app[0].workspace.outputs.glob("*.png"))


def test_the_history_shows_thumbnails(page):
    """Opened after the first image, the History shows it as one thumbnail of a row of six, not stretched over
    the row (Gradio's galleries fit their columns to fewer images unless told not to)."""
    page.get_by_text("History: every image of this workspace").click()
    thumb = page.locator("#history img").first
    thumb.wait_for(timeout=15_000)
    row = page.locator("#history").bounding_box()["width"]
    assert 0 < thumb.bounding_box()["width"] < row / 4
    page.get_by_text("History: every image of this workspace").click()  # closed again for the next tests


def loaded(page, image) -> str:
    """The image's address once the browser has drawn it (a click before lands on a picture still loading)."""
    image.wait_for(timeout=10_000)
    page.wait_for_function(
        "i => i.complete && i.naturalWidth > 0", arg=image.element_handle(), timeout=10_000
    )
    return image.get_attribute("src")


def test_a_region_is_drawn_by_two_clicks_on_the_canvas(page, shots):
    """Two clicks on the regions' canvas (a quarter in from the top-left, a quarter in from the bottom-right)
    put that box in the table's first blank row, and the canvas redraws."""
    page.get_by_text("Regions: a prompt (and a LoRA) per box of the image").click()
    canvas = page.locator("#generate-canvas img")
    before = loaded(page, canvas)
    box = canvas.bounding_box()
    canvas.click(position={"x": box["width"] / 4, "y": box["height"] / 4})  # scrolled into view first
    expect(canvas).not_to_have_attribute("src", before, timeout=10_000)  # the first corner marked
    marked = loaded(page, canvas)
    canvas.click(position={"x": box["width"] * 3 / 4, "y": box["height"] * 3 / 4})
    expect(canvas).not_to_have_attribute("src", marked, timeout=10_000)
    table = page.locator("#generate-regions")
    for corner in ("0.25", "0.75"):
        expect(table).to_contain_text(corner, timeout=10_000)
    expect(table).to_contain_text("0.5")  # the second blank row kept
    page.screenshot(path=str(shots / "region-drawn.png"), full_page=True)
    page.get_by_text("Regions: a prompt (and a LoRA) per box of the image").click()  # closed again


def test_a_bad_value_shows_an_error_and_the_page_still_works(page):
    page.get_by_role("tab", name="Dataset").click()
    page.get_by_label("Dataset name").fill("../outside")
    page.get_by_text("Or start from the demo world").click()
    page.get_by_role("button", name="Write demo set").click()
    page.get_by_text("use 1-64 letters").first.wait_for(timeout=60_000)  # the error, shown on the page
    page.get_by_role("tab", name="Generate").click()
    first = page.locator("#generate-info").inner_text()
    assert generate_and_wait(page) != first


def count(text: str) -> int:
    found = re.search(r"loss over (\d+) steps", text)
    return int(found.group(1)) if found else 0


def test_training_is_watched_live_and_its_lora_reaches_generate(page, studio_app, shots):
    services = studio_app[0]
    page.get_by_role("tab", name="Dataset").click()
    page.get_by_label("Dataset name").fill("live")
    page.get_by_role("button", name="Write demo set").click()
    expect(page.locator("#dataset-status")).to_contain_text("wrote", timeout=60_000)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-dataset input").click()
    page.get_by_role("option", name="live", exact=True).click()
    page.get_by_label("LoRA name").fill("live")
    page.get_by_role("spinbutton", name="Steps", exact=True).fill("40")
    page.get_by_role("spinbutton", name="Batch size").fill("2")
    page.get_by_label("Sample every N steps (0 = off)").fill("10")
    page.get_by_role("button", name="Queue training").click()
    expect(page.locator("#job-title")).to_contain_text("live", timeout=30_000)  # the Jobs tab opened on it
    points, galleries, bars = [], [], []
    deadline = time.time() + 300
    while time.time() < deadline:
        bar = page.locator("#job-progress").inner_text()
        points.append(count(page.locator("#job-loss-points").inner_text()))
        galleries.append(page.locator("#job-samples img").count())
        bars.append(bar)
        if bar.startswith(("done", "failed")):
            break
        time.sleep(1.0)
    assert bars[-1].startswith("done"), bars[-1]
    page.screenshot(path=str(shots / "training-view.png"), full_page=True)
    running = [(p, g) for p, g, b in zip(points, galleries, bars) if b.startswith("running")]
    assert len({p for p, _ in running if p}) >= 3, points  # the curve gained points while the job ran
    assert len({g for _, g in running}) >= 2, galleries  # and the gallery gained samples
    assert "it/s" in bars[-2] or "it/s" in bars[-1]
    # the new LoRA in Generate without pressing anything
    page.get_by_role("tab", name="Generate").click()
    page.get_by_label("LoRAs").click()
    expect(page.get_by_role("option", name="runs/live/live.safetensors")).to_be_visible(timeout=15_000)
    page.keyboard.press("Escape")
    assert (services.workspace.runs / "live" / "live.safetensors").is_file()


def test_every_tab_screenshot(page, shots):
    for tab in TABS:
        page.get_by_role("tab", name=tab).click()
        time.sleep(1.0)
        page.screenshot(path=str(shots / f"tab-{tab.lower()}.png"), full_page=True)
    print(f"screenshots in {shots}")
    assert len(list(shots.glob("tab-*.png"))) == len(TABS)
