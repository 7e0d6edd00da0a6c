"""Start-up cost of a step's process: what `python -m lm_saes_core.pipes_entry RUNNER` (every Dagster step, every
torchrun rank) and `lm-saes COMMAND` pay before any work, each row a fresh interpreter, best of --repeats.

Each row runs what a process does now beside what it did before, in the same run: a runner's settings class as the
Pipes entry point imports it, against every runner plus `datasets` and torch's distributed checkpoint/DTensor (which
the runners package and `training` imported eagerly); the model's shape read before a run, config.json as JSON
against transformers' AutoConfig (which a run from cached activations otherwise imports only for it).

    .venv/bin/python benchmarks/startup.py [--repeats 5]
"""

import argparse
import subprocess
import sys
import time

RUNNERS = ("train", "analyze", "evaluate", "dla", "generate")
EAGER = "import datasets, torch.distributed.checkpoint, torch.distributed.tensor\n"
"""What every step's process imported before it needed them (each now loads where it is used)."""
EVERY_RUNNER = "for runner in RUNNERS.values(): runner.settings_class()\n"
SHAPE = "from lm_saes_core.backend import LanguageModelConfig, _auto_config, read_model_shape, resolve_model_dir\n"
SMOLLM2 = "LanguageModelConfig(model_name='smollm2-135m')"
ROWS: dict[str, tuple[str, str]] = {
    f"pipes_entry + the {name} runner": (
        f"from lm_saes_core.pipes_entry import RUNNERS; RUNNERS[{name!r}].settings_class()",
        f"from lm_saes_core.pipes_entry import RUNNERS\n{EAGER}{EVERY_RUNNER}",
    )
    for name in RUNNERS
} | {
    "model shape before a run": (
        f"{SHAPE}read_model_shape({SMOLLM2})",
        f"{SHAPE}_auto_config(resolve_model_dir({SMOLLM2}))",
    ),
}
"""row -> (what the process runs now, what it ran before: every runner and the eager imports; AutoConfig)."""


def seconds(code: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    floor = seconds("import torch", args.repeats)
    header = f"process (fresh interpreter, best of {args.repeats})"
    print(f"{header:<40} {'now s':>7} {'before s':>9} {'speed-up':>9}")
    print(f"{'import torch (the floor)':<40} {floor:7.2f}")
    for row, (now, before) in ROWS.items():
        now_s, before_s = seconds(now, args.repeats), seconds(before, args.repeats)
        print(f"{row:<40} {now_s:7.2f} {before_s:9.2f} {before_s / now_s:8.2f}x")


if __name__ == "__main__":
    main()
