"""Data-parallel scaling: one dictionary item of a pipeline trained by 1 process and by N (torchrun), side by side in
one run, on the pipeline's activation cache (made if missing).

    python benchmarks/data_parallel.py                          # the quickstart's topk-k32 item, 1 vs 2 processes
    python benchmarks/data_parallel.py --nproc 4 --tokens 2000000 --device cuda   # on a machine with 4 GPUs

Each run is `python -m lm_saes_core.pipes_entry train` (under `torchrun --nproc-per-node N` for N > 1), timed from
launch to exit, so model-free start-up (imports, initialisation) is included; tokens/s counts trained tokens. On a
CPU the processes share the cores (torch threads per process = cores / N), so this shows the overhead of the
collectives, not a speed-up; on GPUs it shows the scaling.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lm_saes_core.runners import generate_activations
from lm_saes_dagster.launch import torchrun_command
from lm_saes_dagster.pipeline_config import load_pipeline
from lm_saes_dagster.settings import generate_settings, train_settings

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=ROOT / "configs/pipelines/quickstart.yaml")
    parser.add_argument("--cache", type=Path, default=ROOT / ".lm_saes/pipelines/quickstart/activations/all-hooks")
    parser.add_argument("--item", default="topk-k32")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=409600, help="training tokens (default: 100 steps of 4096)")
    parser.add_argument("--device", default=None, help="the dictionary's device (default: the item's)")
    args = parser.parse_args()
    cfg = load_pipeline(args.pipeline)
    cache = generate_activations(generate_settings(cfg, args.cache))
    item = cfg.dictionaries[args.item]
    item.trainer.total_training_tokens = args.tokens
    if args.device:
        item.sae.device = args.device
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    rows = []
    try:
        for nproc in (1, args.nproc):
            item.data_parallel_size = nproc
            output = work / f"nproc{nproc}"
            settings = train_settings(cfg, args.item, item, cache.output_dir, output)
            settings_file = work / f"nproc{nproc}.json"
            settings_file.write_text(json.dumps(settings.model_dump(mode="json")))
            env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // nproc, 1))}
            started = time.perf_counter()
            subprocess.run(torchrun_command("train", settings_file, nproc), check=True, env=env, cwd=ROOT)
            seconds = time.perf_counter() - started
            result = json.loads((output / "train_result.json").read_text())
            rows.append((nproc, seconds, result["n_tokens"], result["last_metrics"]["metrics/explained_variance"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.item}: {args.tokens:,} tokens, {cores} cores")
    print(f"{'processes':>9} {'seconds':>8} {'tokens/s':>10} {'speed-up':>9} {'EV (rank 0)':>12}")
    for nproc, seconds, n_tokens, explained in rows:
        speed_up = rows[0][1] / seconds
        print(f"{nproc:>9} {seconds:>8.1f} {n_tokens / seconds:>10,.0f} {speed_up:>8.2f}x {explained:>12.3f}")


if __name__ == "__main__":
    sys.exit(main())
