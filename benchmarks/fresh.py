"""Each benchmark setting in a Python process of its own, so that its memory figures and allocator state are its
own: the script runs itself with --one and the setting's arguments, and prints the result as JSON on its last
stdout line."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable, Iterable


def each_in_fresh_process(script: str, settings: Iterable[list[str]], out: str | None = None,
                          show: Callable[[dict], str] | None = json.dumps) -> list[dict]:
    """The results of `python script --one ARGS...` for each setting's ARGS, in order. After each one, `show` of it
    is printed and everything so far is written to `out`, so a stopped benchmark keeps what finished; a setting that
    fails prints its error and ends the benchmark with its exit status."""
    results = []
    for arguments in settings:
        done = subprocess.run([sys.executable, script, "--one", *arguments], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-5000:], file=sys.stderr)
            raise SystemExit(done.returncode)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if show is not None:
            print(show(results[-1]), flush=True)
        if out:
            with open(out, "w") as f:
                json.dump(results, f, indent=2)
    return results
