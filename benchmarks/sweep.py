"""Sweep vs one run per item: the dictionary items of a pipeline that share a hook, trained on its activation cache
one after the other (`train_sae` each) and together from one stream (`sweep_sae`), side by side in one run.

    python benchmarks/sweep.py                       # the quickstart pipeline's items, its cache (made if missing)
    python benchmarks/sweep.py --tokens 200000       # shorter: every item trains on this many tokens

Prints wall time, tokens trained per second (all items together) and the ratio to the sequential runs, and checks
that each item's weights are the same both ways.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lm_saes_core.models import load_sparse_dictionary
from lm_saes_core.runners import generate_activations
from lm_saes_core.runners.train import sweep_sae, train_sae
from lm_saes_dagster.pipeline_config import load_pipeline
from lm_saes_dagster.settings import generate_settings, stream_groups, sweep_settings, train_settings

ROOT = Path(__file__).resolve().parents[1]


def cache_for(cfg, root: Path) -> Path:
    """The pipeline's activation cache as the Dagster asset makes it (reused when its settings match)."""
    return generate_activations(generate_settings(cfg, root)).output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=ROOT / "configs/pipelines/quickstart.yaml")
    parser.add_argument("--cache", type=Path, default=ROOT / ".lm_saes/pipelines/quickstart/activations/all-hooks")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per item (default: the item's)")
    args = parser.parse_args()
    cfg = load_pipeline(args.pipeline)
    cache = cache_for(cfg, args.cache)
    items = dict(cfg.dictionaries)
    if args.tokens:
        for item in items.values():
            item.trainer.total_training_tokens = args.tokens
    group = max(stream_groups(items), key=len)
    items = {name: items[name] for name in group}
    print(f"{len(items)} items sharing one stream: {', '.join(items)}; torch threads {torch.get_num_threads()}")
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        rows = []
        started = time.perf_counter()
        tokens = 0
        for name, item in items.items():
            settings = train_settings(cfg, name, item, cache, work / "single" / name)
            tokens += train_sae(settings).n_tokens
        rows.append(("one train_sae per item", time.perf_counter() - started, tokens))
        outputs = {name: work / "sweep" / name for name in items}
        started = time.perf_counter()
        results = sweep_sae(sweep_settings(cfg, items, cache, outputs))
        rows.append(("sweep_sae (one stream)", time.perf_counter() - started, sum(r.n_tokens for r in results)))
        same = all(
            torch.equal(value, load_sparse_dictionary(outputs[name]).state_dict()[key])
            for name in items
            for key, value in load_sparse_dictionary(work / "single" / name).state_dict().items()
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    baseline = rows[0][1]
    print(f"\n{'contender':<26} {'seconds':>8} {'tokens/s':>10} {'speed-up':>9}")
    for label, seconds, n_tokens in rows:
        print(f"{label:<26} {seconds:>8.1f} {n_tokens / seconds:>10,.0f} {baseline / seconds:>8.2f}x")
    print(f"\nweights identical both ways: {same}")


if __name__ == "__main__":
    main()
