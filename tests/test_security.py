"""Serving safely: files only from the app's own folder, remote code only when the operator allows it, exposed mode
only with a login and only inside the operator's folders, and a bad address answered in words."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client

from test_app_api import error_of, free_port, prune_args, serving
from wanda_gui.app.main import launch
from wanda_gui.app.policy import ServePolicy, app_files_dir, policy_from_args
from wanda_gui.app.steps.method import CALIBRATION
from wanda_gui.app.steps.model import SOURCES
from wanda_gui.cli import main
from wanda_gui.core.calibration import HubDataset
from wanda_gui.core.errors import UserError

AUTH = ("alice", "a-long-passphrase")


def refusal(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    return str(info.value)


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def local_url():
    with serving() as demo:
        yield demo.local_url


# -- files --------------------------------------------------------------------------------------------------------

def test_a_file_in_the_temp_dir_outside_the_apps_folder_is_not_served(local_url):
    secret = tempfile.NamedTemporaryFile("w", dir=tempfile.gettempdir(), suffix=".txt", delete=False)
    secret.write("server secret 8d1f")
    secret.close()
    ours = app_files_dir() / "served.txt"
    ours.write_text("the app's own file")
    try:
        status, body = http_get(f"{local_url}gradio_api/file={secret.name}")
        assert status in (403, 404) and b"8d1f" not in body
        assert http_get(f"{local_url}gradio_api/file={ours}") == (200, b"the app's own file")  # the route itself works
    finally:
        os.unlink(secret.name)
        ours.unlink()


def test_uploads_land_in_the_apps_folder_and_are_served_back(local_url):
    response = httpx.post(f"{local_url}gradio_api/upload", files={"files": ("calib.txt", b"uploaded text 42")})
    path = Path(response.json()[0])
    assert path.resolve().is_relative_to(app_files_dir())
    assert http_get(f"{local_url}gradio_api/file={path}") == (200, b"uploaded text 42")


# -- starting the server -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", [dict(host="0.0.0.0"), dict(share=True)])
def test_exposed_mode_refuses_to_start_without_auth(where):
    message = refusal(lambda: launch(port=free_port(), prevent_thread_lock=True, quiet=True, **where))
    assert "needs a login" in message and "--auth USER:PASS" in message


def test_cli_refuses_exposed_mode_without_auth(capsys):
    assert main(["app", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "needs a login: add --auth USER:PASS" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--port", "99999"], "--port 99999 is not a port number: give one from 1 to 65535"),
    (["--port", "0"], "--port 0 is not a port number"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' does not resolve to an address"),
    (["--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),
    (["--auth", "alice"], "--auth takes USER:PASS"),
    (["--auth", ":secret"], "--auth takes USER:PASS"),
    (["--models-dir", "/no/such/folder", "--host", "127.0.0.1"], "--models-dir /no/such/folder is not a folder"),
    (["--max-sessions", "0"], "--max-sessions must be at least 1"),
])
def test_bad_serving_options_are_answered_in_words(argv, words, capsys):
    port = [] if "--port" in argv else ["--port", str(free_port())]
    assert main(["app", *argv, *port]) == 2
    err = capsys.readouterr().err
    assert words in err and "internal error" not in err


def test_a_port_in_use_is_named_as_such(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
    assert f"Port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


# -- the policy ---------------------------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    """An exposed policy over models/ (one model folder, one symlink escaping it) and exports/, and a folder outside."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    (models / "tiny").mkdir(parents=True)
    (outside / "private").mkdir(parents=True)
    (models / "escape").symlink_to(outside / "private")
    (models / "inner").symlink_to(models / "tiny")
    policy = ServePolicy(exposed=True, models_dir=models, exports_dir=tmp_path / "exports")
    return SimpleNamespace(policy=policy, models=models, outside=outside, root=tmp_path)


