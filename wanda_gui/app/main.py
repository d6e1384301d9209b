"""Start the app: offline-safe environment, one bundled theme, logo and favicon, queue, launch."""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "localhost", "127.0.0.1"]))

CSS = """
#brand {display: flex; gap: 16px; align-items: center; padding: 4px 0;}
#brand svg {width: 56px; height: 56px; flex: none;}
#brand h1 {margin: 0; font-size: 1.6rem;}
#brand p {margin: 2px 0 0; color: var(--body-text-color-subdued);}
#telemetry {font-family: ui-monospace, monospace; font-size: 0.85rem; color: var(--body-text-color-subdued);}
.step {border: 1px solid var(--border-color-primary); border-radius: 12px; padding: 12px 16px !important;}
#prune-status, #load-status {min-height: 1.6em;}
footer {display: none !important;}
"""


def theme():
    """Gradio's default theme with system fonts only: no font or asset is fetched from outside."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
    return gr.themes.Default(primary_hue="teal", secondary_hue="amber", neutral_hue="slate", radius_size="md",
                             font=system, font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth: str | None = None,
           prevent_thread_lock: bool = False, quiet: bool = False):
    from ..core.errors import UserError
    from .ui import ASSETS, build

    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth takes USER:PASS.")
        credentials = (user, password)
    demo = build()
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, auth=credentials, theme=theme(), css=CSS,
                favicon_path=str(ASSETS / "favicon.png"), footer_links=[], run_history=False, show_error=True,
                allowed_paths=[tempfile.gettempdir()], prevent_thread_lock=prevent_thread_lock, quiet=quiet)
    return demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The app's command-line options (`wanda-gui app`, `python launch.py`)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (needs internet)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require a login")
    parser.add_argument("--debug", action="store_true")


def serve(args: argparse.Namespace) -> None:
    launch(host=args.host, port=args.port, share=args.share, auth=args.auth)
