"""ALPS against the reference code's layer error, on a few linears of the built-in model.

Calibration: NSAMPLES x SEQLEN windows of the built-in corpus (PROTOCOL.md's sampling), run dense through the first
blocks; each chosen linear's H is taken on its block's dense inputs. For each linear and setting (50%, 70%, 2:4) it
prints and writes the relative reconstruction error ||XW^T - XŴ^T||^2 / ||XW^T||^2 (from H, undamped) of the
reference ALPS, ours, ours with the reference's layer-wide unstructured support, SparseGPT and Wanda, with seconds.

The reference is mazumder-lab/ALPS's alps.py, copied into a folder of your own and patched only to run on CPU
('cuda:0' -> 'cpu', torch.cuda.synchronize/empty_cache removed); it is never part of this repository.
Usage: python benchmarks/alps_check.py --reference /tmp/alps/ref [--out benchmarks/alps-check-cpu.json]
       [--linears 0.self_attn.q_proj 0.mlp.down_proj ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from wanda_gui.core.architecture import capture_block_inputs, find_blocks, find_linears  # noqa: E402
from wanda_gui.core.calibration import calibration_windows  # noqa: E402
from wanda_gui.core.masks import Pattern, Selection, select  # noqa: E402
from wanda_gui.core.methods.alps import alps_prune, normalize  # noqa: E402
from wanda_gui.core.methods.sparsegpt import inverse_hessian, sparsegpt_prune  # noqa: E402
from wanda_gui.core.methods.wanda import wanda_score  # noqa: E402
from wanda_gui.core.models import load_model  # noqa: E402
from wanda_gui.core.passes import collect_input_stats, run_block  # noqa: E402
from wanda_gui.core.statistics import Hessian  # noqa: E402

NSAMPLES, SEQLEN = 16, 256
SETTINGS = [("50%", 0.5, Pattern()), ("70%", 0.7, Pattern()), ("2:4", 0.5, Pattern(2, 4))]
LINEARS = ["0.self_attn.q_proj", "0.self_attn.o_proj", "0.mlp.up_proj", "0.mlp.down_proj"]


def layers(names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each named linear's dense weight and H (statistics.Hessian) on its block's dense inputs."""
    loaded = load_model("builtin")
    ids, _ = calibration_windows(loaded.tokenizer, "builtin", NSAMPLES, SEQLEN, 0)
    _, blocks = find_blocks(loaded.model)
    hidden, calls = capture_block_inputs(loaded.model, blocks, ids, 4, torch.device("cpu"))
    found = {}
    for index in range(1 + max(int(name.split(".")[0]) for name in names)):
        linears = find_linears(blocks[index])
        H = collect_input_stats(blocks[index], linears, hidden, calls[index], 4, None, Hessian)
        for name in names:
            if name.startswith(f"{index}."):
                local = name.split(".", 1)[1]
                found[name] = (linears[local].weight.detach().float().clone(), H[local].clone())
        run_block(blocks[index], hidden, calls[index], 4, None)
    return found


def relative_error(W: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
    D, W, H = (W - pruned).double(), W.double(), H.double()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


def reference(W, H, sparsity, pattern, ALPS_prune):
    linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    linear.weight.data = W.clone()
    solver = ALPS_prune(linear, 1, 1)
    solver.XtX = H.clone()  # the reference sums X^T X; H's scale is normalised away (damping is relative)
    solver.ALPS_admm(sparsity, pattern.n, pattern.m, rho=0.1)  # as llama.py calls it
    return linear.weight.data


def ours(W, H, sparsity, pattern, layerwise=False):
    weight = W.clone()
    alps_prune(weight, normalize(H), Selection(sparsity, pattern, layerwise=layerwise))
    return weight


def sparsegpt(W, H, sparsity, pattern):
    weight = W.clone()
    sparsegpt_prune(weight, inverse_hessian(H), sparsity, pattern)
    return weight


def wanda(W, H, sparsity, pattern):
    return W.masked_fill(select(wanda_score(W, H.diagonal()), Selection(sparsity, pattern)), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="folder holding the reference's alps.py, patched for CPU")
    parser.add_argument("--out", default="benchmarks/alps-check-cpu.json")
    parser.add_argument("--linears", nargs="+", default=LINEARS)
    args = parser.parse_args()
    sys.path.insert(0, args.reference)
    from alps import ALPS_prune  # the reference, from the folder given  # noqa: E402

    solvers = {"alps_reference": lambda W, H, s, p: reference(W, H, s, p, ALPS_prune), "alps": ours,
               "alps_layerwise": lambda W, H, s, p: ours(W, H, s, p, layerwise=not p.nm),
               "sparsegpt": sparsegpt, "wanda": wanda}
    rows = []
    for name, (W, H) in layers(args.linears).items():
        for label, sparsity, pattern in SETTINGS:
            row = {"linear": name, "shape": list(W.shape), "setting": label}
            for solver, run in solvers.items():
                start = time.perf_counter()
                pruned = run(W, H, sparsity, pattern)
                row[solver] = {"relative_error": relative_error(W, pruned, H),
                               "seconds": round(time.perf_counter() - start, 2),
                               "sparsity": float((pruned == 0).float().mean())}
            rows.append(row)
            print(name, label, "  ".join(f"{k} {row[k]['relative_error']:.3e} ({row[k]['seconds']}s)"
                                         for k in solvers), flush=True)
    result = {"calibration": {"source": "builtin", "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": 0},
              "device": "cpu", "threads": torch.get_num_threads(),
              "note": "relative error ||XW^T - XW'^T||^2 / ||XW^T||^2 from the undamped H; alps_layerwise: ours with "
                      "the reference's layer-wide unstructured support (ours proper prunes per row); seconds were "
                      "measured on 2 cores shared with other work",
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
