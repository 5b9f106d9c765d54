"""Named form fields for handlers with many inputs: a handler gets one dict instead of a long argument list.

form = Form(prompt=gr.Textbox(), steps=gr.Slider(1, 100))
button.click(lambda *v: generate(form.values(v)), form.inputs, outputs)
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import Any

import gradio as gr

from studio.core.errors import StudioError


class Form:
    """Components by name; `inputs` keeps their order, `values` turns a handler's arguments back into a dict."""

    def __init__(self, **components: gr.components.Component) -> None:
        self.components = components

    @property
    def inputs(self) -> list[gr.components.Component]:
        return list(self.components.values())

    def values(self, args: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.components, args))

    def __getitem__(self, name: str) -> gr.components.Component:
        return self.components[name]


def handler(services, fn, form: Form | None = None):
    """A Gradio event function: calls fn(services, form values as a dict) when a form is given, else
    fn(services, *inputs); any error is shown on the page (with a traceback in the log for unexpected ones)."""

    def run(*args):
        try:
            return fn(services, form.values(args)) if form is not None else fn(services, *args)
        except Exception as exc:
            if not isinstance(exc, StudioError):
                traceback.print_exc()
            raise user_error(exc) from None

    return run


def user_error(exc: Exception) -> gr.Error:
    """A message for the page: a StudioError's own words, anything else with its type (the log has the rest)."""
    if isinstance(exc, StudioError):
        return gr.Error(str(exc))
    return gr.Error(f"{type(exc).__name__}: {exc}")
