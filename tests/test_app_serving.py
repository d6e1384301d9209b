"""The app serving several sessions through its API: shared dense models, a session cap, sessions freed when they
close, chat that never waits behind another session's prune, and a page that never shows a previous run's results."""

import json
import time

import pytest
from gradio_client import Client

from test_app_api import error_of, load_tiny, prune_args, serving
from wanda_gui.app.common import BUTTONS
from wanda_gui.app.steps.chat import CHAT_OUTPUTS
from wanda_gui.app.steps.live import PRUNE_OUTPUTS


@pytest.fixture(scope="module")
def app():
    from wanda_gui.app.policy import ServePolicy

    with serving(policy=ServePolicy(max_sessions=2)) as demo:
        yield demo


@pytest.fixture(scope="module")
def url(app):
    return app.local_url


@pytest.fixture(scope="module")
def pool(app):
    return app.sessions.pool


@pytest.fixture(autouse=True)
def no_session_holds_models(pool):
    """Sessions of the previous test are freed as their clients disconnect; start from none."""
    assert wait_until(lambda: pool.sessions_holding() == 0)


def named(values, names):
    """An API result by output name (buttons are not part of the API's outputs)."""
    return dict(zip([n for n in names if n not in BUTTONS], values))


def wait_until(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_sessions_share_one_dense_model_are_capped_and_freed_on_close(url, pool, tiny_model_dir):
    a, b, c = (Client(url, verbose=False) for _ in range(3))
    try:
        load_tiny(a, tiny_model_dir)
        status = load_tiny(b, tiny_model_dir)[0]
        assert "Shared read-only with 1 other session" in status
        assert pool.sessions_holding() == 2
        assert "server is busy" in error_of(lambda: load_tiny(c, tiny_model_dir))
    finally:
        a.close()
        b.close()
    # Closing a client ends its heartbeat: the server frees its models at once, not in an hour.
    assert wait_until(lambda: pool.sessions_holding() == 0)
    try:
        assert load_tiny(c, tiny_model_dir)[0].startswith("✓ Loaded")
    finally:
        c.close()


def test_a_new_run_clears_the_previous_runs_results_and_locks_the_controls(url, tiny_model_dir, text_file, tmp_path):
    client = Client(url, verbose=False)
    try:
        load_tiny(client, tiny_model_dir)
        client.predict(*prune_args([text_file]), api_name="/prune")
        ppl = client.predict(2, api_name="/evaluate")
        assert "| pruned |" in ppl
        chat = client.predict("Hello", [], [], 4, True, 0.7, 0.9, 0, api_name="/chat")
        assert chat[1] and chat[2]
        message, report, _ = client.predict(str(tmp_path / "first"), False, api_name="/export")
        assert message.startswith("✓ Exported")
        assert set(json.loads(open(report["value"]).read())["generation_tokens_per_second"]) == {"dense", "pruned"}

        job = client.submit(*prune_args([text_file], pattern="2:4", nsamples=400, seqlen=128, batch_size=1),
                            api_name="/prune")
        first = named(next(iter(job)), PRUNE_OUTPUTS)
        # Everything measured on the previous model is gone the moment the new run starts...
        assert first["ppl_md"] == "" and first["dense_chat"] == [] and first["pruned_chat"] == []
        assert first["export_status"] == "" and first["report_file"]["visible"] is False and first["results"] == ""
        # ... and the server refuses what would disturb the run (the page disables those buttons too).
        assert wait_until(lambda: any("linear" in str(u[0]) for u in job.outputs()))
        assert "is pruning" in error_of(lambda: client.predict("Hi", [], [], 4, True, 0.7, 0.9, 0, api_name="/chat"))
        client.predict(api_name="/stop")
        final = named(job.result(), PRUNE_OUTPUTS)
        assert final["prune_status"].startswith("■ Stopped")
        assert "Prune the model first" in error_of(lambda: client.predict(2, api_name="/evaluate"))
    finally:
        client.close()


def test_perplexity_streams_windows_and_chat_says_waiting_stopped_and_empty(url, tiny_model_dir, text_file):
    client = Client(url, verbose=False)
    try:
        load_tiny(client, tiny_model_dir)
        client.predict(*prune_args([text_file]), api_name="/prune")
        job = client.submit(3, api_name="/evaluate")
        statuses = list(job)
        assert any("window 1/6" in s or "window 3/6" in s for s in statuses), statuses
        assert "| dense |" in job.result()

        empty = named(client.predict("   ", [], [], 4, True, 0.7, 0.9, 0, api_name="/chat"), CHAT_OUTPUTS)
        assert "Type a prompt first" in empty["chat_status"]

        job = client.submit("Tell me a long story.", [], [], 200, True, 0.7, 0.9, 0, api_name="/chat")
        for update in job:
            if update[2] and update[2][-1]["content"]:
                client.predict(api_name="/stop_chat")
                break
        assert wait_until(job.done)
        last = named(job.outputs()[-1], CHAT_OUTPUTS)
        assert "stopped" in last["pruned_stats"] and "done" not in last["pruned_stats"]
    finally:
        client.close()


def test_chat_does_not_wait_behind_another_sessions_prune(url, tiny_model_dir, text_file):
    pruner, chatter = Client(url, verbose=False), Client(url, verbose=False)
    try:
        load_tiny(pruner, tiny_model_dir)
        load_tiny(chatter, tiny_model_dir)
        chatter.predict(*prune_args([text_file]), api_name="/prune")
        long_run = pruner.submit(*prune_args([text_file], nsamples=400, seqlen=128, batch_size=1), api_name="/prune")
        assert wait_until(lambda: any("linear" in str(u[0]) for u in long_run.outputs()))
        reply = chatter.predict("Hi", [], [], 4, True, 0.7, 0.9, 0, api_name="/chat")
        assert reply[2][-1]["content"] and not long_run.done()  # answered while the other prune still ran
        pruner.predict(api_name="/stop")
        assert wait_until(long_run.done)
    finally:
        pruner.close()
        chatter.close()
