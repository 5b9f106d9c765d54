"""The page's API, driven with gradio_client against the real app: generation on the built-in demo model,
datasets, training and merging as jobs, and bad input that must not take the page down."""

from __future__ import annotations

import re
import time

import pytest
from gradio_client import handle_file
from PIL import Image

from studio.app.cli import build_parser
from studio.demo.classifiers import load_judges


def generate(
    client, prompt="a red circle on a blue background", loras=(), weights="", count=1, model="demo:sd15"
):
    # inputs in the Generate form's order: prompt, negative, model, loras, weights, mode, steps, cfg, seed,
    # size, count, B-LoRA content, B-LoRA style (the model is left at its default: the built-in demo model)
    return client.predict(
        prompt,
        "",
        model,
        list(loras),
        weights,
        "merge",
        20,
        7.5,
        0,
        0,
        count,
        None,
        None,
        api_name="/generate",
    )


def train(client, dataset, name, method="dreambooth", steps=3, more=""):
    return client.predict(
        method, "", "demo:sd15", dataset, name, "a sks shape", steps, 4, 1e-3, 2, 64, False, "", more,
        api_name="/train",
    )  # fmt: skip


def job_id(message: str) -> int:
    found = re.search(r"queued job (\d+)", message)
    assert found, message
    return int(found.group(1))


def test_ui_binds_to_localhost_by_default():
    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"


def test_generate_uses_the_demo_model_by_default(client, studio_app):
    services, _ = studio_app
    images, info = generate(client, count=3)
    assert len(images) == 3 and "saved in outputs/" in info
    pictures = [Image.open(item["image"]).convert("RGB") for item in images]
    assert all(p.size == (64, 64) for p in pictures)  # the demo model's own size
    verdict = load_judges().judge(pictures)
    # what the prompt says, on most images (the demo model's measured adherence is 0.8-0.9 per attribute)
    assert sum(label == "circle" for label in verdict["shape"].labels) >= 2
    assert sum(label == "blue" for label in verdict["background"].labels) >= 2
    assert len(list(services.workspace.outputs.glob("*.png"))) >= 3


def test_dataset_keeps_good_images_and_names_the_bad_one(client, studio_app, tmp_path):
    services, _ = studio_app
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:40])  # a truncated PNG
    status = client.predict(
        "uploads", [handle_file(str(good)), handle_file(str(bad))], "a sks shape", api_name="/add_images"
    )
    assert "added 1 image" in status and "broken" in status and "skipped 1" in status
    folder = services.workspace.datasets / "uploads"
    assert (folder / "good.png").is_file() and (folder / "good.txt").read_text().strip() == "a sks shape"
    assert not (folder / "broken.png").exists()


def test_captions_can_be_edited(client, studio_app):
    services, _ = studio_app
    client.predict("captions", "subject: a red heart (sks)", 4, api_name="/add_demo_set")
    items = client.predict("captions", api_name="/show_dataset")
    assert len(items) == 4 and items[0]["caption"].startswith("a sks shape on a")
    assert "saved" in client.predict(
        "captions", "demo-001.png", "a sks shape, close up", api_name="/set_caption"
    )
    assert (
        services.workspace.datasets / "captions" / "demo-001.txt"
    ).read_text() == "a sks shape, close up\n"
    with pytest.raises(Exception, match="no image"):
        client.predict("captions", "missing.png", "x", api_name="/set_caption")
    with pytest.raises(Exception, match="letters"):
        client.predict("captions", "../../x.png", "x", api_name="/set_caption")


def test_paths_outside_the_workspace_are_refused(client):
    for bad in ({"model": "../../../etc"}, {"loras": ["../../../etc/passwd"]}, {"loras": ["/etc/passwd"]}):
        with pytest.raises(Exception, match="outside the workspace"):
            generate(client, **bad)
    with pytest.raises(Exception, match="dataset"):
        client.predict("../escape", "subject: a red heart (sks)", 4, api_name="/add_demo_set")


def test_train_job_then_generate_and_merge_with_its_lora(client, studio_app, wait_for_job):
    services, _ = studio_app
    assert "wrote 4 images" in client.predict(
        "hearts", "subject: a red heart (sks)", 4, api_name="/add_demo_set"
    )
    job = wait_for_job(services, job_id(train(client, "hearts", "heart")))
    assert job.status == "done", job.message
    lora = "runs/heart/heart.safetensors"
    assert (services.workspace.root / lora).is_file()
    assert any(e["event"] == "step" for e in services.jobs.events(job.id))
    rows = client.predict(api_name="/jobs")["data"]
    assert [r[3] for r in rows if r[0] == job.id] == ["done"]
    images, _ = generate(client, "a sks shape on a blue background", loras=[lora], weights="0.8")
    assert len(images) == 1
    # the queue takes a second job after the first: a merge of the LoRA with itself
    second = wait_for_job(services, job_id(train(client, "hearts", "heart2", steps=2)))
    assert second.status == "done", second.message
    merged = wait_for_job(
        services,
        job_id(
            client.predict(
                [lora, "runs/heart2/heart2.safetensors"],
                "1, 0.5",
                "concat",
                "both",
                False,
                0,
                0.5,
                "demo:sd15",
                "",
                api_name="/merge",
            )
        ),  # fmt: skip
    )
    assert merged.status == "done", merged.message
    assert (services.workspace.loras / "both.safetensors").is_file()


def test_a_failing_job_is_reported_and_the_page_keeps_working(client, studio_app, wait_for_job):
    services, _ = studio_app
    client.predict("hearts2", "subject: a red heart (sks)", 4, api_name="/add_demo_set")
    # a base model that is not one: the worker fails, the job says why, the page still generates
    (services.workspace.root / "fake.safetensors").write_bytes(b"not a model")
    message = client.predict(
        "dreambooth", "", "fake.safetensors", "hearts2", "bad", "a sks shape", 3, 4, 1e-3, 2, 64, False, "", "",
        api_name="/train",
    )  # fmt: skip
    job = wait_for_job(services, job_id(message))
    assert job.status == "failed" and "fake.safetensors" in job.message
    assert "failed" in client.predict(job.id, api_name="/job_log")
    images, _ = generate(client)
    assert len(images) == 1


def test_bad_options_are_refused_before_queueing(client, studio_app):
    services, _ = studio_app
    before = len(services.jobs.jobs())
    with pytest.raises(Exception, match="TOML|unknown option"):
        train(client, "hearts", "x", more="no_such_option = 3")
    with pytest.raises(Exception, match="no dataset"):
        train(client, "missing", "y")
    assert len(services.jobs.jobs()) == before


def test_cancel_stops_a_running_job(client, studio_app, wait_for_job):
    services, _ = studio_app
    client.predict("hearts3", "subject: a red heart (sks)", 4, api_name="/add_demo_set")
    running = job_id(train(client, "hearts3", "long", steps=100000))
    deadline = time.time() + 120
    while services.jobs.get(running).status != "running" or not services.jobs.events(running):
        assert time.time() < deadline, "the job never started"
        time.sleep(0.3)
    assert "stopping" in client.predict(running, api_name="/cancel_job")
    assert wait_for_job(services, running, timeout=60).status == "cancelled"


def test_file_route_serves_what_the_page_shows_never_the_queue(client, studio_app):
    import urllib.error
    import urllib.request

    services, url = studio_app
    generate(client)  # an image in outputs/
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
    with pytest.raises(Exception, match="output_dir: .*outside the workspace"):
        client.predict("outside", "subject: a red heart (sks)", 4, api_name="/add_demo_set")
        train(client, "outside", "x", more='output_dir = "/tmp/elsewhere"')
