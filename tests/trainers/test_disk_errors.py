"""Training on a bad disk: a read-only folder, a full disk, what a killed run left, two runs in one folder."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from studio.app.cli import main
from studio.core.errors import StudioError
from tests.trainers.conftest import TINY, make_images

ROOT = Path(__file__).resolve().parents[2]


def test_read_only_output_folder_is_a_clear_error(tmp_path, sd15_dir, capsys):
    data = make_images(tmp_path / "data", 2, {0: "a", 1: "b"})
    code = main(["train", "--preset", "style_sd15", "--model", str(sd15_dir), "--data-dir", str(data),
                 "--output-dir", "/proc/lora-studio-test", *[f"--set={k}={v}" for k, v in TINY.items()]])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "output_dir /proc/lora-studio-test: cannot write there" in err


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from studio.app.cli import main
sys.exit(main({argv!r}))
"""


def test_a_full_disk_keeps_the_last_good_checkpoint_and_leaves_no_partial_files(tmp_path, sd15_dir):
    data = make_images(tmp_path / "data", 2, {0: "a", 1: "b"})
    out = tmp_path / "out"
    argv = ["train", "--preset", "style_sd15", "--model", str(sd15_dir), "--data-dir", str(data), "--output-dir",
            str(out), "--checkpoint-every", "1", "--lr-warmup-steps", "0", *[f"--set={k}={v}" for k, v in TINY.items()]]  # fmt: skip
    assert main([*argv, "--max-steps", "2"]) == 0
    before = digests(out / "checkpoints")
    biggest = max((out / "checkpoints").rglob("*.*"), key=lambda p: p.stat().st_size).stat().st_size
    (out / "lora.safetensors").unlink()
    script = FULL_DISK.format(limit=biggest // 2, argv=[*argv, "--max-steps", "4", "--resume", "latest"])
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "could not save the checkpoint of step 3" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert digests(out / "checkpoints") == before  # steps 1 and 2 as they were; step 3 left nothing behind
    assert not list(out.rglob("*.tmp")) and not (out / "lora.safetensors").exists()


def test_stale_temporary_files_of_a_killed_run_are_removed(tmp_path, fresh_sd15_pipe):
    from studio.core.options import build_config
    from trainers.config import TrainConfig
    from trainers.loop import train

    out = tmp_path / "out"
    (out / "checkpoints" / ".step-000007.tmp").mkdir(parents=True)
    (out / "checkpoints" / ".step-000007.tmp" / "optimizer.bin").write_bytes(b"half")
    (out / ".lora.safetensors.x1y2.tmp").write_bytes(b"half a lora")
    data = make_images(tmp_path / "data", 2, {0: "a", 1: "b"})
    train(build_config(TrainConfig, {**TINY, "data_dir": str(data), "prompt": "x", "max_steps": 1, "output_dir": str(out)}),
          pipe=fresh_sd15_pipe, family="sd15")  # fmt: skip
    assert not list(out.rglob("*.tmp")) and (out / "lora.safetensors").is_file()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from trainers.output_dir import claim_output_dir
lock = claim_output_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_one_training_run_per_output_folder(tmp_path):
    from trainers.output_dir import claim_output_dir

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StudioError, match="another training run is writing there"):
            claim_output_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    claim_output_dir(tmp_path).release()  # the lock went with its process, however it ended
