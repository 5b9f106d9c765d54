"""The page's API, driven with gradio_client against the real app, every endpoint called by parameter name:
generation on the built-in demo model, datasets, training and merging as jobs followed live, the LoRA
library, history and comparison grids, and bad input that must not take the page down."""

from __future__ import annotations

import time

import gradio as gr
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from studio.app.cli import build_parser
from studio.core.lora_files import read_lora
from studio.demo.classifiers import load_judges

SUBJECT = "subject: a red heart (sks)"


def train(client, dataset, name, steps=3, **fields):
    """Queue a training job with the Train form's defaults but these fields; returns the job id."""
    fields = {"dataset": dataset, "name": name, "steps": steps, "batch_size": 2, "sample_every": 0} | fields
    message, job = client.predict(**fields, api_name="/train")
    assert f"queued job {int(job)}" in message
    return int(job)


def demo_set(client, name, count=4):
    return client.predict(name=name, which=SUBJECT, count=count, api_name="/add_demo_set")


def test_ui_binds_to_localhost_by_default():
    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"


def test_every_endpoint_has_named_parameters(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/generate", "/train", "/merge", "/job_view", "/cancel_job", "/jobs", "/library", "/lora_details",
                 "/delete_lora", "/restore_lora", "/trash", "/history", "/reuse", "/compare", "/add_images",
                 "/add_demo_set", "/show_dataset", "/save_captions", "/replace_captions", "/prepend_trigger",
                 "/delete_images", "/train_estimate"):  # fmt: skip
        assert name in api, name
        names = [p["parameter_name"] for p in api[name]["parameters"]]
        assert all(n and not n.startswith("param_") for n in names), (name, names)
        assert all(p["parameter_has_default"] for p in api[name]["parameters"]), name


def test_generate_uses_the_demo_model_by_default(client, studio_app):
    services, _ = studio_app
    images, info = client.predict(prompt="a red circle on a blue background", count=3, api_name="/generate")
    assert len(images) == 3 and "saved in outputs/" in info
    pictures = [Image.open(item["image"]).convert("RGB") for item in images]
    assert all(p.size == (64, 64) for p in pictures)  # the demo model's own size
    verdict = load_judges().judge(pictures)
    # what the prompt says, on most images (the demo model's measured adherence is 0.8-0.9 per attribute)
    assert sum(label == "circle" for label in verdict["shape"].labels) >= 2
    assert sum(label == "blue" for label in verdict["background"].labels) >= 2
    assert len(list(services.workspace.outputs.glob("*.png"))) >= 3


def test_seed_minus_one_is_random_and_shown(client):
    seeds = []
    for _ in range(2):
        _, info = client.predict(prompt="a red circle", steps=2, api_name="/generate")
        seeds.append(int(info.split("seed ")[1].split(" ")[0]))
    assert seeds[0] != seeds[1]
    _, info = client.predict(prompt="a red circle", steps=2, seed=42, api_name="/generate")
    assert "seed 42 " in info


def test_history_reuse_and_compare(client, studio_app):
    services, _ = studio_app
    _, info = client.predict(
        prompt="a green star on a white background", steps=3, seed=7, api_name="/generate"
    )
    made = info.rsplit(": ", 1)[1].strip()
    history = client.predict(api_name="/history")
    assert any(made in str(item["image"]) and "seed 7" in (item["caption"] or "") for item in history)
    fields = client.predict(name=made, api_name="/reuse")
    assert fields[0] == "a green star on a white background" and fields[6] == 3 and fields[8] == 7
    with pytest.raises(Exception, match="at least one LoRA"):
        client.predict(prompt="x", columns="0, 1", seeds="1", api_name="/compare")


def test_regions_are_drawn_recorded_and_reused(client, studio_app):
    """A region typed in the table reaches the generation, its PNG records it, and reuse puts it back."""
    from studio.generation.records import read_record

    services, _ = studio_app
    rows = {"headers": ["x0", "y0", "x1", "y1", "prompt", "LoRA", "weight"],
            "data": [[0, 0, 0.5, 1, "a red circle", "", 1.0], [0.5, 0, 1, 1, "", "", 1.0]]}  # fmt: skip
    _, info = client.predict(prompt="a green square on a white background", steps=2, seed=5, regions=rows,
                             region_base=0.3, region_mode="area", api_name="/generate")  # fmt: skip
    made = info.rsplit(": ", 1)[1].strip()
    record = read_record(services.workspace.outputs / made)
    assert [r["prompt"] for r in record["regions"]] == ["a red circle"] and record["region_base"] == 0.3
    assert record["region_mode"] == "area"
    fields = dict(zip(("prompt", "negative_prompt", "model", "loras", "weights", "mode", "steps", "cfg", "seed",
                       "size", "regions", "region_base", "region_mode"), client.predict(name=made, api_name="/reuse")))  # fmt: skip
    assert fields["region_mode"] == "area"
    assert [row[:5] for row in fields["regions"]["data"]] == [[0, 0, 0.5, 1, "a red circle"]]
    with pytest.raises(Exception, match="region row 1"):
        bad = {**rows, "data": [["left", 0, 0.5, 1, "a red circle", "", 1.0]]}
        client.predict(prompt="x", steps=2, regions=bad, api_name="/generate")


