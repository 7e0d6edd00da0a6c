"""Start-up cost of a step's process: what `python -m lm_saes_core.pipes_entry RUNNER` (every Dagster step, every
torchrun rank) and `lm-saes COMMAND` pay before any work, each row a fresh interpreter, best of --repeats.

Rows: torch alone (the floor), one runner's settings class as the Pipes entry point imports it, every runner at once
(what each step paid while the runners package imported all of them), and the model's shape read before a run
(config.json as JSON vs transformers' AutoConfig, which a run from cached activations otherwise imports only for it).

    .venv/bin/python benchmarks/startup.py [--repeats 5]
"""

import argparse
import subprocess
import sys
import time

RUNNERS = ("train", "analyze", "evaluate", "dla", "generate")
ROWS: dict[str, str] = {
    "import torch (floor)": "import torch",
    **{
        f"pipes_entry + the {name} runner": (
            f"from lm_saes_core.pipes_entry import RUNNERS; RUNNERS[{name!r}].settings_class()"
        )
        for name in RUNNERS
    },
    "pipes_entry + every runner (before)": (
        "from lm_saes_core.pipes_entry import RUNNERS\nfor runner in RUNNERS.values(): runner.settings_class()"
    ),
    "model shape from config.json (JSON)": (
        "from lm_saes_core.backend import LanguageModelConfig, read_model_shape\n"
        "read_model_shape(LanguageModelConfig(model_name='smollm2-135m'))"
    ),
    "model shape from config.json (AutoConfig)": (
        "from lm_saes_core.backend import LanguageModelConfig, _auto_config, resolve_model_dir\n"
        "_auto_config(resolve_model_dir(LanguageModelConfig(model_name='smollm2-135m')))"
    ),
}


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
    times = {row: seconds(code, args.repeats) for row, code in ROWS.items()}
    before = times["pipes_entry + every runner (before)"]
    auto = times["model shape from config.json (AutoConfig)"]
    print(f"{'process':<44} {'seconds':>8} {'speed-up':>9}")
    for row, value in times.items():
        baseline = auto if row.startswith("model shape") else before
        print(f"{row:<44} {value:8.2f} {baseline / value:8.2f}x")
    print("speed-up: against every runner imported (runner rows) or AutoConfig (shape rows), measured in this run")


if __name__ == "__main__":
    main()
