"""Checkpoints, exact resume after an interruption, and the NaN stop."""

from __future__ import annotations

import pytest
import torch

from studio.core.errors import ConfigError
from studio.core.lora_files import read_lora
from studio.core.options import build_config
from tests.fixtures.tiny import tiny_sd15_pipeline
from tests.trainers.conftest import TINY
from trainers.checkpoint import list_checkpoints
from trainers.config import TrainConfig
from trainers.events import read_events
from trainers.loop import TrainingDiverged, train

# Everything that draws random numbers is on: flips, caption dropout, LoRA dropout, a warmup+cosine schedule,
# gradient accumulation over micro-batches of two images.
RUN = {**TINY, "method": "style", "prompt": "sks", "rank": 4, "max_steps": 4, "checkpoint_every": 2,
       "learning_rate": 1e-2, "lr_scheduler": "cosine", "lr_warmup_steps": 1, "flip_aug": True,
       "caption_dropout_rate": 0.3, "lora_dropout": 0.1, "batch_size": 2, "gradient_accumulation_steps": 2,
       "save_dtype": "fp32", "checkpoints_keep": 0}  # fmt: skip


def _cfg(tmp_path, images, name, **extra):
    return build_config(
        TrainConfig, {**RUN, "data_dir": str(images), "output_dir": str(tmp_path / name), **extra}
    )


def test_resume_continues_at_the_step_and_matches_uninterrupted_run(tmp_path, images):
    full = train(_cfg(tmp_path, images, "full"), pipe=tiny_sd15_pipeline(seed=0), family="sd15")

    def interrupt_after_first_checkpoint(event):
        if event["event"] == "checkpoint" and event["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, images, "cut"), pipe=tiny_sd15_pipeline(seed=0), family="sd15",
              on_event=interrupt_after_first_checkpoint)  # fmt: skip
    assert not (tmp_path / "cut" / "lora.safetensors").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-000002"]
    resumed = train(
        _cfg(tmp_path, images, "cut", resume="latest"), pipe=tiny_sd15_pipeline(seed=0), family="sd15"
    )

    events = read_events(resumed.events_path)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]  # 1-2 before, 3-4 after
    assert [e["resumed_from_step"] for e in events if e["event"] == "start"] == [0, 2]
    a, b = read_lora(full.path), read_lora(resumed.path)
    assert set(a.modules) == set(b.modules)
    for path in a.modules:
        assert torch.equal(a.modules[path].up, b.modules[path].up), path
        assert torch.equal(a.modules[path].down, b.modules[path].down), path
    assert max(float(m.up.abs().max()) for m in a.modules.values()) > 0


def test_resume_refuses_changed_training_options(tmp_path, images):
    def stop(event):
        if event["event"] == "checkpoint":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, images, "run"), pipe=tiny_sd15_pipeline(seed=0), family="sd15", on_event=stop)
    with pytest.raises(ConfigError, match="learning_rate"):
        train(_cfg(tmp_path, images, "run", resume="latest", learning_rate=1e-3), pipe=tiny_sd15_pipeline(0),
              family="sd15")  # fmt: skip


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, images):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(_cfg(tmp_path, images, "none", resume="latest"), pipe=tiny_sd15_pipeline(seed=0), family="sd15")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, images):
    # An absurd learning rate makes the LoRA weights explode after the first update.
    cfg = _cfg(tmp_path, images, "nan", learning_rate=1e30, lr_warmup_steps=0, lr_scheduler="constant",
               checkpoint_every=1, max_grad_norm=0.0, max_steps=6, lora_dropout=0.0)  # fmt: skip
    with pytest.raises(TrainingDiverged, match="the loss became .* at step") as info:
        train(cfg, pipe=tiny_sd15_pipeline(seed=0), family="sd15")
    kept = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert kept and str(kept[-1]) in str(info.value)
    events = read_events(tmp_path / "nan" / "events.jsonl")
    assert events[-1]["event"] == "error" and events[-1]["last_checkpoint"] == str(kept[-1])
    assert not (tmp_path / "nan" / "lora.safetensors").exists()
