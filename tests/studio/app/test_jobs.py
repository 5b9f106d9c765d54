"""The job queue on a real SQLite file with real worker processes: order, events, endings, crashes."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from studio.app.jobs import JobStore
from studio.app.runner import JobRunner
from studio.app.workspace import Workspace
from studio.core.errors import ConfigError
from studio.demo.world import WORLD


def wait(store, job_id, timeout=120.0, until=lambda job: job.finished_or_stopped):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = store.get(job_id)
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: still {store.get(job_id).status}")


def demo_dataset(folder):
    folder.mkdir(parents=True)
    for i, sample in enumerate(WORLD.dreambooth_set(n=2)):
        sample.image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(sample.caption)
    return folder


def train_config(tmp_path, name, steps):
    return {"method": "dreambooth", "data_dir": str(demo_dataset(tmp_path / f"data-{name}")),
            "output_dir": str(tmp_path / name), "output_name": name, "prompt": "a sks shape", "max_steps": steps, "resolution": 64,
            "min_bucket_reso": 64, "max_bucket_reso": 64, "rank": 4, "device": "cpu", "progress_bar": False}  # fmt: skip


@pytest.fixture
def queue(tmp_path):
    """(store, runner): a queue with its runner thread started, stopped after the test."""
    store = JobStore(tmp_path / "jobs.sqlite")
    runner = JobRunner(store, tmp_path / "logs").start()
    yield store, runner
    runner.stop()


def test_store_keeps_order_events_and_first_ending(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    first, second = store.submit("train", {"a": 1}, "one"), store.submit("merge", {"b": 2}, "two")
    assert [j.id for j in store.jobs()] == [second, first]  # newest first
    assert store.claim_next().id == first and store.get(first).status == "running"
    store.add_event(first, {"event": "step", "time": 1.0, "step": 1, "loss": 0.5})
    store.add_event(first, {"event": "step", "time": 2.0, "step": 2, "loss": 0.4})
    events = store.events(first)
    assert [e["step"] for e in events] == [1, 2] and store.events(first, after=events[0]["seq"])[0][
        "step"
    ] == 2
    store.finish(first, "done", "ok")
    store.finish(first, "failed", "late")  # a job keeps its first ending
    assert store.get(first).status == "done"
    assert store.request_cancel(second).status == "cancelled"  # queued: cancelled at once
    assert store.claim_next() is None
    with pytest.raises(ConfigError, match="kind"):
        store.submit("paint", {})


def test_jobs_left_running_by_a_stopped_studio_are_marked_interrupted(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.submit("train", {})
    store.claim_next()
    runner = JobRunner(store, tmp_path / "logs").start()
    try:
        assert store.get(job).status == "interrupted" and "resume" in store.get(job).message
    finally:
        runner.stop()


def test_a_crashed_worker_fails_its_job_and_the_queue_goes_on(tmp_path, queue):
    store, runner = queue
    doomed = store.submit("train", train_config(tmp_path, "doomed", 100000))
    after = store.submit("train", train_config(tmp_path, "after", 2))
    wait(store, doomed, until=lambda job: any(e["event"] == "step" for e in store.events(job.id)))
    os.kill(runner.worker_pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    crashed = wait(store, doomed)
    assert crashed.status == "failed" and "exited with code -9" in crashed.message
    finished = wait(store, after)
    assert finished.status == "done", finished.message
    assert (tmp_path / "after" / "after.safetensors").is_file()


def test_a_job_with_bad_options_fails_with_the_reason(queue):
    store, _ = queue
    job = wait(store, store.submit("merge", {"sources": ["missing.safetensors:1"], "out": "x.safetensors"}))
    assert job.status == "failed" and "missing.safetensors" in job.message
    assert store.events(job.id)[-1]["event"] == "error"


def test_workspace_keeps_paths_inside(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    assert ws.resolve("datasets/dog") == ws.root / "datasets" / "dog"
    assert ws.resolve(ws.root / "loras") == ws.root / "loras"
    for bad in ("../x", "/etc/passwd", "datasets/../../x"):
        with pytest.raises(ConfigError, match="outside the workspace"):
            ws.resolve(bad)
    (ws.root / "link").symlink_to("/etc")
    with pytest.raises(ConfigError, match="outside the workspace"):
        ws.resolve("link/passwd")
    with pytest.raises(ConfigError, match="letters"):
        ws.check_name("a/b")


def test_a_deleted_queue_stops_its_worker_and_is_never_remade(tmp_path, queue):
    store, runner = queue
    job = store.submit("train", train_config(tmp_path, "orphan", 100000))
    wait(store, job, until=lambda j: any(e["event"] == "step" for e in store.events(j.id)))
    worker = psutil.Process(runner.worker_pid)
    for path in tmp_path.glob("jobs.sqlite*"):
        path.unlink()
    gone, _ = psutil.wait_procs([worker], timeout=60)  # stopped: no job runs where no page can see it
    assert gone and runner.worker_pid is None
    with pytest.raises(ConfigError, match="job queue .* is gone"):
        store.jobs()
    assert not list(tmp_path.glob("jobs.sqlite*"))