def test_dataset_keeps_good_images_pairs_captions_and_names_the_bad_one(client, studio_app, tmp_path):
    services, _ = studio_app
    good, other = tmp_path / "good.png", tmp_path / "other.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    Image.new("RGB", (96, 64), (30, 200, 30)).save(other)
    (tmp_path / "other.txt").write_text("a sks shape, wide")
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:40])  # a truncated PNG
    files = [handle_file(str(p)) for p in (good, other, tmp_path / "other.txt", bad)]
    status = client.predict(name="uploads", files=files, caption="a sks shape", api_name="/add_images")
    assert "added 2 image" in status and "1 with their own caption" in status and "broken.png" in status
    folder = services.workspace.datasets / "uploads"
    assert (folder / "good.txt").read_text().strip() == "a sks shape"
    assert (folder / "other.txt").read_text().strip() == "a sks shape, wide"
    again = client.predict(
        name="uploads", files=[handle_file(str(good))], caption="x", api_name="/add_images"
    )
    assert "added 0 image" in again and "good.png (= good.png)" in again  # the same pixels, never twice
    thumbs, table = client.predict(name="uploads", resolution=64, api_name="/show_dataset")
    rows = {r[0]: r for r in table["data"]}
    assert rows["other.png"][2] == "96 x 64" and rows["good.png"][3] == "64 x 64"


def test_captions_are_edited_in_the_grid_and_in_bulk(client, studio_app):
    services, _ = studio_app
    folder = services.workspace.datasets / "captions"
    demo_set(client, "captions")
    _, table = client.predict(name="captions", api_name="/show_dataset")
    data = table["data"]
    data[1][1] = "a sks shape, close up"
    table["data"] = data
    assert "saved 1 caption" in client.predict(name="captions", table=table, api_name="/save_captions")
    assert (folder / "demo-001.txt").read_text() == "a sks shape, close up\n"
    assert "changed 4" in client.predict(
        name="captions", find="sks", replace="zwx", api_name="/replace_captions"
    )
    assert "in 4 caption" in client.predict(name="captions", trigger="ohwx", api_name="/prepend_trigger")
    assert (folder / "demo-001.txt").read_text() == "ohwx, a zwx shape, close up\n"
    assert "moved 1 image" in client.predict(
        name="captions", picked="demo-002.png", api_name="/delete_images"
    )
    assert not (folder / "demo-002.png").exists() and not (folder / "demo-002.txt").exists()
    with pytest.raises(Exception, match="no image"):
        client.predict(name="captions", picked="missing.png", api_name="/delete_images")


def test_paths_outside_the_workspace_are_refused(client):
    for bad in ({"model": "../../../etc"}, {"loras": ["../../../etc/passwd"]}, {"loras": ["/etc/passwd"]}):
        with pytest.raises(Exception, match="outside the workspace"):
            client.predict(**bad, api_name="/generate")
    with pytest.raises(Exception, match="dataset"):
        demo_set(client, "../escape")


def test_a_job_is_followed_live_then_found_in_the_library(client, studio_app, wait_for_job):
    """Loss points and sample images arrive while the job runs; the LoRA appears in the library with its
    samples and training settings, can be used, deleted to the trash and restored."""
    services, _ = studio_app
    demo_set(client, "hearts", 8)
    job = train(
        client,
        "hearts",
        "heart",
        steps=30,
        sample_every=10,
        sample_prompts="a sks shape\na sks shape on a green background",
        token_words="sks",
    )
    seen_points, seen_samples = set(), set()
    while not services.jobs.get(job).finished_or_stopped:
        _, bar, _, points, samples, _, _, _ = client.predict(job_id=job, api_name="/job_view")
        seen_points.add(points)
        seen_samples.add(len(samples))
        time.sleep(0.5)
    job_done = wait_for_job(services, job)
    assert job_done.status == "done", job_done.message
    title, bar, plot, points, samples, log, _, _ = client.predict(job_id=job, api_name="/job_view")
    assert "step 30 / 30" in bar and "loss over 30 steps" in points and len(samples) == 6
    assert samples[0]["caption"].startswith("step 30 · a sks shape")
    assert len({p for p in seen_points if "loss over" in p}) >= 3  # the curve grew while the job ran
    assert len(seen_samples) >= 2
    lora = "runs/heart/heart.safetensors"
    rows = client.predict(api_name="/library")["data"]
    assert [r for r in rows if r[1] == lora]
    about, samples, download = client.predict(path=lora, api_name="/lora_details")
    assert "Stable Diffusion 1.5" in about and '"max_steps": 30' in about and len(samples) == 6
    assert "**Learnt words:** `sks` (1 vector)" in about
    assert download.endswith("heart.safetensors")
    images, _ = client.predict(
        prompt="a sks shape on a blue background", loras=[lora], weights="0.8", api_name="/generate"
    )
    assert len(images) == 1
    assert "trash" in client.predict(path=lora, api_name="/delete_lora")
    assert not (services.workspace.root / lora).exists()
    item = client.predict(api_name="/trash")["data"][0][0]
    assert lora in client.predict(item=item, api_name="/restore_lora")
    assert (services.workspace.root / lora).is_file()
    assert "Time estimate: about" in client.predict(dataset="hearts", steps=300, api_name="/train_estimate")


