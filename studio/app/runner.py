"""The job runner: queued jobs one at a time, each in its own worker process, supervised from a thread.

A job that raises, runs out of memory or crashes its interpreter ends as "failed" with its message; the page
keeps running. Cancelling stops the worker. Each worker's pid and start time are kept in the queue, and the
worker runs in its own session (Ctrl-C in the studio's terminal does not reach it), so:
- a studio that is stopped (Ctrl-C, or closing the page's services) stops its worker and marks the job
  "interrupted" (a training run resumes from its last checkpoint with resume = "latest");
- a studio that was killed outright leaves its worker training; the next studio finds it alive (same pid,
  same start time) and follows it instead of calling it interrupted, and starts nothing else until it ends;
- a worker that is gone without having recorded its ending makes its job "failed".

    >>> runner = JobRunner(store, logs=Path("work/runs")).start()   # doctest: +SKIP
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil

from studio.app.jobs import Job, JobStore
from studio.core.errors import ConfigError

INTERRUPTED = (
    "the studio stopped while this job ran; training resumes from its last checkpoint "
    "when submitted again with resume = latest"
)


class Worker:
    """A worker process: a child this studio started (exit code known) or one it found alive (adopted)."""

    def __init__(self, pid: int, popen: subprocess.Popen | None = None):
        self.pid, self.popen = pid, popen
        self.process = psutil.Process(pid)

    @classmethod
    def find(cls, pid: int | None, started: float | None) -> Worker | None:
        """The process `pid` if it is still the one that started at `started` (pids are reused)."""
        if pid is None or started is None:
            return None
        try:
            worker = cls(pid)
            same = abs(worker.process.create_time() - started) < 1.0
            return worker if same and worker.alive() else None
        except psutil.Error:
            return None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen is not None else None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`."""
        try:
            self.process.terminate()
            self.process.wait(grace_s)
        except psutil.TimeoutExpired:
            self.process.kill()
            self.process.wait(grace_s)
        except psutil.Error:
            pass
        if self.popen is not None:
            self.popen.wait()


class JobRunner:
    """Runs queued jobs one at a time, each in a fresh worker process, from a background thread."""

    def __init__(self, store: JobStore, logs: Path, poll_s: float = 0.5, env: dict[str, str] | None = None):
        self.store = store
        self.logs = Path(logs)
        self.poll_s = poll_s
        self.env = env
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: Worker | None = None
        self._adopted: list[tuple[int, Worker]] = []

    def start(self) -> JobRunner:
        """Follow jobs whose workers outlived an earlier studio; mark the others interrupted; start the thread."""
        for job in self.store.running():
            worker = Worker.find(job.pid, job.pid_started)
            if worker is not None:
                self._adopted.append((job.id, worker))
                self.store.add_event(
                    job.id, {"event": "log", "message": f"the studio restarted; following worker {job.pid}"}
                )
            else:
                self.store.finish(job.id, "interrupted", INTERRUPTED)
        self._thread = threading.Thread(target=self._loop, name="lora-studio-jobs", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs; a running job's worker is stopped and the job marked interrupted."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    @property
    def worker_pid(self) -> int | None:
        """The process id of the running job's worker, if one is running."""
        worker = self._worker
        return worker.pid if worker is not None and worker.alive() else None

    def log_path(self, job_id: int) -> Path:
        return self.logs / f"job-{job_id}.log"

    def _loop(self) -> None:
        last = ""
        while not self._stop.is_set():
            try:
                if self._adopted:
                    self._follow(*self._adopted.pop(0))
                    continue
                job = self.store.claim_next()
                if job is None:
                    self._stop.wait(self.poll_s)
                    continue
                self._run(job)
            except Exception as exc:  # the runner outlives any one job's trouble, including a locked database
                if str(exc) != last:  # a lasting trouble (a deleted queue) is logged once, not every poll
                    traceback.print_exc()
                    last = str(exc)
                self._stop.wait(self.poll_s)

    def _run(self, job: Job) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "studio.app.worker",
            "--db",
            str(self.store.path),
            "run",
            str(job.id),
        ]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("HF_HUB_OFFLINE", "1")
        # A worker trains while the page's process may generate: with OpenMP's default busy-waiting, threads
        # of two processes sharing the cores wait for each other at every barrier (measured on 2 cores: a
        # demo training step 5.5 s instead of 0.35 s). Passive waiting sleeps instead.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with open(self.log_path(job.id), "ab") as log:
            popen = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        worker = Worker(popen.pid, popen)
        self.store.set_worker(job.id, popen.pid, worker.process.create_time())
        self._follow(job.id, worker)

    def _follow(self, job_id: int, worker: Worker) -> None:
        """Watch one worker until it ends (or stop / cancel it), then record an ending it could not."""
        self._worker = worker
        try:
            while worker.alive():
                if self._stop.is_set():
                    worker.stop()
                    self.store.finish(job_id, "interrupted", INTERRUPTED)
                    return
                if self.store.get(job_id).cancel:
                    worker.stop()
                    self.store.finish(job_id, "cancelled", "cancelled while running")
                    return
                time.sleep(self.poll_s)
        except ConfigError:  # the queue is gone (its workspace deleted): no job runs where no one can see it
            worker.stop()
            raise
        finally:
            self._worker = None
        if self.store.get(job_id).status == "running":  # the worker died before it could record why
            tail = _tail(self.log_path(job_id))
            code = worker.returncode
            how = (
                f"exited with code {code}"
                if code is not None
                else f"(pid {worker.pid}) ended without a result"
            )
            self.store.finish(job_id, "failed", f"the worker process {how}. {tail}".strip())


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])
