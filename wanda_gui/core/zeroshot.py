"""Zero-shot accuracy beside perplexity: which tasks are asked for, what was measured, and how it reads.

The measuring itself (lm-evaluation-harness on a model already in memory) is core.harness, which callers import only
when tasks are asked for: lm_eval brings datasets, pyarrow and pandas, about 120 MB and 0.7 s that a run or a server
without zero-shot tasks should not pay. This module stays light.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import UserError

# The seven tasks of the Wanda paper's zero-shot table (lm-evaluation-harness names).
WANDA_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def task_names(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated (or listed) task names, each once, in the order given."""
    parts = text.split(",") if isinstance(text, str) else text
    return tuple(dict.fromkeys(part.strip() for part in parts if part.strip()))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Which tasks, from lm-evaluation-harness's catalogue or a folder of the user's own task YAMLs, and how many
    of their examples (None: all), with how many few-shot examples (0 by default)."""

    names: tuple[str, ...]
    folder: Path | None = None
    limit: int | None = None
    num_fewshot: int = 0

    def __post_init__(self):
        """What needs neither a model nor the harness."""
        if not self.names:
            raise UserError(f"Name at least one zero-shot task, e.g. {','.join(WANDA_TASKS)} (the Wanda paper's).")
        if self.folder is not None and not Path(self.folder).is_dir():
            raise UserError(f"The tasks folder {self.folder} is not a folder; give the folder that holds your "
                            "lm-eval task YAMLs.")
        if self.limit is not None and (int(self.limit) != self.limit or self.limit < 1):
            raise UserError(f"The examples per task must be a whole number of at least 1; got {self.limit!r}.")
        if int(self.num_fewshot) != self.num_fewshot or self.num_fewshot < 0:
            raise UserError(f"The few-shot examples must be a whole number of at least 0; got {self.num_fewshot!r}.")


@dataclasses.dataclass
class TaskResult:
    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None  # only for tasks whose YAML scores it (length-normalised choice)
    acc_norm_stderr: float | None
    examples: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class TaskProgress:
    """Where an evaluation is: task `number` (from 0) of `tasks`, `done` of its `total` requests (0 of 0 while its
    requests are being built)."""

    task: str
    number: int
    tasks: int
    done: int
    total: int

    def __str__(self) -> str:
        requests = f": {self.done}/{self.total} requests" if self.total else ""
        return f"{self.task} ({self.number + 1}/{self.tasks}){requests}"


@dataclasses.dataclass
class ZeroShot:
    """One model's accuracy on each task, and their mean (the Wanda paper's last column)."""

    tasks: list[TaskResult]
    num_fewshot: int
    limit: int | None
    harness: str  # e.g. "lm-evaluation-harness 0.4.13"

    @property
    def mean_acc(self) -> float:
        return sum(t.acc for t in self.tasks) / len(self.tasks)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.tasks)

    def as_dict(self) -> dict:
        """Plain JSON-able data, as reports and --json carry it."""
        return {"harness": self.harness, "num_fewshot": self.num_fewshot, "limit": self.limit,
                "tasks": {t.task: {k: v for k, v in dataclasses.asdict(t).items() if k != "task"} for t in self.tasks},
                "mean_acc": self.mean_acc, "seconds": self.seconds}
