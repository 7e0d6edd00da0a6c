"""Helpers the tests of every dictionary kind share."""

import torch

from lm_saes_core.models import SparseDictionary


def randomised(kind: type[SparseDictionary], cfg, seed: int = 0, std: float = 0.5) -> SparseDictionary:
    """A `kind` dictionary built from `cfg` with every parameter drawn from N(0, std) under `seed`, except JumpReLU
    thresholds (kept at their initial value): weights far from any initialisation's symmetries, so exact-value and
    equivalence tests exercise every term."""
    torch.manual_seed(seed)
    model = kind.from_config(cfg)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "log_jumprelu_threshold" not in name:
                parameter.normal_(0, std)
    return model
