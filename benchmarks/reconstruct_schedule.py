"""Block reconstruction's Adam schedule on a proxy of P1: the whole built-in model, METHOD at PATTERN with
reconstruction, NSAMPLES x 512 calibration (seed 0), perplexity on the first NWINDOWS evaluation windows.

How the fast setting's schedule was chosen (README, core/methods/reconstruct.py). Each setting runs in a fresh
process. A setting is JSON: Reconstruct's arguments (lr, epochs, batch_size...), plus "schedule":
"cosine" (the app's: from lr down to 0), "constant" or "linear" (the alternatives measured), "regions": true to
fit the attention and the MLP as separate regions instead of the whole block (LLaMA-like blocks), "only": "mlp" to
train only the linears so named (the others refitted only: no backward through the attention), "mlp_epochs": N
(and "mlp_lr") for N more epochs of Adam on the MLP alone after the block's, the attention stubbed with its cached
outputs (LLaMA-like blocks), and "bf16": false to run Adam in fp32 where the device has bf16 (Reconstruct's own
argument, as every other key). Since 2026-12-08 every Adam step on the block is followed by one on its MLP alone:
add "mlp_steps": 0 to repeat the settings measured before.
Usage: python benchmarks/reconstruct_schedule.py [--method sparsegpt] [--pattern 2:4] [--nsamples 16]
       [--nwindows 16] SETTING...   e.g. '{"lr": 3e-4, "epochs": 1, "schedule": "constant"}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fresh import each_in_fresh_process  # benchmarks/ is on sys.path when a script here runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def variant(schedule: str, regions: bool, only: str, mlp_epochs: float = 0, mlp_lr: float | None = None):
    """Reconstruct with another learning-rate schedule, with attention and MLP fitted as regions of their own, with
    Adam on the linears whose name holds `only` (the rest refitted but not trained), or with `mlp_epochs` more on the
    MLP alone (at `mlp_lr`, else lr), the attention held at what the block's epochs left."""
    import torch
    import torch.nn.functional as F

    from wanda_gui.core.methods.reconstruct import Reconstruct

    class Stop(Exception):
        pass

    class Variant(Reconstruct):
        def rate(self, step, steps):
            if schedule == "linear":
                return 1 - step / steps
            return 1.0 if schedule == "constant" else super().rate(step, steps)

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

        def adam(self, ctx, module, call, hidden, targets, block, keeps):
            mlp = {name: linear for name, linear in block.linears.items() if ".self_attn." not in name}
            if mlp_epochs:
                super().adam(ctx, module, call, hidden, targets, block, keeps)
                epochs, lr = self.epochs, self.lr
                self.epochs, self.lr = mlp_epochs, mlp_lr or self.lr
                try:
                    return self.mlp_on_fitted_attention(ctx, module, call, hidden, targets, mlp, keeps, block.index)
                finally:
                    self.epochs, self.lr = epochs, lr
            if only:
                linears = {name: linear for name, linear in block.linears.items() if only in name}
                return self.optimise(ctx, [lambda rows: F.mse_loss(call(module, hidden[rows]).float(), targets[rows])],
                                     linears, keeps, len(hidden), block.index)
            if not regions:
                return super().adam(ctx, module, call, hidden, targets, block, keeps)
            caught = []

            def catch(m, a, out):
                caught.append(out[0])
                raise Stop  # the attention's output is all this region needs: the MLP is not run

            def attention_loss(rows):
                caught.clear()
                try:
                    call(module, hidden[rows])
                except Stop:
                    pass
                return F.mse_loss(caught[0].float(), self.attention_targets[rows])

            attention = {name: linear for name, linear in block.linears.items() if name not in mlp}
            handle = module.self_attn.register_forward_hook(catch)
            try:
                self.optimise(ctx, [attention_loss], attention, keeps, len(hidden), block.index)
            finally:
                handle.remove()
            self.mlp_on_fitted_attention(ctx, module, call, hidden, targets, mlp, keeps, block.index)

        def mlp_on_fitted_attention(self, ctx, module, call, hidden, targets, mlp, keeps, index):
            """Adam on the MLP's linears, the attention stubbed with its outputs as fitted (computed once)."""
            attention, seen = module.self_attn, []
            handle = attention.register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
            try:
                with torch.no_grad(), self.autocast(ctx.device):
                    for s in range(0, len(hidden), ctx.batch_size):
                        call(module, hidden[s:s + ctx.batch_size])
            finally:
                handle.remove()
            fitted, current = torch.cat(seen), {}

            def mlp_loss(rows):
                current["rows"] = fitted[rows]
                return F.mse_loss(call(module, hidden[rows]).float(), targets[rows])

            attention.forward = lambda *args, **kwargs: (current["rows"], None)
            try:
                self.optimise(ctx, [mlp_loss], mlp, keeps, len(hidden), index + 1000)
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
    only = arguments.pop("only", "")
    mlp_epochs, mlp_lr = arguments.pop("mlp_epochs", 0), arguments.pop("mlp_lr", None)
    step = variant(schedule, regions, only, mlp_epochs, mlp_lr)(**arguments) \
        if (schedule, regions, only, mlp_epochs) != ("cosine", False, "", 0) else \
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
    each_in_fresh_process(__file__, ([
        "--method", args.method, "--pattern", args.pattern, "--nsamples", str(args.nsamples),
        "--nwindows", str(args.nwindows), setting] for setting in args.settings), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
