"""The real app on a free localhost port over a temporary workspace, shared by the UI tests of a module."""

from __future__ import annotations

import contextlib
import time

import pytest

from studio.app.services import build_services
from ui.app import build_app, serving_options


@contextlib.contextmanager
def serve(root):
    """(services, url): the page over the workspace at `root`, served on 127.0.0.1 with its job runner."""
    services = build_services(root)
    app = build_app(services)
    app.queue().launch(
        prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **serving_options(services)
    )
    try:
        yield services, app.local_url
    finally:
        app.close()
        services.close()


@pytest.fixture(scope="module")
def studio_app(tmp_path_factory):
    """(services, url) over a temporary workspace, closed after the module."""
    with serve(tmp_path_factory.mktemp("workspace")) as served:
        yield served


@pytest.fixture(scope="module")
def client(studio_app):
    from gradio_client import Client

    return Client(studio_app[1], verbose=False)


@pytest.fixture
def wait_for_job():
    """wait_for_job(services, job_id) -> the job once it has ended; fails the test on timeout."""
    return _wait_for_job


def _wait_for_job(services, job_id: int, timeout: float = 180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = services.jobs.get(job_id)
        if job.finished_or_stopped:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {services.jobs.get(job_id).status} after {timeout} s")
