"""`python -m lm_saes_core.quickstart`: the quickstart with the core runners alone, no Dagster: cache activations of
the bundled model from the bundled corpus and check them, train a TopK SAE on them, and evaluate it on held-out
documents with the language model's loss when it is spliced in (configs/quickstart/*.yaml, output under
.lm_saes/quickstart). `make quickstart` runs the same experiment, and the analyses after it, as the Dagster pipeline
configs/pipelines/quickstart.yaml (see lm_saes_dagster.materialize)."""

import sys
import time
from pathlib import Path

from lm_saes_core.config import load_config
from lm_saes_core.runners import (
    CheckActivationConsistencySettings,
    GenerateActivationsSettings,
    check_activation_consistency,
    generate_activations,
)
from lm_saes_core.runners.evaluate import EvaluateSAESettings, evaluate_sae
from lm_saes_core.runners.generate import human_bytes
from lm_saes_core.runners.train import TrainSAESettings, train_sae

CONFIGS = Path("configs/quickstart")


def main() -> int:
    started = time.perf_counter()
    generate = load_config(GenerateActivationsSettings, CONFIGS / "generate.yaml")
    generation = generate_activations(generate)
    report = check_activation_consistency(CheckActivationConsistencySettings(path=str(generation.output_dir)))
    if not report.ok:
        print(f"consistency check FAILED: {report.summary()}")
        return 1
    train_settings = load_config(TrainSAESettings, CONFIGS / "train.yaml")
    training = train_sae(train_settings)
    evaluation = evaluate_sae(load_config(EvaluateSAESettings, CONFIGS / "evaluate.yaml"))
    metrics = evaluation.metrics

    tokens = f"{generation.n_tokens} positions ({generation.n_real_tokens} document tokens)"
    print()
    print(f"activations:        {generation.output_dir.resolve()}")
    print(f"  hook points:      {', '.join(generate.hook_points)}")
    print(f"  tokens:           {tokens} in {generation.n_chunks} chunks")
    print(f"  size on disk:     {human_bytes(generation.bytes_on_disk)}")
    print(f"  consistency:      OK ({report.summary()})")
    print(f"dictionary:         {training.output_path.resolve()}")
    print(f"  trained on:       {training.n_tokens} tokens in {training.steps} steps")
    print("held-out evaluation (last 10% of the corpus' documents):")
    print(f"  explained var.:   {metrics['metrics/explained_variance']:.4f}")
    print(f"  L0:               {metrics['metrics/l0']:.1f}")
    print(f"  dead fraction:    {metrics['metrics/dead_fraction']:.4f}")
    if "metrics/ce_loss_recovered" in metrics:
        print(
            f"  CE loss recovered: {metrics['metrics/ce_loss_recovered']:.4f} (clean "
            f"{metrics['metrics/ce_loss_clean']:.3f}, spliced {metrics['metrics/ce_loss_spliced']:.3f}, "
            f"zero-ablated {metrics['metrics/ce_loss_zero_ablation']:.3f})"
        )
    print(f"total time:         {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