def test_style_job_with_a_regularisation_dataset(client, studio_app, wait_for_job):
    services, _ = studio_app
    client.predict(name="framed", which="style: framed", count=4, api_name="/add_demo_set")
    client.predict(name="scenes", which="world scenes (regularisation)", count=4, api_name="/add_demo_set")
    job = train(client, "framed", "framed-reg", method="style", reg_dataset="scenes", prompt="framed style")
    done = wait_for_job(services, job)
    assert done.status == "done", done.message
    meta = read_lora(services.workspace.root / "runs/framed-reg/framed-reg.safetensors").metadata
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("4", "4")
    with pytest.raises(AppError, match="regularisation dataset is for the style method"):
        client.predict(
            dataset="framed", name="db", method="dreambooth", reg_dataset="scenes", api_name="/train"
        )


def test_merge_job_shows_its_report(client, studio_app, wait_for_job):
    services, _ = studio_app
    demo_set(client, "hearts4")
    for name in ("m1", "m2"):
        assert wait_for_job(services, train(client, "hearts4", name, steps=2)).status == "done"
    message, job = client.predict(sources=["runs/m1/m1.safetensors", "runs/m2/m2.safetensors"], weights="1, 0.5",
                                  method="svd", name="both", rank=4, api_name="/merge")  # fmt: skip
    merged = wait_for_job(services, int(job))
    assert merged.status == "done", merged.message
    assert (services.workspace.loras / "both.safetensors").is_file()
    _, bar, _, _, _, _, report, summary = client.predict(job_id=int(job), api_name="/job_view")
    assert "svd" in summary and "rank 4" in summary
    table = report.get("value", report)  # shown (an update that makes it visible) for merge jobs only
    assert [r[0] for r in table["data"]] == ["m1.safetensors", "m2.safetensors"]
    assert "warning" not in summary
    # a merge's warnings are on the page: ordinary LoRAs merged as orthogonal ones
    _, job = client.predict(sources=["runs/m1/m1.safetensors", "runs/m2/m2.safetensors"], method="orthogonal",
                            name="ortho", api_name="/merge")  # fmt: skip
    assert wait_for_job(services, int(job)).status == "done"
    summary = client.predict(job_id=int(job), api_name="/job_view")[-1]
    assert "- warning: m1.safetensors has no orthogonal-adaptation metadata" in summary, summary
    # gradient fusion records each LoRA on a reference dataset (its captioned images) from the workspace
    pair = ["runs/m1/m1.safetensors", "runs/m2/m2.safetensors"]
    with pytest.raises(AppError, match="no dataset 'nope'"):
        client.predict(sources=pair, method="fusion", name="fused", prompts="a sks shape | a sks shape",
                       references="nope | hearts4", api_name="/merge")  # fmt: skip
    _, job = client.predict(sources=pair, method="fusion", name="fused", prompts="a sks shape | a sks shape",
                            references="hearts4 | ", api_name="/merge")  # fmt: skip
    fused = wait_for_job(services, int(job))
    assert fused.status == "done", fused.message
    assert (services.workspace.loras / "fused.safetensors").is_file()
    bar = client.predict(job_id=int(job), api_name="/job_view")[1]
    assert "done" in bar and "step" not in bar, bar  # no step counter for a merge that takes none


def test_a_failing_job_is_reported_and_the_page_keeps_working(client, studio_app, wait_for_job):
    services, _ = studio_app
    demo_set(client, "hearts2")
    # a base model that is not one: the worker fails, the job says why, the page still generates
    (services.workspace.root / "fake.safetensors").write_bytes(b"not a model")
    job = wait_for_job(services, train(client, "hearts2", "bad", model="fake.safetensors"))
    assert job.status == "failed" and "fake.safetensors" in job.message
    assert "failed" in client.predict(job_id=job.id, api_name="/job_view")[1]
    images, _ = client.predict(prompt="a red circle", steps=2, api_name="/generate")
    assert len(images) == 1


