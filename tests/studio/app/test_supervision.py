"""kill -9 of the studio while a worker trains: the next studio follows the worker it finds alive, starts
nothing else meanwhile, and can still cancel it; a worker gone without a word fails its job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from studio.app.jobs import JobStore
from studio.app.runner import JobRunner
from tests.studio.app.test_jobs import train_config, wait

ROOT = Path(__file__).resolve().parents[3]
STUDIO = """
import sys, time
from studio.app.services import build_services
services = build_services(sys.argv[1])
print("up", flush=True)
time.sleep(900)
"""


def started_training(store: JobStore, job_id: int) -> bool:
    return any(e["event"] == "step" for e in store.events(job_id))


def test_a_killed_studio_leaves_a_worker_the_next_studio_follows(tmp_path):
    ws = tmp_path / "ws"
    store = JobStore(ws / "jobs.sqlite")
    long_job = store.submit("train", train_config(tmp_path, "long", 100_000))
    studio = subprocess.Popen(
        [sys.executable, "-c", STUDIO, str(ws)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    runner = None
    try:
        assert studio.stdout.readline().strip() == "up"
        wait(store, long_job, timeout=180, until=lambda job: started_training(store, job.id))
        worker_pid = store.get(long_job).pid
        os.kill(studio.pid, signal.SIGKILL)
        studio.wait()
        assert psutil.pid_exists(worker_pid), "the worker keeps training without its studio"
        short_job = store.submit("train", train_config(tmp_path, "short", 2))

        runner = JobRunner(store, ws / "runs", poll_s=0.2).start()  # the studio comes back
        assert store.get(long_job).status == "running"
        assert any("following worker" in e.get("message", "") for e in store.events(long_job))
        steps = sum(e["event"] == "step" for e in store.events(long_job))
        wait(
            store,
            long_job,
            timeout=120,
            until=lambda job: sum(e["event"] == "step" for e in store.events(job.id)) > steps,
        )
        time.sleep(1)  # the runner's poll
        assert store.get(short_job).status == "queued", "never two jobs at once"

        store.request_cancel(long_job)
        assert wait(store, long_job, timeout=60).status == "cancelled"
        assert (
            not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
        )
        assert wait(store, short_job, timeout=180).status == "done"
    finally:
        if runner is not None:
            runner.stop()
        if studio.poll() is None:
            studio.kill()
        for job in store.running():
            if job.pid and psutil.pid_exists(job.pid):
                os.kill(job.pid, signal.SIGKILL)


def test_a_worker_gone_without_a_result_fails_its_job(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.submit("train", {})
    store.claim_next()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    store.set_worker(job, sleeper.pid, psutil.Process(sleeper.pid).create_time())
    runner = JobRunner(store, tmp_path / "logs", poll_s=0.2).start()  # finds it alive and follows it
    try:
        assert store.get(job).status == "running"
        ended = wait(store, job, timeout=30)
        assert ended.status == "failed" and "ended without a result" in ended.message
    finally:
        runner.stop()
        sleeper.wait()
