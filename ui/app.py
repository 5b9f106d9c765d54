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


def launch(
    workspace: str, host: str = "127.0.0.1", port: int | None = None, open_browser: bool = False
) -> None:
    """Build the services and serve the page until interrupted (localhost only unless `host` says otherwise)."""
    services = build_services(workspace)
    try:
        build_app(services).queue(default_concurrency_limit=1).launch(
            server_name=host,
            server_port=port,
            inbrowser=open_browser,
            allowed_paths=[str(services.workspace.root)],
            show_error=True,
        )
    finally:
        services.close()