def test_bad_options_and_page_limits_are_refused_before_queueing(client, studio_app):
    services, _ = studio_app
    demo_set(client, "hearts5")
    before = len(services.jobs.jobs())
    with pytest.raises(Exception, match="TOML|unknown option"):
        train(client, "hearts5", "x", more="no_such_option = 3")
    with pytest.raises(Exception, match="no dataset"):
        train(client, "missing", "y")
    # the page's fields and the server both bound them; either message names the limit
    limits = (
        ("steps", 1_000_000_000, "100,?000"),
        ("resolution", 100, "multiple of 64"),
        ("batch_size", 1000, "maximum value 64|to 64"),
        ("rank", 0, "minimum value 1|from 1"),
    )
    for field, value, limit in limits:
        with pytest.raises(Exception, match=limit):
            train(client, "hearts5", "z", **{field: value})
    assert len(services.jobs.jobs()) == before


def test_cancel_stops_a_running_job(client, studio_app, wait_for_job):
    services, _ = studio_app
    demo_set(client, "hearts3")
    running = train(client, "hearts3", "long", steps=100000)
    deadline = time.time() + 120
    while services.jobs.get(running).status != "running" or not services.jobs.events(running):
        assert time.time() < deadline, "the job never started"
        time.sleep(0.3)
    assert "stopping" in client.predict(job_id=running, api_name="/cancel_job")
    assert wait_for_job(services, running, timeout=60).status == "cancelled"


def test_file_route_serves_what_the_page_shows_never_the_queue(client, studio_app):
    import urllib.error
    import urllib.request

    services, url = studio_app
    client.predict(prompt="a red circle", steps=2, api_name="/generate")  # an image in outputs/
    image = sorted(services.workspace.outputs.glob("*.png"))[-1]
    with urllib.request.urlopen(f"{url}gradio_api/file={image}") as reply:
        assert reply.status == 200
    for secret in (services.workspace.jobs_db, services.workspace.root / "jobs.sqlite-wal", "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}gradio_api/file={secret}")
        assert refused.value.code in (403, 404)


def call_raw(url: str, api_name: str, data: list) -> str:
    """POST a call as any HTTP client could (no gradio_client, which uploads local files itself); returns
    the event stream's text."""
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request) as reply:
        event_id = json.loads(reply.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}") as reply:
        return reply.read().decode()


def test_add_images_takes_uploads_only(studio_app):
    services, url = studio_app
    inside = services.workspace.outputs / "server-side.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(inside)
    for path in (str(inside), "/etc/hostname", str(services.workspace.jobs_db)):
        stream = call_raw(
            url, "add_images", ["stolen", [{"path": path, "meta": {"_type": "gradio.FileData"}}], "x"]
        )
        assert "event: error" in stream and "added" not in stream
    assert not (services.workspace.datasets / "stolen").exists()


def test_page_refuses_a_job_pointed_outside_the_workspace(client):
    demo_set(client, "outside")
    with pytest.raises(Exception, match="output_dir: .*outside the workspace"):
        train(client, "outside", "x", more='output_dir = "/tmp/elsewhere"')


def test_the_train_form_follows_the_demo_model_picked():
    from studio.app.form_configs import DEMO_MODELS
    from ui.tabs.train import demo_resolution, sdxl_for_b_lora

    assert DEMO_MODELS == ("demo:sd15", "demo:sdxl", "demo:sd15-128", "demo:sdxl-128")
    assert [demo_resolution(m, 512) for m in DEMO_MODELS] == [64, 64, 128, 128]
    assert demo_resolution("models/mine.safetensors", 512) == 512  # a user's model keeps the field's value
    assert sdxl_for_b_lora("b_lora", "demo:sd15-128") == "demo:sdxl-128"
    assert sdxl_for_b_lora("b_lora", "demo:sd15") == "demo:sdxl"
    assert sdxl_for_b_lora("style", "demo:sd15") == "demo:sd15"
    assert sdxl_for_b_lora("b_lora", "models/mine.safetensors") == "models/mine.safetensors"


def test_a_merge_preset_fills_the_method_density_and_rank():
    from ui.tabs.merge import preset_fields

    assert preset_fields("ties") == ("ties", 0.5, 32)
    method, density, rank = preset_fields("fusion_subjects")
    assert method == "fusion" and density == rank == gr.update()
    assert preset_fields("") == (gr.update(),) * 3
