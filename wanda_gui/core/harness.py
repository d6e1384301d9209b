"""lm-evaluation-harness on a model already in memory: tasks found by name (its catalogue, or a folder of the user's
own task YAMLs), their datasets read before any model pass, then evaluated one task at a time with progress.

The model is neither reloaded nor moved, and is left as it was found: HFLM calls model.eval() (kept for the
evaluation, undone after) and model.tie_weights() (undone at once: it would re-tie a head untied on purpose), and sets
a pad token on the tokenizer it is given (a copy). The caller's global random generators go on as if nothing ran
(building a task draws from Python's; lm_eval.evaluate, unlike its simple_evaluate, reseeds none).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import logging
import random
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import lm_eval
import numpy as np
import torch
from lm_eval.api.model import CacheHook
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from .errors import UserError
from .zeroshot import WANDA_TASKS, TaskProgress, TaskResult, TaskSpec, ZeroShot

# Its warnings speak to its own command line (a model passed as an object, --limit "only for testing"); ours say
# what matters to our users.
logging.getLogger("lm_eval").setLevel(logging.ERROR)

BATCH_SIZE = 8  # requests per forward: a batch of logits is batch x tokens x vocabulary floats
FEWSHOT_SEED = 1234  # lm_eval's default: which few-shot examples a task draws (when num_fewshot > 0)
BOOTSTRAP_ITERS = 1000  # accuracy's stderr has a closed form; this bounds the bootstrap of any other metric
SCORED = ("multiple_choice", "loglikelihood")  # output types whose accuracy is measured from log-likelihoods
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # datasets' readers of local files
HARNESS = f"lm-evaluation-harness {lm_eval.__version__}"
LISTING = "`wanda-gui eval --list-tasks [--tasks-dir DIR]` lists them"


@functools.lru_cache(maxsize=1)
def catalogue() -> TaskManager:
    """lm-evaluation-harness's own tasks: indexing its ~15k YAMLs takes seconds, so once per process."""
    return TaskManager()


def folder_tasks(folder: Path) -> TaskManager:
    """The user's own task YAMLs alone (read afresh: they may have been edited); instant."""
    return TaskManager(include_path=str(folder), include_defaults=False)


def find_tasks(spec: TaskSpec) -> dict[str, TaskManager]:
    """Which index each name is in (the user's folder first, then the catalogue, indexed only when a name is not
    in the folder); unknown names, groups and tags refused in one line."""
    own = folder_tasks(spec.folder) if spec.folder is not None else None
    found = {name: own for name in spec.names if own is not None and name in own.task_index}
    builtin = catalogue() if len(found) < len(spec.names) else None
    found |= {name: builtin for name in spec.names if name not in found and name in builtin.task_index}
    unknown = [name for name in spec.names if name not in found]
    if unknown:
        known = [*(own.all_subtasks if own is not None else ()), *builtin.all_subtasks]
        close = [match for name in unknown for match in difflib.get_close_matches(name, known, n=1, cutoff=0.8)]
        guess = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"Unknown zero-shot task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                        f"{guess}: name lm-evaluation-harness tasks (the Wanda paper's: {','.join(WANDA_TASKS)}) or "
                        f"tasks of your tasks folder; {LISTING}.")
    for name, manager in found.items():
        if name in manager.all_tags or name in manager.all_groups:
            members = [task for task in manager.all_subtasks if name in manager.task_index[task].tags]
            listed = f" ({','.join(members[:8])}{',…' if len(members) > 8 else ''})" if members else ""
            raise UserError(f"{name!r} is a {'tag' if name in manager.all_tags else 'group'} of several tasks: name "
                            f"its tasks one by one{listed}, so that each gets its own accuracy.")
    return found


def list_tasks(folder: Path | None) -> list[str]:
    """Every task name that find_tasks accepts: the folder's first, then the catalogue's."""
    return [*(folder_tasks(folder).all_subtasks if folder is not None else ()), *catalogue().all_subtasks]


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """The caller's global generators (Python's, numpy's, torch's) go on as if nothing ran in between (building a
    task draws from Python's)."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def modes_kept(model: torch.nn.Module) -> Iterator[None]:
    """Each module's train/eval mode as it was (HFLM calls model.eval(), which the evaluation needs)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def parameters_kept(model: torch.nn.Module) -> Iterator[None]:
    """Each parameter in its place as it was: HFLM calls model.tie_weights(), which would put the input embeddings
    into a head that was untied on purpose."""
    places = [(module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)]
    try:
        yield
    finally:
        for module, name, p in places:
            if getattr(module, name) is not p:
                setattr(module, name, p)


