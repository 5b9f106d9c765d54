"""Training on several processes through accelerate, as on several GPUs or machines: here two CPU processes
(`accelerate launch --multi_gpu --num_processes 2` with no GPU visible: gloo over the CPU; accelerate's
own `--cpu` flag starts a single process). Both take part, the events say so, only the main one writes; the
learnt trigger word's vectors, outside the models DDP syncs, stay the same on both (checked before saving)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from safetensors import safe_open

from tests.trainers.conftest import make_images


def test_two_processes_train_one_lora(tmp_path, sd15_dir):
    data = make_images(tmp_path / "images", 4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "studio.app.cli", "train", "--method", "style", "--model", str(sd15_dir),
               "--data-dir", str(data), "--prompt", "sks style", "--output-dir", str(out), "--max-steps", "3",
               "--batch-size", "1", "--rank", "2", "--resolution", "64", "--set", "min_bucket_reso=64",
               "--set", "bucket_step=64", "--set", "progress_bar=false", "--token-words", "sks"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 2 and start["effective_batch"] == 2
    finished = [e for e in events if e["event"] == "done"]
    assert len(finished) == 1 and finished[0]["steps_per_process"] == [3, 3]  # both trained every step
    assert len([e for e in events if e["event"] == "step"]) == 3  # one writer: no step twice
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "3" and len(list(f.keys())) > 0
        assert "bundle_emb.sks.string_to_param.*" in f.keys()
