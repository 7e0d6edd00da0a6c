"""A training run's logged metrics kept beside its weights (`training_log.jsonl`, one line per logged step) and drawn
as `training_curves.svg` when the run ends: loss, explained variance, L0 and the fraction of features that did not
fire in the logging window. The trainer logs to a `RunLog` as it would to W&B; the run log forwards to W&B too.

A resumed run appends: it logs the steps after its checkpoint again, and a reader keeps the last line of each step,
which is the resumed run's (the same numbers, bit for bit on CPU)."""

import json
from pathlib import Path
from typing import Any

from lm_saes_core.io import atomic_write_text
from lm_saes_core.plots import curves_svg

LOG_FILE = "training_log.jsonl"
CURVES_FILE = "training_curves.svg"
CURVES = {
    "loss": "losses/overall_loss",
    "explained variance": "metrics/explained_variance",
    "L0 (active features per token)": "metrics/l0",
    "fraction of features silent in the window": "sparsity/below_1e-7",
}


class RunLog:
    """Appends each logged step's metrics to `<output>/training_log.jsonl` and forwards them to `wandb_run`."""

    def __init__(self, output: str | Path, n_features: int, wandb_run: Any = None):
        self.path = Path(output) / LOG_FILE
        self.n_features = n_features
        self.wandb_run = wandb_run

    @property
    def id(self) -> str | None:
        """The W&B run's id (what checkpoints record), None without W&B."""
        return getattr(self.wandb_run, "id", None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "n_features": self.n_features, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)


def read_training_log(output: str | Path) -> list[dict[str, float]]:
    """The logged steps in step order, the last line of each step winning (a resumed run re-logs its steps)."""
    path = Path(output) / LOG_FILE
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def write_training_curves(output: str | Path, title: str) -> Path | None:
    """Draw `training_curves.svg` from the run's log; None when nothing was logged."""
    records = read_training_log(output)
    if not records:
        return None
    panels = {}
    for name, key in CURVES.items():
        scale = key.startswith("sparsity/")  # a count of features, drawn as their fraction
        panels[name] = [(r["step"], r[key] / max(r["n_features"], 1) if scale else r[key]) for r in records if key in r]
    path = Path(output) / CURVES_FILE
    atomic_write_text(path, curves_svg(title, panels, log_y=["loss"]))
    return path
