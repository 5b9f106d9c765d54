"""The page in a real headless browser (Debian's chromium driven by Playwright): it loads with the demo model
chosen, and a click on Generate shows an image. Skipped where no chromium is installed (CI installs it)."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="needs chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

# no sandbox as root in containers; no background traffic: the machine has no network
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def page(studio_app):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page()
        page.goto(studio_app[1], wait_until="networkidle")
        yield page
        browser.close()


def test_page_opens_on_generate_with_the_demo_model(page):
    assert page.title() == "LoRA Studio"
    for tab in ("Generate", "Dataset", "Train", "Merge", "Jobs"):
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
    image = page.locator("img[src*='image']").first
    image.wait_for(timeout=10_000)
    assert image.evaluate("img => img.naturalWidth") == 64
    assert any(studio_app[0].workspace.outputs.glob("*.png"))


def test_a_bad_value_shows_an_error_and_the_page_still_works(page):
    page.get_by_role("tab", name="Dataset").click()
    page.get_by_label("Dataset name").fill("../outside")
    page.get_by_text("Or start from the demo world").click()
    page.get_by_role("button", name="Write demo set").click()
    page.get_by_text("use 1-64 letters").first.wait_for(timeout=20_000)  # the error, shown on the page
    page.get_by_role("tab", name="Generate").click()
    first = page.locator("#generate-info").inner_text()
    assert generate_and_wait(page) != first
