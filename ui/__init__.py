"""The browser UI (Gradio): `ui.app.build_app(services)` makes the page; one module per tab in ui/tabs/.

Only this package imports gradio. Handlers are small functions that build a typed config and call a studio
service; training and merging go through the job queue, so a failing job never takes the page down.
"""
