"""A restarted studio loses nothing and picks nothing by itself: LoRAs, datasets, history and finished jobs
(their loss curves and samples) are all there, and no list defaults to a file the user did not choose."""

from __future__ import annotations

import contextlib

from gradio_client import Client

from studio.core.lora_files import write_lora
from tests.fixtures.lora_random import random_lora
from tests.ui.conftest import _wait_for_job, serve


@contextlib.contextmanager
def studio(root):
    with serve(root) as (services, url):
        yield services, Client(url, verbose=False)


def test_restart_with_loras_keeps_everything_and_defaults_to_nothing(tmp_path, tiny_sdxl):
    root = tmp_path / "ws"
    with studio(root) as (services, client):
        # an SDXL B-LoRA first in the list: the old page picked it for B-LoRA mixing by itself
        write_lora(random_lora(tiny_sdxl, "sdxl", rank=2), services.workspace.loras / "a-sdxl.safetensors")
        client.predict(name="hearts", which="subject: a red heart (sks)", count=4, api_name="/add_demo_set")
        _, job = client.predict(
            dataset="hearts", name="heart", steps=6, batch_size=2, sample_every=3, api_name="/train"
        )
        assert _wait_for_job(services, int(job)).status == "done"
        client.predict(prompt="a red circle", steps=2, seed=5, api_name="/generate")
        before = client.predict(job_id=int(job), api_name="/job_view")
    with studio(root) as (services, client):
        images, info = client.predict(
            prompt="a red circle on a blue background", steps=2, api_name="/generate"
        )
        assert len(images) == 1 and "saved in outputs/" in info  # the SD1.5 demo model, no B-LoRA picked
        after = client.predict(job_id=int(job), api_name="/job_view")
        assert after[1] == before[1] and after[3] == before[3] == "loss over 6 steps (raw and smoothed)"
        assert len(after[4]) == len(before[4]) == 2  # the samples
        files = {row[1] for row in client.predict(api_name="/library")["data"]}
        assert {"loras/a-sdxl.safetensors", "runs/heart/heart.safetensors"} <= files
        assert any("seed 5" in (item["caption"] or "") for item in client.predict(api_name="/history"))
        assert client.predict(name="hearts", api_name="/show_dataset")[1]["data"]
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        defaults = {p["parameter_name"]: p["parameter_default"] for p in api["/generate"]["parameters"]}
        assert (
            defaults["loras"] == []
            and defaults["b_lora_content"] is None
            and defaults["b_lora_style"] is None
        )
