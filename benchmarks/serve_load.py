"""Load benchmark of the served app: three API sessions load the built-in model, prune, chat and close.

Reports the server process's RSS after each step and 60 s after the last session closed, and the first-token latency
of a chat sent while another session prunes. Targets (issue 7, 2-core CPU): memory back within 25% of one session's
level after all close; that first token within 5 s.

    python benchmarks/serve_load.py [--out benchmarks/serve-load-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")

import psutil  # noqa: E402
from gradio_client import Client  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = "Built-in (SmolLM2-135M-Instruct)"
CORPUS = "Built-in corpus (State of the Union, 1900-1999)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_gib(process: psutil.Process) -> float:
    return round(process.memory_info().rss / 2**30, 3)


def prune(client: Client, nsamples: int, seqlen: int):
    return client.submit("Wanda", 0.5, "unstructured", "1:4", CORPUS, [], "", nsamples, seqlen, 0, "", "", False, 0, False,
                         api_name="/prune")


def first_token_seconds(client: Client, prompt: str) -> float:
    """Seconds from sending a chat to the first streamed text in the pruned column."""
    started = time.perf_counter()
    job = client.submit(prompt, [], [], 32, True, 0.7, 0.9, 0, api_name="/chat")
    for update in job:
        if update[2] and update[2][-1]["content"]:
            seconds = time.perf_counter() - started
            break
    job.result()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "serve-load-cpu.json"))
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()

    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    process = psutil.Process(server.pid)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                Client(url, verbose=False).close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        steps = [{"step": "server started", "rss_gib": rss_gib(process)}]

        def record(step: str, **extra) -> None:
            steps.append({"step": step, "rss_gib": rss_gib(process), **extra})
            print(f"{step:<48} RSS {steps[-1]['rss_gib']:.2f} GiB {extra or ''}", flush=True)

        clients = []
        for i in range(args.sessions):
            client = Client(url, verbose=False)
            clients.append(client)
            client.predict(BUILTIN, "", "", "", "", False, "cpu", "auto", api_name="/load")
            record(f"session {i + 1}: loaded")
            prune(client, args.nsamples, args.seqlen).result()
            record(f"session {i + 1}: pruned")
            client.predict("What is the capital of France?", [], [], 24, True, 0.7, 0.9, 0, api_name="/chat")
            record(f"session {i + 1}: chatted")
        one_session = next(s["rss_gib"] for s in steps if s["step"] == "session 1: chatted")

        # A chat's first token while another session prunes (P1-sized, long enough to overlap).
        busy = prune(clients[0], 64, 512)
        while not any("linear" in str(u[0]) for u in busy.outputs()):
            time.sleep(0.2)
        latency = first_token_seconds(clients[1], "Name three colours.")
        still_pruning = not busy.done()
        record("chat while another session prunes", first_token_seconds=round(latency, 2),
               other_prune_still_running=still_pruning)
        busy.result()

        for i, client in enumerate(clients):
            client.close()
            time.sleep(2)
            record(f"session {i + 1}: closed")
        time.sleep(60)
        record("60 s after the last close")
        after = steps[-1]["rss_gib"]
        result = {
            "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "sessions": args.sessions, "calibration": f"{args.nsamples} x {args.seqlen}",
            "steps": steps,
            "one_session_rss_gib": one_session,
            "after_all_closed_rss_gib": after,
            "after_vs_one_session": round(after / one_session, 3),
            "chat_first_token_while_pruning_s": round(latency, 2),
            "targets": {"after_vs_one_session_max": 1.25, "first_token_s_max": 5.0},
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
