"""The studio's page: Generate, Dataset, Train, Merge and Jobs tabs over one workspace.

    lora-studio ui --workspace studio-work

Tests import `build_app` and drive it with gradio_client and a headless browser.
"""

from __future__ import annotations

import gradio as gr

from studio.app.services import Services, build_services
from ui.tabs import dataset, generate, jobs, merge, train

TITLE = "LoRA Studio"


def build_app(services: Services) -> gr.Blocks:
    """The page over `services` (built by studio.app.services.build_services)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {TITLE}\nWorkspace: `{services.workspace.root}` · base model by default: the built-in demo "
            "model (`demo:sd15`, 64 px shapes world) · training and merging run as jobs."
        )
        generate.build(services)
        dataset.build(services)
        train.build(services)
        merge.build(services)
        jobs.build(services)
    return app


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
