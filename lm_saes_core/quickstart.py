"""`make quickstart`: cache activations of the bundled model from the bundled corpus, then check them."""

import sys
from pathlib import Path

from lm_saes_core.config import load_config
from lm_saes_core.runners import (
    CheckActivationConsistencySettings,
    GenerateActivationsSettings,
    check_activation_consistency,
    generate_activations,
)
from lm_saes_core.runners.generate import human_bytes

CONFIG = Path("configs/quickstart/generate.yaml")


def main() -> int:
    settings = load_config(GenerateActivationsSettings, CONFIG)
    result = generate_activations(settings)
    report = check_activation_consistency(CheckActivationConsistencySettings(path=str(result.output_dir)))
    print()
    print(f"activations:  {result.output_dir.resolve()}")
    print(f"hook points:  {', '.join(settings.hook_points)}")
    tokens = f"{result.n_tokens} positions ({result.n_real_tokens} document tokens)"
    print(f"tokens:       {tokens} in {result.n_chunks} chunks")
    print(f"size on disk: {human_bytes(result.bytes_on_disk)}")
    if not result.reused:
        print(f"speed:        {result.tokens_per_second:.0f} tokens/s")
    print(f"consistency:  {'OK' if report.ok else 'FAILED'} ({report.summary()})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
