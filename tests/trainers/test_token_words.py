"""Trigger words learnt as token embeddings with the LoRA: only their vectors move, they are saved as A1111's
bundled embeddings, a resumed run learns the same, and generation uses them with the LoRA."""

from __future__ import annotations

import pytest
import torch

from studio.core.errors import ConfigError
from studio.core.lora_files import read_lora
from studio.core.options import build_config
from tests.fixtures.tiny import tiny_sd15_pipeline
from tests.trainers.conftest import TINY
from trainers.config import TrainConfig
from trainers.loop import train

RUN = {**TINY, "method": "dreambooth", "prompt": "a photo of sks dog", "use_captions": False, "rank": 4,
       "max_steps": 4, "checkpoint_every": 2, "checkpoints_keep": 0, "learning_rate": 1e-3,
       "token_words": ["sks"], "token_lr": 1e-2, "save_dtype": "fp32"}  # fmt: skip


def _train(tmp_path, images, name, pipe=None, **extra):
    cfg = build_config(
        TrainConfig, {**RUN, "data_dir": str(images), "output_dir": str(tmp_path / name), **extra}
    )
    return train(cfg, pipe=pipe or tiny_sd15_pipeline(seed=0), family="sd15")


def test_only_the_words_vectors_learn_and_are_bundled(tmp_path, images):
    pipe = tiny_sd15_pipeline(seed=0)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    old = pipe.tokenizer("sks", add_special_tokens=False).input_ids
    result = _train(tmp_path, images, "run", pipe=pipe)

    vectors = read_lora(result.path).embeddings["sks"]["clip_l"]
    assert vectors.shape == (1, table.shape[1])
    start = table[old].mean(0)
    assert 0 < float((vectors[0] - start).abs().max()) < 1  # it learnt, from the word's old reading
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    torch.testing.assert_close(after[: table.shape[0]], table, rtol=0, atol=0)  # the table itself is frozen


def test_resume_learns_the_same_vectors(tmp_path, images):
    full = _train(tmp_path, images, "full")

    def stop(event):
        if event["event"] == "checkpoint" and event["step"] == 2:
            raise KeyboardInterrupt

    cfg = build_config(TrainConfig, {**RUN, "data_dir": str(images), "output_dir": str(tmp_path / "cut")})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, pipe=tiny_sd15_pipeline(seed=0), family="sd15", on_event=stop)
    resumed = _train(tmp_path, images, "cut", resume="latest")
    a, b = read_lora(full.path).embeddings, read_lora(resumed.path).embeddings
    assert torch.equal(a["sks"]["clip_l"], b["sks"]["clip_l"])


def test_a_word_the_tokenizer_has_is_refused(tmp_path, images):
    with pytest.raises(ConfigError, match="already a token"):
        _train(tmp_path, images, "run", token_words=["dog"], max_steps=1, checkpoint_every=0)


def test_a_word_no_caption_says_is_refused(tmp_path, images):
    """Its vectors would never train: "sks" inside "asks" is not the word."""
    with pytest.raises(ConfigError, match="'sks' is in none of the captions"):
        _train(tmp_path, images, "run", prompt="a dog asks", max_steps=1, checkpoint_every=0)
