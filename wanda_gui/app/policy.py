"""What visitors may do on this server: which model folders, export targets, remote code and files it allows.

Local mode (loopback, the default) trusts the person at the keyboard; exposed mode (--share or a non-loopback --host)
keeps visitors inside the folders the operator named. The server enforces this on every call, whatever the page shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import socket
from pathlib import Path
from typing import NamedTuple

from ..core.calibration import HUB_SHORTHANDS, HubDataset
from ..core.errors import UserError
from ..core.models import is_hub_id
from .tempfolders import private_folder

REMOTE_CODE_REFUSED = ("This server does not run a model's own code (trust_remote_code); the operator can start it "
                       "with --allow-remote-code.")

_files_dir: Path | None = None


def app_files_dir() -> Path:
    """This process's private temp folder (0700), the only folder the app serves files from; removed at exit."""
    global _files_dir
    if _files_dir is None:
        _files_dir = private_folder()
    return _files_dir


def is_loopback(host: str) -> bool:
    """True when every address the host name stands for is a loopback address (only this machine can connect)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def inside(path: Path, folder: Path) -> bool:
    """True when path, with every symlink followed, lies in folder."""
    return path.resolve().is_relative_to(folder.resolve())


# An absolute path in a message (not the '//' of a URL, nor the '/' inside 'org/name'): all but its last part is cut.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\-])/(?:[^\s/'\"`]+/)*(?P<last>[^\s/'\"`]+)")


class VisitorSource(NamedTuple):
    """What core.models.load_model takes for the visitor's choice: the source, and whether it is a hub id that must
    never be read as a path on this server."""

    source: str
    hub_only: bool = False


@dataclasses.dataclass(frozen=True)
class ServePolicy:
    exposed: bool = False  # --share or a non-loopback --host
    models_dir: Path | None = None  # exposed: local model folders only under it (None: no local folders at all)
    exports_dir: Path = Path("exports").absolute()  # exposed: exports only as a NAME under it
    allow_remote_code: bool = False  # the operator's --allow-remote-code; the page offers the box only then
    max_sessions: int = 4  # sessions holding models at once (--max-sessions)
    files_dir: Path = dataclasses.field(default_factory=app_files_dir)  # the only folder files are served from

    def model_source(self, kind: str, folder: str, hub_id: str) -> VisitorSource:
        """What core.models.load_model takes for what the visitor chose, or a UserError when it is not allowed."""
        if kind == "builtin":
            return VisitorSource("builtin")
        if kind == "folder":
            return VisitorSource(self._folder_source(folder.strip()))
        if kind == "hub":
            return VisitorSource(self._hub_source(hub_id.strip()), hub_only=self.exposed)
        raise UserError(f"Unknown model source {kind!r}: choose the built-in model, a local folder or a hub id.")

    def _folder_source(self, text: str) -> str:
        if not self.exposed:
            if not text:
                raise UserError("Give the model folder (the one holding config.json, the weights and the tokenizer).")
            return str(Path(text).expanduser().absolute())
        if self.models_dir is None:
            raise UserError("This server loads no local folders: choose the built-in model or a hub id.")
        if not text:
            raise UserError(f"Give the name of a model folder in the server's {self.models_dir.name}/ folder.")
        path = self.models_dir / text
        if not inside(path, self.models_dir) or not path.resolve().is_dir():
            # One message for "outside" and "missing": a visitor learns nothing about the server's other paths.
            raise UserError(f"There is no model folder {text!r} in the server's {self.models_dir.name}/ folder; give "
                            "the name of one of its folders.")
        return str(path.resolve())

    def _hub_source(self, hub_id: str) -> str:
        if not hub_id:
            raise UserError("Give a hub id of the form 'org/name'.")
        if self.exposed and not is_hub_id(hub_id):
            # Decided by the spelling alone, before any look-up: the answer says nothing about the server's paths.
            raise UserError(f"{hub_id!r} is not a hub id of the form 'org/name' that this server fetches.")
        return hub_id

    def export_target(self, text: str) -> Path:
        """Where an export goes: exposed, a plain name under exports_dir; local, any folder (relative: here)."""
        text = (text or "").strip()
        if not self.exposed:
            if not text:
                raise UserError("Give the folder to export to.")
            return Path(text).expanduser().absolute()
        if not text or any(c in text for c in "/\\\0") or ".." in text or text.startswith("."):
            raise UserError(f"Give the export a plain name (no '/', '\\', '..' or leading '.'): it is saved in the "
                            f"server's {self.exports_dir.name}/ folder.")
        target = self.exports_dir.absolute() / text
        if not inside(target, self.exports_dir):
            raise UserError(f"{text!r} cannot be used as an export name here; choose another name.")
        return target

    def tasks_folder(self, text: str) -> Path | None:
        """A folder of the user's own lm-eval task YAMLs (None: none given). Local mode only: a YAML names files to
        read and may run Python (`!function`), and visitors never name the server's folders."""
        text = (text or "").strip()
        if not text:
            return None
        if self.exposed:
            raise UserError("This server reads no tasks folder: name tasks of lm-evaluation-harness's catalogue.")
        return Path(text).expanduser().absolute()

    def calibration_dataset(self, spec: str) -> HubDataset:
        """A hub dataset 'NAME[:CONFIG]'; exposed, a shorthand or a hub id read from the hub only, whatever the server's
        disk holds (`datasets` reads a local folder of that name first)."""
        spec = (spec or "").strip()
        name = spec.partition(":")[0]
        if self.exposed and name.lower() not in HUB_SHORTHANDS and not is_hub_id(name):
            raise UserError(f"{spec!r} is not a hub dataset name this server fetches: give NAME[:CONFIG] "
                            "(wikitext2, c4, or a hub id like 'org/name').")
        return HubDataset(spec, hub_only=self.exposed)

    def shown(self, text: str) -> str:
        """A message as a visitor sees it. Shared, it names the server's folders relative to models-dir and
        exports-dir (`exports/x`) and cuts any other absolute path to its last part: nothing of the disk's layout."""
        if not self.exposed:
            return text
        names = {}
        for folder in filter(None, (self.models_dir, self.exports_dir)):
            for spelling in (folder.absolute(), folder.resolve()):
                names[str(spelling)] = folder.name
        for root in sorted(names, key=len, reverse=True):  # a folder inside another one first
            text = re.sub(re.escape(root) + r"(?![\w.-])", lambda _: names[root], text)
        return ABSOLUTE_PATH.sub(lambda m: f"…/{m['last']}", text)

    def remote_code(self, requested: bool) -> bool:
        """Whether a model's own Python may run: only when asked for and the operator allowed it."""
        if requested and not self.allow_remote_code:
            raise UserError(REMOTE_CODE_REFUSED)
        return bool(requested)

    def describe(self) -> str:
        """One Markdown line for the page: which mode, where models come from and where exports go."""
        code = " Models' own code runs (--allow-remote-code)." if self.allow_remote_code else ""
        if not self.exposed:
            return ("**Local mode** (this machine only): models from any folder or the hub; exports go to the folder "
                    f"you name.{code}")
        folders = f", or folders in the server's `{self.models_dir.name}/`" if self.models_dir else ""
        return (f"**Shared mode**: models from the built-in model, the hub{folders}; exports are saved by name in the "
                f"server's `{self.exports_dir.name}/` folder.{code}")


def policy_from_args(args: argparse.Namespace) -> ServePolicy:
    """The serving policy the operator's command line asks for; UserError for a bad folder or count."""
    models_dir = None
    if args.models_dir:
        models_dir = Path(args.models_dir).expanduser().resolve()
        if not models_dir.is_dir():
            raise UserError(f"--models-dir {args.models_dir} is not a folder; give the folder that holds the model "
                            "folders visitors may load.")
    if args.max_sessions < 1:
        raise UserError(f"--max-sessions must be at least 1 (got {args.max_sessions}).")
    return ServePolicy(exposed=args.share or not is_loopback(args.host), models_dir=models_dir,
                       exports_dir=Path(args.exports_dir).expanduser().absolute(),
                       allow_remote_code=args.allow_remote_code, max_sessions=args.max_sessions)