def test_exposed_policy_loads_folders_only_inside_models_dir(served):
    policy = served.policy
    assert policy.model_source("folder", "tiny", "") == (str(served.models / "tiny"), False)
    assert policy.model_source("folder", "inner", "").source == str(served.models / "tiny")  # a symlink inside
    assert policy.model_source("folder", str(served.models / "tiny"), "").source == str(served.models / "tiny")
    missing = refusal(lambda: policy.model_source("folder", "nothing-here", ""))
    for outside in ("../outside/private", str(served.outside / "private"), "escape", "tiny/../../outside/private"):
        message = refusal(lambda: policy.model_source("folder", outside, ""))
        # Outside and missing read the same, up to the name given: nothing says which server paths exist.
        assert message.replace(repr(outside), "X") == missing.replace(repr("nothing-here"), "X")
        assert str(served.root) not in message.replace(outside, "")  # only what the visitor typed is echoed
    assert refusal(lambda: ServePolicy(exposed=True).model_source("folder", "tiny", "")).startswith(
        "This server loads no local folders")


def test_exposed_policy_takes_hub_ids_by_their_spelling_and_only_from_the_hub(served, monkeypatch):
    policy = served.policy
    assert policy.model_source("hub", "", " org/name ") == ("org/name", True)
    assert policy.model_source("builtin", "whatever", "") == ("builtin", False)
    monkeypatch.chdir(served.root)
    # A hub id that names a server folder too is still a hub id, never read from the disk: nothing tells them apart.
    assert policy.model_source("hub", "", "outside/private") == ("outside/private", True)
    for name in ("/etc/passwd", "outside", "../outside", "outside/..", "~/x", "a/b/c"):
        assert "not a hub id" in refusal(lambda: policy.model_source("hub", "", name))
    assert ServePolicy().model_source("hub", "", "outside/private") == ("outside/private", False)  # local: as before


def test_local_policy_takes_any_folder_and_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = ServePolicy()
    assert local.model_source("folder", "models/x", "") == (str(tmp_path / "models" / "x"), False)
    assert local.model_source("folder", "~/m", "").source == str(Path.home() / "m")
    assert local.export_target("out/a") == tmp_path / "out" / "a"
    assert local.export_target("/srv/x") == Path("/srv/x")
    assert "Give the folder" in refusal(lambda: local.export_target("  "))


@pytest.mark.parametrize("name", ["a/b", "../up", "..", ".hidden", "a\\b", "/abs/path", "", "x..y"])
def test_exposed_export_names_are_plain_names_under_exports_dir(served, name):
    message = refusal(lambda: served.policy.export_target(name))
    assert "plain name" in message and "exports/ folder" in message and str(served.root) not in message


def test_exposed_export_name_lands_under_exports_dir_and_no_symlink_leads_out(served):
    policy = served.policy
    assert policy.export_target(" my-model_2 ") == served.root / "exports" / "my-model_2"
    (served.root / "exports").mkdir()
    (served.root / "exports" / "link").symlink_to(served.outside)
    assert "cannot be used" in refusal(lambda: policy.export_target("link"))


def test_exposed_calibration_datasets_are_hub_names_read_from_the_hub_only(served, monkeypatch):
    monkeypatch.chdir(served.root)
    for spec in ("wikitext2", "c4", "org/name:config", "outside/private"):  # the last one names a server folder too
        assert served.policy.calibration_dataset(f" {spec} ") == HubDataset(spec, hub_only=True)
    for spec in ("/etc", "./models", "~/data", "../x:y", "", "json", "outside"):  # 'json' reads the working folder
        assert "not a hub dataset name" in refusal(lambda: served.policy.calibration_dataset(spec))
    assert ServePolicy().calibration_dataset("outside/private") == HubDataset("outside/private")  # local: as before


def test_remote_code_runs_only_when_the_operator_allowed_it():
    assert "--allow-remote-code" in refusal(lambda: ServePolicy().remote_code(True))
    assert "--allow-remote-code" in refusal(lambda: ServePolicy(exposed=True).remote_code(True))
    assert ServePolicy().remote_code(False) is False
    assert ServePolicy(allow_remote_code=True).remote_code(True) is True


