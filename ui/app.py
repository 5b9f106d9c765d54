"""The studio's page: Generate, Dataset, Train, Merge and Jobs tabs over one workspace.

    lora-studio ui --workspace studio-work

Tests import `build_app` and drive it with gradio_client and a headless browser.
"""

from __future__ import annotations

import gradio as gr

from studio.app.services import Services, build_services
from ui.tabs import dataset, generate, jobs, library, merge, train

TITLE = "LoRA Studio"


def build_app(services: Services) -> gr.Blocks:
    """The page over `services` (built by studio.app.services.build_services)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {TITLE}\nWorkspace: `{services.workspace.root}` · base model by default: the built-in demo "
            "model (`demo:sd15`, 64 px shapes world) · training and merging run as jobs."
        )
        banner = gr.Markdown(visible=False, elem_id="workspace-gone")  # shown while the workspace is gone
        jobs_view = gr.Number(visible=False)  # set by Train / Merge; the Jobs tab follows it
        with gr.Tabs() as tabs:
            gen = generate.build(services)
            lib = library.build(services, tabs, gen)
            data = dataset.build(services)
            trained = train.build(services, tabs, jobs_view)
            merged = merge.build(services, tabs, jobs_view)
            job_id = jobs.build(services)
        jobs_view.change(lambda j: j, jobs_view, job_id, api_name=False)
        follow_workspace(services, app, banner, gen, lib, data, trained, merged)
    return app


def follow_workspace(
    services: Services, app: gr.Blocks, banner, gen: dict, lib, data: dict, trained: dict, merged: dict
) -> None:
    """Keep every list current without a Refresh button: at page load, and whenever a LoRA, a dataset or a
    job changes (a LoRA a job just wrote appears in Generate and Merge). No list ever picks a file by
    itself: choices change, chosen values stay as the user left them. While the workspace is gone, the
    `banner` says so and the lists stay as they were."""
    lora_lists = [gen["loras"], gen["b_content"], gen["b_style"], merged["sources"]]
    dataset_lists = [data["datasets"], trained["datasets"], trained["reg_datasets"]]
    seen = gr.State(None)

    def lists():
        ws = services.workspace
        loras, names = ws.lora_files(), ws.dataset_names()
        return ([gr.Dropdown(choices=loras) for _ in lora_lists] + [gr.Dropdown(choices=names) for _ in dataset_lists]
                + [[e.row() for e in services.library.entries()]])  # fmt: skip

    def if_changed(before):
        unchanged = [gr.skip()] * (len(lora_lists) + len(dataset_lists) + 1)
        if gone := services.workspace.gone():
            return [*unchanged, before, gr.Markdown(f"**{gone}**", visible=True)]
        now = services.version()
        if now == before:
            return [*unchanged, before, gr.Markdown(visible=False)]
        return [*lists(), now, gr.Markdown(visible=False)]

    outputs = [*lora_lists, *dataset_lists, lib, seen, banner]
    app.load(if_changed, seen, outputs, api_name=False)
    gr.Timer(2.0).tick(if_changed, seen, outputs, api_name=False, show_progress="hidden")


def serving_options(services: Services) -> dict:
    """What the page's file route may serve: the images, datasets and LoRAs it shows, never the job queue."""
    ws = services.workspace
    queue = [str(ws.jobs_db), f"{ws.jobs_db}-wal", f"{ws.jobs_db}-shm"]
    return {
        "allowed_paths": [str(folder) for folder in (ws.outputs, ws.datasets, ws.loras, ws.runs)],
        "blocked_paths": queue,
    }


def launch(
    workspace: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    open_browser: bool = False,
    auth: tuple[str, str] | None = None,
    allow_pickle: bool = False,
) -> None:
    """Build the services and serve the page until interrupted (this machine only unless `host` says so;
    `auth` is the login the page asks for)."""
    services = build_services(workspace, allow_pickle=allow_pickle)
    try:
        build_app(services).queue(default_concurrency_limit=1).launch(
            server_name=host,
            server_port=port,
            inbrowser=open_browser,
            auth=auth,
            show_error=True,
            **serving_options(services),
        )
    finally:
        services.close()
