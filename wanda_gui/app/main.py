"""Start the app: offline-safe environment, one bundled theme, logo and favicon, queue, launch."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import socket
import stat
import sys
from pathlib import Path

from ..core.errors import UserError
from .policy import ServePolicy, is_loopback, policy_from_args
from .tempfolders import remove_dead_servers_folders, remove_on_signals

AUTH_ENV = "WANDA_GUI_AUTH"  # USER:PASS, kept out of the process list (where --auth shows)

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


def split_login(login: str) -> tuple[str, str] | None:
    """USER:PASS as (user, password); None unless both are non-empty."""
    user, sep, password = login.partition(":")
    return (user, password) if sep and user.strip() and password else None


def credentials_of(auth: str | None) -> tuple[str, str] | None:
    """--auth USER:PASS as Gradio's (user, password), or None for no login."""
    if auth is None:
        return None
    if (credentials := split_login(auth)) is None:
        raise UserError("--auth takes USER:PASS, both non-empty (e.g. --auth alice:a-long-passphrase).")
    return credentials


def login_of(args: argparse.Namespace) -> str | None:
    """The login USER:PASS from --auth, --auth-file or $WANDA_GUI_AUTH (an option wins over the variable), or None.
    The variable is taken out of the environment once read: no child process inherits it."""
    from_env = os.environ.pop(AUTH_ENV, None)
    if args.auth is not None and args.auth_file is not None:
        raise UserError("Give the login once: --auth USER:PASS or --auth-file FILE, not both.")
    if args.auth_file is not None:
        return read_auth_file(Path(args.auth_file).expanduser())
    if args.auth is not None or not from_env:
        return args.auth
    if split_login(from_env) is None:
        raise UserError(f"{AUTH_ENV} takes USER:PASS, both non-empty (e.g. {AUTH_ENV}=alice:a-long-passphrase).")
    return from_env


def read_auth_file(path: Path) -> str:
    """The one line USER:PASS of an --auth-file. A file other users can read or change is used with a warning, not
    refused: containers' secret files are often mounted readable by all."""
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"--auth-file {path} does not exist: give a file holding one line USER:PASS.") from None
    except IsADirectoryError:
        raise UserError(f"--auth-file {path} is a folder: give a file holding one line USER:PASS.") from None
    except UnicodeDecodeError:
        raise UserError(f"--auth-file {path} is not text: write one line USER:PASS into it.") from None
    except OSError as e:
        raise UserError(f"Cannot read --auth-file {path}: {e.strerror}.") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--auth-file {path} is empty: write one line USER:PASS into it.")
    if len(lines) > 1 or split_login(lines[0]) is None:
        raise UserError(f"--auth-file {path} must hold one line USER:PASS, both non-empty (e.g. "
                        "alice:a-long-passphrase).")
    if mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH):
        print(f"warning: other users of this machine can read or change --auth-file {path}: chmod 600 it.",
              file=sys.stderr)
    return lines[0]


def check_port(port: int) -> None:
    """A port number the system can bind: 1..65535."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number: give one from 1 to 65535 (7860 is the default).")


def check_address(host: str, port: int) -> None:
    """Bind (host, port) once before launch, so that a bad host or a busy port is named as such, not as a crash."""
    check_port(port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as the server (uvicorn) binds it
    try:
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4]
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--host {host!r} does not resolve to an address: give an IP address of this machine "
                        "(127.0.0.1: this machine only; 0.0.0.0: every network interface) or a name that "
                        "resolves.") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(bind_failure(host, port, e)) from None


def bind_failure(host: str, port: int, e: OSError) -> str:
    """What a failed bind means for the operator, and what to do about it."""
    if e.errno == errno.EADDRINUSE:
        return f"Port {port} on {host} is already in use by another program: stop it or choose another --port."
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host} is not an address of this machine: give one of its own addresses, 127.0.0.1 for "
                "this machine only, or 0.0.0.0 for every network interface.")
    if e.errno == errno.EACCES:
        return f"Port {port} needs administrator rights on this system: choose a --port above 1023."
    return f"Cannot listen on {host}:{port}: {e.strerror or e}."


def serve_files_from(folder) -> None:
    """Put Gradio's upload and cache folders inside the app's private folder (read when components and routes are made)."""
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(folder / "examples")


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth: str | None = None,
           prevent_thread_lock: bool = False, quiet: bool = False, policy: ServePolicy | None = None):
    """Check the address and the login the serving mode needs, then build and start the app."""
    policy = policy or ServePolicy()
    if (share or not is_loopback(host)) and not policy.exposed:
        policy = dataclasses.replace(policy, exposed=True)  # reachable from elsewhere: never local-mode rules
    credentials = credentials_of(auth)
    check_address(host, port)
    if policy.exposed and credentials is None:
        raise UserError("Serving beyond this machine (--share or a --host other than 127.0.0.1) needs a login: add "
                        f"--auth USER:PASS, --auth-file FILE or {AUTH_ENV}=USER:PASS, or serve on 127.0.0.1 only.")
    if not prevent_thread_lock:  # this process is the server until it ends: its temp folders go with it
        remove_dead_servers_folders()
        remove_on_signals()
    serve_files_from(policy.files_dir)
    from .ui import ASSETS, build

    demo = build(policy)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, auth=credentials, theme=theme(), css=CSS,
                favicon_path=str(ASSETS / "favicon.png"), footer_links=[], run_history=False, show_error=True,
                allowed_paths=[str(policy.files_dir)], prevent_thread_lock=prevent_thread_lock, quiet=quiet)
    return demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The app's command-line options (`wanda-gui app`, `python launch.py`)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but loopback serves others (then --auth is required)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true",
                        help="create a public gradio.live link (needs internet and --auth)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS",
                        help=f"require a login (shown in the process list: prefer --auth-file or {AUTH_ENV})")
    parser.add_argument("--auth-file", default=None, metavar="FILE",
                        help="require the login written in FILE, one line USER:PASS (chmod 600 it)")
    parser.add_argument("--models-dir", default=None, metavar="DIR",
                        help="when serving others: the only folder whose model folders visitors may load")
    parser.add_argument("--exports-dir", default="exports", metavar="DIR",
                        help="when serving others: exports are saved by name in this folder (default ./exports)")
    parser.add_argument("--allow-remote-code", action="store_true",
                        help="let models run their own Python (trust_remote_code); off unless given")
    parser.add_argument("--max-sessions", type=int, default=4, metavar="N",
                        help="sessions holding models at once (default 4)")
    parser.add_argument("--debug", action="store_true")


def serve(args: argparse.Namespace) -> None:
    launch(host=args.host, port=args.port, share=args.share, auth=login_of(args), policy=policy_from_args(args))