def test_policy_from_args_and_describe(tmp_path):
    args = SimpleNamespace(host="0.0.0.0", share=False, models_dir=str(tmp_path), exports_dir="exp",
                           allow_remote_code=False, max_sessions=3)
    policy = policy_from_args(args)
    assert policy.exposed and policy.models_dir == tmp_path.resolve() and policy.exports_dir == Path("exp").absolute()
    assert policy.max_sessions == 3 and f"`{tmp_path.name}/`" in policy.describe() and "`exp/`" in policy.describe()
    assert not policy_from_args(SimpleNamespace(**{**vars(args), "host": "localhost"})).exposed
    assert policy_from_args(SimpleNamespace(**{**vars(args), "host": "127.0.0.1", "share": True})).exposed
    assert policy.files_dir == app_files_dir() and oct(app_files_dir().stat().st_mode & 0o777) == "0o700"
    assert ServePolicy().describe().startswith("**Local mode**")


# -- through the API (needs ui.py to call the policy) -------------------------------------------------------------

def remote_code_folder(tiny_model_dir, root: Path) -> tuple[Path, Path]:
    """A copy of the tiny model whose config maps AutoConfig to a .py that writes a marker file when imported."""
    folder, marker = root / "evil-model", root / "marker.txt"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        # Subclasses, not aliases: transformers marks a remote class for auto-saving, which must not touch Llama's own.
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return folder, marker


def load_args(kind, folder="", hub_id="", trust=False):
    return [kind, str(folder), hub_id, "", "", trust, "cpu", "auto"]


def test_remote_code_does_not_run_through_the_api_unless_allowed(local_url, tiny_model_dir, tmp_path):
    folder, marker = remote_code_folder(tiny_model_dir, tmp_path)
    client = Client(local_url, verbose=False)
    try:
        message = error_of(lambda: client.predict(*load_args(SOURCES[1], folder, trust=True), api_name="/load"))
    finally:
        client.close()
    assert "--allow-remote-code" in message and not marker.exists()


def test_with_allow_remote_code_the_models_code_runs(tiny_model_dir, tmp_path):
    folder, marker = remote_code_folder(tiny_model_dir, tmp_path)
    with serving(policy=ServePolicy(allow_remote_code=True)) as demo:
        client = Client(demo.local_url, verbose=False)
        try:
            client.predict(*load_args(SOURCES[1], folder, trust=True), api_name="/load")
        except Exception:
            pass  # whether the model then loads does not matter: its code was allowed to run
        finally:
            client.close()
    assert marker.read_text() == "ran"  # the fixture is real: the test above would see it


def test_exposed_server_keeps_visitors_inside_its_folders(tiny_model_dir, tmp_path):
    models, exports = tmp_path / "models", tmp_path / "exports"
    models.mkdir()
    shutil.copytree(tiny_model_dir, models / "tiny")
    policy = ServePolicy(exposed=True, models_dir=models, exports_dir=exports)
    with serving(policy=policy, auth=":".join(AUTH)) as demo:
        client = Client(demo.local_url, auth=AUTH, verbose=False)
        for outside in (str(tiny_model_dir), "../../", "/etc"):
            message = error_of(lambda: client.predict(*load_args(SOURCES[1], outside), api_name="/load"))
            assert "no model folder" in message and str(tmp_path) not in message
        status = client.predict(*load_args(SOURCES[1], "tiny"), api_name="/load")[0]
        assert status.startswith("✓ Loaded")
        assert "plain name" in error_of(lambda: client.predict(str(tmp_path / "stolen"), False, api_name="/export"))
        assert not (tmp_path / "stolen").exists()
        client.close()


