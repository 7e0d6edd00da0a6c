"""The GPU benchmarks in one run (about 8 minutes on one H100), each printing its own table:

1. SAE training steps (TopK and BatchTopK against sparsify, the dense references, ReLU and JumpReLU) at
   2048 x 65536, k 64, bf16 autocast, and at 576 x 4608, k 32, fp32 (`sae_training.py`);
2. the whole training loop against the bare step for a 768 x 6144, k 50 TopK SAE, batch 4096, on a synthetic cache
   written first (`trainer_loop.py --kinds synthetic`);
3. the cached-activation reader against a sequential read, batches landing on the GPU (`cache_reader.py`, when the
   quickstart cache exists; with rows for a cache written shuffled when `.lm_saes/bench/shuffled-1d` exists);
4. feature analysis against encode-only at 256 contexts per batch (`analysis.py`).

Each part runs in its own process with its own time limit, so one that fails or hangs does not stop the others; the
exit status is non-zero when any failed.

    python benchmarks/gpu_suite.py             # on a CUDA machine
    python benchmarks/gpu_suite.py --smoke     # tiny sizes on the CPU: checks that every part runs (a minute or two)
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).parent
QUICKSTART_CACHE = Path(".lm_saes/quickstart/activations")


def parts(smoke: bool) -> list[tuple[str, list[str], int]]:
    """(title, script and arguments, time limit in seconds) of every part, at full or smoke size."""
    device = "cpu" if smoke else "cuda"
    if smoke:
        big = ["--d-model", "64", "--d-sae", "512", "--k", "8", "--batch", "256", "--steps", "2", "--repeats", "1"]
        small = ["--d-model", "32", "--d-sae", "256", "--k", "4", "--batch", "128", "--steps", "2", "--repeats", "1"]
        loop = ["--d-model", "64", "--d-sae", "512", "--k", "8", "--batch", "256", "--steps", "4", "--rounds", "1"]
        analysis = ["--contexts", "32", "--batch", "16", "--repeats", "1"]
        reader = ["--rounds", "1"]
    else:
        big = ["--d-model", "2048", "--d-sae", "65536", "--k", "64", "--amp", "bf16"]
        small = []
        loop = ["--d-model", "768", "--d-sae", "6144", "--k", "50", "--batch", "4096", "--steps", "40", "--rounds", "3"]
        analysis = ["--contexts", "4096", "--batch", "256", "--repeats", "3"]
        reader = ["--rounds", "3"]
    selected = [
        ("SAE training steps, 2048 x 65536, k 64", ["sae_training.py", "--device", device, *big], 150),
        ("SAE training steps, 576 x 4608, k 32", ["sae_training.py", "--device", device, *small], 90),
        (
            "Training loop vs bare step, 768 x 6144, k 50",
            ["trainer_loop.py", "--kinds", "synthetic", "--without-prefetch", "--device", device, *loop],
            180,
        ),  # fmt: skip
        ("Feature analysis, batches of 256 contexts", ["analysis.py", "--device", device, *analysis], 90),
    ]
    if (QUICKSTART_CACHE / "manifest.json").exists():
        selected.insert(3, ("Cached-activation reader", ["cache_reader.py", "--device", device, *reader], 60))
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: does every part run?")
    args = parser.parse_args()
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke to check the parts on the CPU")
    outcomes = []
    for title, (script, *arguments), limit in parts(args.smoke):
        title = f"{title} (smoke: tiny sizes, CPU)" if args.smoke else title
        print(f"\n=== {title}: {script} {' '.join(arguments)} (limit {limit} s)", flush=True)
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], timeout=limit)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit} s"
        outcomes.append((title, status, time.perf_counter() - started))
    print("\n=== summary")
    for title, status, seconds in outcomes:
        print(f"{title:55s} {status:25s} {seconds:6.0f} s")
    if any(status != "ok" for _, status, _ in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
