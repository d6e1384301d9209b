"""Block reconstruction's Adam schedule on a proxy of P1: the whole built-in model, METHOD at PATTERN with
reconstruction, NSAMPLES x 512 calibration (seed 0), perplexity on the first NWINDOWS evaluation windows.

How the fast setting's schedule was chosen (README, core/methods/reconstruct.py). Each setting runs in a fresh
process. A setting is JSON: Reconstruct's arguments (lr, epochs, batch_size, tolerance...), plus "schedule":
"cosine" (the app's: from lr down to 0), "constant" or "linear" (the alternatives measured), and "regions": true to
fit the attention and the MLP as separate regions instead of the whole block (LLaMA-like blocks).
Usage: python benchmarks/reconstruct_schedule.py [--method sparsegpt] [--pattern 2:4] [--nsamples 16]
       [--nwindows 16] SETTING...   e.g. '{"lr": 3e-4, "tolerance": 0.01, "epochs": 1, "schedule": "constant"}'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def variant(schedule: str, regions: bool):
    """Reconstruct with another learning-rate schedule, or with attention and MLP fitted as regions of their own."""
    import torch
    import torch.nn.functional as F

    from wanda_gui.core.architecture import out_in
    from wanda_gui.core.methods.reconstruct import Reconstruct, stalled

    class Stop(Exception):
        pass

    class Variant(Reconstruct):
        def dense_targets(self, ctx, module, call, hidden, block):
            if not regions:
                return super().dense_targets(ctx, module, call, hidden, block)
            seen = []
            handle = module.self_attn.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().float()))
            try:
                targets = super().dense_targets(ctx, module, call, hidden, block)
            finally:
                handle.remove()
            self.attention_targets = torch.cat(seen)
            return targets

        def optimise(self, loss_of, weights, keeps, n, seed):
            for w in weights.values():
                w.requires_grad_(True)
            optimizer = torch.optim.Adam(weights.values(), lr=self.lr)
            generator = torch.Generator().manual_seed(seed)
            size = self.batch_size
            orders = [torch.randperm(n, generator=generator) for _ in range(math.ceil(self.epochs))]
            batches = [o[s:s + size] for o in orders for s in range(0, n, size)]
            batches = batches[:math.ceil(self.epochs * math.ceil(n / size))]
            factor = {"cosine": lambda s: 0.5 * (1 + math.cos(math.pi * s / len(batches))),
                      "linear": lambda s: 1 - s / len(batches), "constant": lambda s: 1.0}[schedule]
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            losses = []
            try:
                with torch.enable_grad():
                    for rows in batches:
                        if stalled(losses, self.window, self.tolerance):
                            break
                        loss = loss_of(rows)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        for name, w in weights.items():
                            w.grad.mul_(keeps[name])
                        optimizer.step()
                        scheduler.step()
                        losses.append(float(loss.detach()))
            finally:
                self.steps.append(len(losses))
                for w in weights.values():
                    w.requires_grad_(False)

        def adam(self, ctx, module, call, hidden, targets, block, keeps):
            stored = {name: out_in(block.linears[name], keeps[name]) for name in block.linears}
            linears = {name: linear.weight for name, linear in block.linears.items()}
            if not regions:
                self.optimise(lambda rows: F.mse_loss(call(module, hidden[rows]).float(), targets[rows]), linears,
                              stored, len(hidden), block.index)
                return
            attention, caught = module.self_attn, []

            def catch(m, a, out):
                caught.append(out[0])
                raise Stop

            def attention_loss(rows):
                caught.clear()
                try:
                    call(module, hidden[rows])
                except Stop:
                    pass
                return F.mse_loss(caught[0].float(), self.attention_targets[rows])

            handle = attention.register_forward_hook(catch)
            try:
                self.optimise(attention_loss, {n: w for n, w in linears.items() if ".self_attn." in n}, stored,
                              len(hidden), block.index)
            finally:
                handle.remove()
            seen = []
            handle = attention.register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
            try:
                with torch.no_grad():
                    for s in range(0, len(hidden), ctx.batch_size):
                        call(module, hidden[s:s + ctx.batch_size])
            finally:
                handle.remove()
            fitted, current = torch.cat(seen), {}

            def mlp_loss(rows):
                current["rows"] = fitted[rows]
                return F.mse_loss(call(module, hidden[rows]).float(), targets[rows])

            attention.forward = lambda *args, **kwargs: (current["rows"], None)  # the fitted attention's outputs
            try:
                self.optimise(mlp_loss, {n: w for n, w in linears.items() if ".self_attn." not in n}, stored,
                              len(hidden), block.index + 1000)
            finally:
                del attention.forward

    return Variant


def run_setting(method: str, pattern: str, nsamples: int, nwindows: int, setting: dict) -> dict:
    from wanda_gui.core.calibration import calibration_windows
    from wanda_gui.core.config import PruneConfig
    from wanda_gui.core.engine import prune
    from wanda_gui.core.evaluate import perplexity
    from wanda_gui.core.masks import Pattern
    from wanda_gui.core.methods import OPTIONS
    from wanda_gui.core.models import load_model
    from wanda_gui.core.runs import drain

    arguments = dict(setting)
    schedule, regions = arguments.pop("schedule", "cosine"), arguments.pop("regions", False)
    step = variant(schedule, regions)(**arguments) if (schedule, regions) != ("cosine", False) else \
        OPTIONS["reconstruct"](**arguments)
    loaded = load_model("builtin", "cpu", None)
    windows, _ = calibration_windows(loaded.tokenizer, "builtin", nsamples, 512, 0)
    started = time.perf_counter()
    drain(prune(loaded.model, PruneConfig(method=method, pattern=Pattern.parse(pattern), restore_on_abort=False),
                windows, steps=(step,)))
    seconds = time.perf_counter() - started
    ppl = perplexity(loaded.model, loaded.tokenizer, seqlen=512, nwindows=nwindows).perplexity
    return {"method": method, "pattern": pattern, "nsamples": nsamples, "nwindows": nwindows, "setting": setting,
            "prune_seconds": round(seconds, 1), "adam_steps": sum(step.steps), "perplexity": round(ppl, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="JSON: Reconstruct's arguments, schedule, regions")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--nwindows", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one setting in this process
    args = parser.parse_args()
    if args.one:
        setting = json.loads(args.settings[0])
        print(json.dumps(run_setting(args.method, args.pattern, args.nsamples, args.nwindows, setting)))
        return 0
    results = []
    for setting in args.settings:
        cmd = [sys.executable, __file__, "--one", "--method", args.method, "--pattern", args.pattern,
               "--nsamples", str(args.nsamples), "--nwindows", str(args.nwindows), setting]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