def test_exposed_server_reads_no_server_folder_as_a_calibration_dataset(tiny_model_dir, tmp_path):
    """The calibration source asks the policy (`datasets` reads a local folder's files)."""
    models, private = tmp_path / "models", tmp_path / "private"
    shutil.copytree(tiny_model_dir, models / "tiny")
    private.mkdir()
    (private / "table.csv").write_text("secret_column,other\n1,2\n")
    policy = ServePolicy(exposed=True, models_dir=models, exports_dir=tmp_path / "exports")
    with serving(policy=policy, auth=":".join(AUTH)) as demo:
        client = Client(demo.local_url, auth=AUTH, verbose=False)
        client.predict(*load_args(SOURCES[1], "tiny"), api_name="/load")
        message = error_of(lambda: client.predict(*prune_args([], calib_kind=CALIBRATION[2], dataset=str(private)),
                                                  api_name="/prune"))
        assert "not a hub dataset name" in message and "secret_column" not in message
        client.close()


# -- a shared server says nothing about its files -----------------------------------------------------------------

def test_exposed_server_answers_a_name_alike_whether_or_not_the_server_has_it(tiny_model_dir, tmp_path, monkeypatch):
    """Hub ids and hub datasets: one answer for a name the server's disk holds and for one it does not."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    (tmp_path / "outside" / "private").mkdir(parents=True)
    (tmp_path / "outside" / "private" / "table.csv").write_text("text,secret_column\nhello,1\n")
    (tmp_path / "table.json").write_text('{"text": "hello", "secret_column": 1}\n')
    monkeypatch.chdir(tmp_path)  # the server's working folder: relative names are looked up here
    policy = ServePolicy(exposed=True, models_dir=tmp_path / "models", exports_dir=tmp_path / "exports")
    pairs = [("outside/private", "nobody/nothing"), ("outside", "nowhere"),  # hub ids; plain names
             (str(tmp_path / "outside" / "private"), str(tmp_path / "missing" / "private"))]  # absolute paths
    with serving(policy=policy, auth=":".join(AUTH)) as demo:
        client = Client(demo.local_url, auth=AUTH, verbose=False)
        client.predict(*load_args(SOURCES[1], "tiny"), api_name="/load")

        def load(name):
            return error_of(lambda: client.predict(*load_args(SOURCES[2], hub_id=name), api_name="/load"))

        def calibrate(name):
            return error_of(lambda: client.predict(*prune_args([], calib_kind=CALIBRATION[2], dataset=name),
                                                   api_name="/prune"))

        json_files = calibrate("json")  # `datasets` would read the working folder's JSON files
        for ask in (calibrate, load):  # a failed load unloads the model: calibration first
            for there, missing in pairs:
                answer = ask(there)
                assert answer.replace(there, "X") == ask(missing).replace(missing, "X"), answer
                assert "Load a model first" not in answer
        client.close()
    assert "not a hub dataset name" in json_files and "secret_column" not in json_files


def test_exposed_server_names_its_folders_relative_to_models_and_exports_dirs(tiny_model_dir, text_file, tmp_path):
    models, exports = tmp_path / "models", tmp_path / "exports"
    shutil.copytree(tiny_model_dir, models / "tiny")
    shutil.copytree(tiny_model_dir, models / "damaged")
    (models / "damaged" / "config.json").write_text("{")
    (models / "empty").mkdir()
    (exports / "foreign").mkdir(parents=True)
    for name in ("notes.txt", "photo.jpg"):
        (exports / "foreign" / name).write_text("not an export")
    policy = ServePolicy(exposed=True, models_dir=models, exports_dir=exports)
    with serving(policy=policy, auth=":".join(AUTH)) as demo:
        client = Client(demo.local_url, auth=AUTH, verbose=False)
        empty = error_of(lambda: client.predict(*load_args(SOURCES[1], "empty"), api_name="/load"))
        damaged = error_of(lambda: client.predict(*load_args(SOURCES[1], "damaged"), api_name="/load"))
        client.predict(*load_args(SOURCES[1], "tiny"), api_name="/load")
        client.predict(*prune_args([text_file]), api_name="/prune")
        job = client.submit("x", False, api_name="/export")
        statuses = [update[0] for update in job]
        exported = job.result()[0]
        foreign = error_of(lambda: client.predict("foreign", False, api_name="/export"))
        client.close()
    assert empty.startswith("models/empty is not a model folder")
    assert damaged.startswith("models/damaged/config.json is not valid JSON")
    assert "… Exporting to `exports/x`…" in statuses and exported.startswith("✓ Exported to `exports/x`")
    assert foreign.startswith("exports/foreign is not empty and is not a previous export of wanda_gui; choose")
    assert "notes.txt" not in foreign  # no listing of the folder's files
    for message in (empty, damaged, *statuses, exported, foreign):
        assert str(tmp_path) not in message


def test_a_message_names_no_absolute_server_path():
    policy = ServePolicy(exposed=True, models_dir=Path("/srv/models"), exports_dir=Path("/srv/exports"))
    assert policy.shown("Cannot create /srv/exports/x: Permission denied.") == "Cannot create exports/x: Permission denied."
    assert policy.shown("/srv/models-old/m and /home/op/.cache/hub/config.json") == "…/m and …/config.json"
    kept = "see https://huggingface.co/org/name, 2:4 and 1/2"
    assert policy.shown(kept) == kept
    assert ServePolicy().shown("/srv/models/m") == "/srv/models/m"  # local mode: the full path


# -- the login, and the temp folders of a real server process -----------------------------------------------------

@pytest.mark.parametrize("content, words", [
    (None, "does not exist: give a file holding one line USER:PASS"),
    ("\n", "is empty: write one line USER:PASS into it"),
    ("alice\n", "must hold one line USER:PASS"),
    ("alice:secret-1\nbob:secret-2\n", "must hold one line USER:PASS"),
])
def test_a_bad_auth_file_is_answered_in_one_line(tmp_path, capsys, content, words):
    path = tmp_path / "login"
    if content is not None:
        path.write_text(content)
    assert main(["app", "--auth-file", str(path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"--auth-file {path} {words}" in err and "secret" not in err and len(err.splitlines()) == 1


def test_the_login_comes_once_and_a_bad_variable_is_named(tmp_path, capsys, monkeypatch):
    path = tmp_path / "login"
    path.write_text("alice:a-long-passphrase\n")
    assert main(["app", "--auth", "a:b", "--auth-file", str(path), "--port", str(free_port())]) == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.setenv("WANDA_GUI_AUTH", "alice")
    assert main(["app", "--port", str(free_port())]) == 2
    assert "WANDA_GUI_AUTH takes USER:PASS" in capsys.readouterr().err


def test_an_auth_file_others_can_read_is_used_with_a_warning(tmp_path, capsys):
    from wanda_gui.app.main import read_auth_file

    path = tmp_path / "login"
    path.write_text("alice:a-long-passphrase\n")
    path.chmod(0o600)
    assert read_auth_file(path) == "alice:a-long-passphrase" and capsys.readouterr().err == ""
    path.chmod(0o644)
    assert read_auth_file(path) == "alice:a-long-passphrase"
    assert "chmod 600" in capsys.readouterr().err


@contextlib.contextmanager
def server_process(tmp: Path, *options, env=None):
    """`wanda-gui app` in a subprocess whose temp dir is tmp, up and answering; yields (process, url)."""
    port = free_port()
    log = open(tmp.parent / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "wanda_gui", "app", "--port", str(port), *options],
                               env={**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", **(env or {})},
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while process.poll() is None and not answering(url):
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        assert process.poll() is None, (tmp.parent / "server.log").read_text()
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def answering(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:  # not listening yet
        return False


def logs_in(url: str, auth) -> bool:
    try:
        Client(url, auth=auth, verbose=False).close()
    except Exception:
        return False
    return True


def test_an_auth_file_keeps_the_password_out_of_the_process_list(tmp_path):
    tmp, path = tmp_path / "tmp", tmp_path / "login"
    tmp.mkdir()
    path.write_text(":".join(AUTH) + "\n")
    path.chmod(0o600)
    with server_process(tmp, "--auth-file", str(path)) as (server, url):
        assert AUTH[1] not in Path(f"/proc/{server.pid}/cmdline").read_text()
        assert logs_in(url, AUTH) and not logs_in(url, (AUTH[0], "wrong"))


def test_the_login_can_come_from_the_environment(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with server_process(tmp, env={"WANDA_GUI_AUTH": ":".join(AUTH)}) as (server, url):
        assert AUTH[1] not in Path(f"/proc/{server.pid}/cmdline").read_text()
        assert logs_in(url, AUTH) and not logs_in(url, (AUTH[0], "wrong"))


def test_sigterm_removes_the_servers_temp_folders_and_a_start_removes_dead_servers_ones(tmp_path):
    tmp = tmp_path / "tmp"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(ended.stdout), os.getpid()
    folders = {"dead": tmp / f"wanda-gui-{dead}-abcd1234", "dead pruned": tmp / f"wanda-gui-pruned-{dead}-efgh5678",
               "live": tmp / f"wanda-gui-{live}-ijkl9012", "older version": tmp / "wanda-gui-mnop3456"}
    for folder in folders.values():
        (folder / "gradio").mkdir(parents=True)
    with server_process(tmp) as (server, url):
        assert [name for name, folder in folders.items() if folder.exists()] == ["live", "older version"]
        assert list(tmp.glob(f"wanda-gui-{server.pid}-*"))  # its own, named after it
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 128 + signal.SIGTERM
    assert not list(tmp.glob(f"wanda-gui-*{server.pid}-*")) and folders["live"].exists()


def test_ctrl_c_removes_the_servers_temp_folders_too(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # A process started ignoring SIGINT (a background job) rightly keeps ignoring it: then SIGTERM stands in.
    interrupt = signal.SIGTERM if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else signal.SIGINT
    with server_process(tmp) as (server, url):
        assert list(tmp.glob(f"wanda-gui-{server.pid}-*"))
        server.send_signal(interrupt)
        assert server.wait(60) == 128 + interrupt
    assert not list(tmp.glob("wanda-gui-*"))


def test_a_sibling_folder_sharing_the_models_dirs_name_prefix_is_outside_it(tmp_path):
    """models-private/ starts with the characters of models/ but is not inside it (a string-prefix compare says
    it is)."""
    from wanda_gui.app.policy import inside

    (tmp_path / "models" / "ok").mkdir(parents=True)
    (tmp_path / "models-private" / "secret").mkdir(parents=True)
    (tmp_path / "models-private" / "secret" / "config.json").write_text("{}")
    assert inside(tmp_path / "models" / "ok", tmp_path / "models")
    assert not inside(tmp_path / "models-private" / "secret", tmp_path / "models")
    policy = ServePolicy(exposed=True, models_dir=tmp_path / "models")
    with pytest.raises(UserError, match="There is no model folder"):
        policy.model_source("folder", "../models-private/secret", "")


def test_exposed_server_reads_no_tasks_folder_and_no_task_yaml_by_path(tiny_model_dir, tmp_path):
    """A task YAML names files to read and may run Python: visitors name only lm-evaluation-harness's own tasks."""
    from test_zeroshot import write_task

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    tasks = write_task(tmp_path / "tasks")
    policy = ServePolicy(exposed=True, models_dir=tmp_path / "models", exports_dir=tmp_path / "exports")
    with serving(policy=policy, auth=":".join(AUTH)) as demo:
        client = Client(demo.local_url, auth=AUTH, verbose=False)
        client.predict(*load_args(SOURCES[1], "tiny"), api_name="/load")
        assert "reads no tasks folder" in error_of(lambda: client.predict("tiny_civics", str(tasks), 0,
                                                                          api_name="/zero_shot"))
        client.predict(*prune_args([], calib_kind=CALIBRATION[0]), api_name="/prune")
        message = error_of(lambda: client.predict(str(tasks / "tiny_civics.yaml"), "", 0, api_name="/zero_shot"))
        assert "Unknown zero-shot task '…/tiny_civics.yaml'" in message and str(tmp_path) not in message
        client.close()
