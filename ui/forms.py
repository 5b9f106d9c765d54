"""Named form fields, and event functions whose API parameters carry those names and the fields' defaults.

    form = Form(prompt=gr.Textbox(value="a fox"), steps=gr.Slider(1, 100, value=20))
    button.click(handler(services, generate, form), form.inputs, outputs, api_name="generate")

`generate(services, values)` gets one dict of the fields; scripts call the endpoint by name,
`Client(url).predict(prompt="a red circle", api_name="/generate")`, and every field left out takes the default
the page shows.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Sequence
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

    def defaults(self) -> list[Any]:
        return [getattr(c, "value", None) for c in self.components.values()]

    def __getitem__(self, name: str) -> gr.components.Component:
        return self.components[name]


def handler(
    services,
    fn: Callable,
    form: Form | None = None,
    *,
    inputs: dict[str, Any] | None = None,
    polling: bool = False,
):
    """A Gradio event function with named parameters (see the module docstring).

    With `form`, calls fn(services, {name: value}); with `inputs` ({name: default}, in the order of the
    event's input components), calls fn(services, *values). Errors reach the page as one line (unexpected
    ones leave their traceback in the log). Nothing runs while the workspace is gone: a click says so, a
    `polling` (timer) event leaves its outputs as they are (the page's banner says it once)."""
    names, defaults = (list(form.components), form.defaults()) if form is not None else (
        list(inputs or {}), list((inputs or {}).values()))  # fmt: skip

    def run(*args):
        gone = services.workspace.gone()
        if gone:
            if polling:
                return gr.skip()
            raise gr.Error(gone)
        try:
            return fn(services, form.values(args)) if form is not None else fn(services, *args)
        except Exception as exc:
            if not isinstance(exc, StudioError):
                traceback.print_exc()
            raise user_error(exc) from None

    return named(run, names, defaults, fn)


def named(run: Callable, names: list[str], defaults: list[Any], like: Callable | None = None) -> Callable:
    """`run(*args)` with a signature of `names` and `defaults` (what Gradio's API and its clients show)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    run.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, default=d) for n, d in zip(names, defaults)]
    )
    if like is not None:
        run.__name__, run.__doc__ = getattr(like, "__name__", "run"), like.__doc__
    return run


def user_error(exc: Exception) -> gr.Error:
    """A message for the page: a StudioError's own words, anything else with its type (the log has the rest)."""
    if isinstance(exc, StudioError):
        return gr.Error(str(exc))
    return gr.Error(f"{type(exc).__name__}: {exc}")