def dataset_message(name: str, config: dict, error: Exception) -> str:
    """One line naming the task, its dataset (id and config) and how to get it."""
    path, subset = config.get("dataset_path"), config.get("dataset_name")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if path is None or path in LOCAL_BUILDERS or Path(str(path)).exists():
        return f"Zero-shot task {name!r} could not read its data ({reason}); check the data files its YAML names."
    call = f"datasets.load_dataset({path!r}{f', {subset!r}' if subset else ''})"
    return (f"Zero-shot task {name!r} needs the dataset {path}{f' (config {subset})' if subset else ''}, which is not "
            f"in the local Hugging Face datasets cache and could not be fetched ({reason}); where there is internet, "
            f"run {call} once to cache it, then run again here.")


class PreparedTasks:
    """The spec's tasks built and their datasets read (before any model pass), ready to evaluate any number of
    models on the same examples."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.tasks: dict[str, Task] = {}
        with random_state_kept():
            for name, manager in find_tasks(spec).items():
                try:
                    task = manager.load([name])["tasks"][name]
                except OSError as e:  # offline and not cached, no such dataset, a data file missing
                    raise UserError(dataset_message(name, manager.task_index[name].cfg or {}, e)) from None
                except (ValueError, KeyError, TypeError) as e:  # a YAML that lm_eval cannot make a task of
                    raise UserError(f"Zero-shot task {name!r} could not be set up from its YAML: {e}") from None
                scored_by = sorted(task.aggregation())
                if task.get_config("output_type") not in SCORED or "acc" not in scored_by:
                    raise UserError(f"Zero-shot task {name!r} is not scored by accuracy (output type "
                                    f"{task.get_config('output_type')}, metrics {', '.join(scored_by)}): wanda_gui "
                                    f"measures multiple-choice accuracy, e.g. {','.join(WANDA_TASKS)}.")
                self.tasks[name] = task

    def evaluate(self, model: torch.nn.Module, tokenizer, progress: Callable[[TaskProgress], None] | None = None,
                 cancel: threading.Event | None = None) -> ZeroShot:
        """Each task in turn on `model` where it lies, progress after every request answered; cancel (set) stops it
        within a batch, with a UserError."""
        results = []
        with modes_kept(model):
            with parameters_kept(model):  # before any model pass: the model is evaluated as it was
                lm = QuietLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=BATCH_SIZE)
            for number, (name, task) in enumerate(self.tasks.items()):
                counting = Counting(TaskProgress(name, number, len(self.tasks), 0, 0), lm, progress, cancel)
                counting.report()
                lm.set_cache_hook(counting)
                task.set_config(key="num_fewshot", value=self.spec.num_fewshot)
                task.set_fewshot_seed(seed=FEWSHOT_SEED)  # the same examples for every model evaluated
                started = time.perf_counter()
                out = lm_eval.evaluate(lm=lm, task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}},
                                       limit=self.spec.limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
                results.append(task_result(name, out, time.perf_counter() - started))
        return ZeroShot(results, self.spec.num_fewshot, self.spec.limit, HARNESS)


class QuietLM(HFLM):
    """HFLM without its progress bars on stderr: progress comes from its cache hook instead."""

    requests = 0  # the log-likelihood requests of the task being evaluated

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.requests = len(requests)
        return super().loglikelihood(requests, disable_tqdm=True)


class Counting(CacheHook):
    """lm_eval hands every request it has answered to the model's cache hook: counted here, for progress and Stop."""

    def __init__(self, where: TaskProgress, lm: QuietLM, progress: Callable[[TaskProgress], None] | None,
                 cancel: threading.Event | None):
        super().__init__(None)
        self.where, self.lm, self.progress, self.cancel = where, lm, progress, cancel

    def report(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise UserError("Evaluation stopped.")
        if self.progress is not None:
            self.progress(self.where)

    def add_partial(self, attr, req, res) -> None:
        self.where = dataclasses.replace(self.where, done=self.where.done + 1, total=self.lm.requests)
        self.report()


def task_result(name: str, out: dict, seconds: float) -> TaskResult:
    """One task's accuracy from lm_eval's results (keys "metric,filter"; a stderr it could not compute is "N/A")."""
    metrics = out["results"][name]

    def value(key: str) -> float | None:
        found = metrics.get(f"{key},none")
        return float(found) if isinstance(found, (int, float)) else None

    return TaskResult(name, value("acc"), value("acc_stderr"), value("acc_norm"), value("acc_norm_stderr"),
                      int(out["n-samples"][name]["effective"]), seconds)
