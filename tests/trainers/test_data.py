"""Dataset scan errors, captions, buckets and the resumable batch order."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from studio.core.errors import BadFileError, ConfigError
from studio.core.options import build_config
from tests.trainers.conftest import TINY, make_images
from trainers.config import TrainConfig
from trainers.data import (
    BatchPlan,
    assign_buckets,
    fit_to_bucket,
    make_buckets,
    process_caption,
    scan_dataset,
)
from trainers.loop import train


def test_scan_reads_captions_and_falls_back_to_prompt(images):
    ds = scan_dataset(images, prompt="sks style", use_captions=True)
    assert [ex.caption for ex in ds.examples] == ["sks, dog, grass", "sks, dog, sofa", "sks style"]
    assert [p.name for p in ds.missing_captions] == ["img_2.png"]


def test_scan_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        scan_dataset(tmp_path / "nope", prompt="x", use_captions=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("hi")
    with pytest.raises(ConfigError, match="has no images.*\\.md"):
        scan_dataset(tmp_path / "empty", prompt="x", use_captions=True)
    folder = make_images(tmp_path / "nocap", 1)
    with pytest.raises(ConfigError, match="img_0.png has no caption file"):
        scan_dataset(folder, prompt="", use_captions=True)


def test_unreadable_images_are_all_found_at_once(tmp_path):
    folder = make_images(tmp_path / "imgs", 3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    data = (folder / "img_1.png").read_bytes()
    (folder / "img_1.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    dataset = scan_dataset(folder, prompt="x", use_captions=False)
    assert sorted(p.name for p, _ in dataset.skipped) == ["broken.png", "img_1.png"]
    assert sorted(ex.path.name for ex in dataset.examples) == ["img_0.png", "img_2.png"]
    with pytest.raises(BadFileError, match="2 of 4 images .* broken.png .*img_1.png .*strict_images"):
        scan_dataset(folder, prompt="x", use_captions=False, strict=True)
    for image in folder.glob("img_*.png"):
        image.write_bytes(b"nope")
    with pytest.raises(BadFileError, match="none of the 4 images"):
        scan_dataset(folder, prompt="x", use_captions=False)


def test_training_leaves_out_unreadable_images_and_says_so(tmp_path, fresh_sd15_pipe):
    folder = make_images(tmp_path / "imgs", 2)
    data = (folder / "img_1.png").read_bytes()
    (folder / "img_1.png").write_bytes(data[: len(data) // 2])
    options = {
        **TINY,
        "data_dir": str(folder),
        "prompt": "x",
        "max_steps": 1,
        "output_dir": str(tmp_path / "out"),
    }
    events = []
    result = train(
        build_config(TrainConfig, options), pipe=fresh_sd15_pipe, family="sd15", on_event=events.append
    )
    assert result.path.is_file()
    assert any(e["event"] == "log" and "img_1.png" in e["message"] for e in events)
    strict = build_config(TrainConfig, {**options, "strict_images": True, "output_dir": str(tmp_path / "o2")})
    with pytest.raises(BadFileError, match="img_1.png"):
        train(strict, pipe=fresh_sd15_pipe, family="sd15")


def test_buckets_follow_aspect_ratio(tmp_path):
    buckets = make_buckets(512, step=64, min_reso=256, max_reso=1024)
    assert (512, 512) in buckets and all(
        w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets
    )
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (900, 400)).save(folder / "wide.png")
    Image.new("RGB", (300, 600)).save(folder / "tall.png")
    ds = scan_dataset(folder, prompt="x", use_captions=False)
    assign_buckets(ds, buckets)
    tall, wide = (ex.bucket for ex in ds.examples)
    assert wide[0] > wide[1] and tall[1] > tall[0]
    pixels, (top, left) = fit_to_bucket(Image.new("RGB", (900, 400)), wide, "center")
    assert pixels.shape == (3, wide[1], wide[0]) and float(pixels.min()) >= -1 and top == 0


def test_extra_resolutions_train_each_image_at_each_size(tmp_path, fresh_sd15_pipe):
    """Multi-resolution training: every image is in a bucket of each resolution, counted once as an image."""
    import json

    from safetensors import safe_open

    from studio.app.library import training_settings

    folder = make_images(tmp_path / "imgs", 2, {0: "sks, dog", 1: "sks, cat"})
    options = {**TINY, "data_dir": str(folder), "max_steps": 2, "output_dir": str(tmp_path / "out"),
               "extra_resolutions": [128], "batch_size": 2, "max_bucket_reso": 64}  # fmt: skip
    result = train(build_config(TrainConfig, options), pipe=fresh_sd15_pipe, family="sd15")
    with safe_open(result.path, "pt") as f:
        meta = f.metadata()
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert {k: v["count"] for k, v in buckets.items()} == {"64x64": 2, "128x128": 2}
    assert meta["ss_num_train_images"] == "2"
    assert json.loads(meta["ss_tag_frequency"])["1_imgs"] == {"sks": 2, "dog": 1, "cat": 1}
    assert json.loads(meta["studio_train_config"])["extra_resolutions"] == [128]
    settings = training_settings(meta)  # what the Library shows
    assert settings["resolution"] == 64 and settings["extra_resolutions"] == [128]
    with pytest.raises(ConfigError, match="extra_resolutions must be at least 64"):
        build_config(TrainConfig, {**options, "extra_resolutions": [128, 32]})


def test_caption_shuffle_keeps_first_tokens_and_dropout():
    rng = random.Random(0)
    outs = {process_caption("sks, a, b, c, d", rng, dropout=0, shuffle=True, keep_tokens=1, separator=",")
            for _ in range(20)}  # fmt: skip
    assert len(outs) > 1 and all(o.startswith("sks, ") for o in outs)
    dropped = [process_caption("sks", rng, dropout=0.5, shuffle=False, keep_tokens=0, separator=",")
               for _ in range(200)]  # fmt: skip
    assert 50 < dropped.count("") < 150


def test_batch_plan_is_a_pure_function_of_the_index():
    buckets = [(64, 64)] * 5 + [(64, 128)] * 3
    a = BatchPlan(buckets, batch_size=2, repeats=2, seed=3)
    b = BatchPlan(buckets, batch_size=2, repeats=2, seed=3)
    assert a.batches_per_epoch == 5 + 3
    epoch = [a.batch(i) for i in range(a.batches_per_epoch)]
    assert sorted(i for batch in epoch for i in batch) == sorted(list(range(8)) * 2)
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch)
    assert [b.batch(i) for i in reversed(range(20))] == [a.batch(i) for i in reversed(range(20))]
    assert [a.batch(i) for i in range(8)] != [a.batch(i) for i in range(8, 16)]
