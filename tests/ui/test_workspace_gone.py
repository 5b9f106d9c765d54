"""A workspace deleted under a running studio: every action says so in one line and what to do, the page shows
it once in a banner (its timers stay quiet, no toast every tick), nothing remakes a half-empty workspace, and a
restarted studio starts a new one."""

from __future__ import annotations

import shutil
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.ui.conftest import serve
from tests.ui.test_page import CHROMIUM, FLAGS

GONE = "is gone (deleted or moved while the studio ran)"


def test_actions_say_the_workspace_is_gone_and_remake_nothing(tmp_path):
    root = tmp_path / "work"
    with serve(root) as (services, url):
        client = Client(url, verbose=False)
        client.predict(name="shapes", which="subject: a red heart (sks)", count=4, api_name="/add_demo_set")
        shutil.rmtree(root)
        for endpoint, fields in (("/generate", {"prompt": "a red circle", "steps": 2}), ("/jobs", {}),
                                 ("/train", {"dataset": "shapes", "name": "x"})):  # fmt: skip
            with pytest.raises(AppError, match="restart the studio") as caught:
                client.predict(**fields, api_name=endpoint)
            assert GONE in str(caught.value) and str(root) in str(caught.value), endpoint
        assert not root.exists()  # no output, dataset or empty job queue was written in its place
    with serve(root) as (services, url):  # a restart makes a new, empty workspace that works
        assert Client(url, verbose=False).predict(api_name="/jobs") is not None
        assert services.workspace.gone() is None and services.jobs.jobs() == []


def test_a_deleted_job_queue_is_named(tmp_path):
    with serve(tmp_path / "work") as (services, url):
        services.workspace.jobs_db.unlink()
        with pytest.raises(AppError, match=r"job queue \(jobs.sqlite\) at .* is gone"):
            Client(url, verbose=False).predict(api_name="/jobs")
        assert not services.workspace.jobs_db.exists()


@pytest.mark.skipif(not CHROMIUM, reason="needs chromium (apt-get install chromium)")
def test_the_page_shows_one_banner_not_a_toast_per_tick(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    root = tmp_path / "work"
    with serve(root) as (_, url), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="load")
        page.get_by_role("tab", name="Jobs").click()  # its timers poll the queue every 1.5 s
        banner = page.locator("#workspace-gone")
        assert not banner.is_visible()
        shutil.rmtree(root)
        sync_api.expect(banner).to_contain_text(GONE, timeout=15_000)
        time.sleep(5)  # several ticks of every timer
        assert page.locator(".toast-body").count() == 0
        page.get_by_role("tab", name="Generate").click()
        page.get_by_role("button", name="Generate", exact=True).click()
        sync_api.expect(page.locator(".toast-body").first).to_contain_text(
            "restart the studio", timeout=15_000
        )
        assert page.locator(".toast-body").count() == 1 and not root.exists()
        browser.close()
