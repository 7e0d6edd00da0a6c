"""Direct logit attribution (DLA): which tokens a feature's output direction promotes or suppresses when it is read
straight through the model's final norm and unembedding, ignoring every later layer.

What is computed, for the decoder row d of feature i (W_D[i], in the raw activation space of the output hook):

    logits_i = W_U^T (gamma * c(d))        (d_vocab,)

- c(d) = d - mean(d) when the final norm is a LayerNorm (its centring is linear, so it applies to the direction
  exactly), c(d) = d for an RMSNorm;
- gamma is the final norm's elementwise gain (Gemma-style `1 + w` included);
- the norm's division by the RMS (or standard deviation) of the *whole residual stream* is NOT applied: it is one
  positive number per token position that no direction alone determines. The values are therefore the logit change
  per unit of feature activation at a position whose residual stream has unit RMS; dividing by that RMS rescales
  every token's logit of a position equally and never changes the ranking;
- the LayerNorm bias and the unembedding bias b_U are NOT added: they are the same vector for every feature, so they
  carry no information about the feature, and b_U would otherwise decide the top tokens of weak features.

This differs from the reference system, which normalised the direction itself (d / RMS(d)) and added both biases.
Ranking-wise the two agree up to the biases; in value the reference's logits are ours divided by RMS(d) plus biases.

The direction must be in raw space: a dataset-wise dictionary is loaded with `fold_activation_scale=True`; for a
token-wise dictionary W_D lives in the per-token normalised space (a positive per-token factor), which again scales
values without changing the ranking.
"""

import torch
from pydantic import Field
from torch import Tensor

from lm_saes_core.backend.base import LanguageModel, Unembedding
from lm_saes_core.config import BaseConfig
from lm_saes_core.models import SparseDictionary, SparseDictionaryConfig
from lm_saes_core.store.records import FeatureLogits, LogitToken

RESIDUAL_WRITE_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
"""Per-block hooks whose activation is (or is added into) the residual stream, so a direction there reaches the final
norm unchanged along the direct path."""


class DirectLogitAttributorConfig(BaseConfig):
    top_k: int = Field(default=10, gt=0)
    """How many promoted and how many suppressed tokens to keep per feature."""
    feature_batch_size: int = Field(default=256, gt=0)
    """Features whose full (batch, d_vocab) logits exist at once: memory is batch x d_vocab x 4 bytes."""


def check_attributable(sae_cfg: SparseDictionaryConfig, model: LanguageModel | None = None) -> None:
    """Direct logit attribution needs one output direction per feature (the kind's `output_directions`) written to
    a residual-stream hook (of `model`, with width d_model, when it is given): otherwise a feature's decoder does not
    reach the unembedding directly and DLA means nothing. Raises ValueError saying why not."""
    kind = SparseDictionary.kind(sae_cfg.sae_type)
    if kind.output_directions is SparseDictionary.output_directions:
        raise ValueError(f"sae_type {sae_cfg.sae_type!r} has no single output direction per feature")
    if len(sae_cfg.hooks_out) != 1:
        raise ValueError(
            f"the dictionary writes to {sae_cfg.hooks_out}; direct logit attribution needs one output hook"
        )
    (hook,) = sae_cfg.hooks_out
    parts = hook.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in RESIDUAL_WRITE_HOOKS:
        raise ValueError(
            f"the output hook is {hook!r}, which is not a residual-stream hook; direct logit attribution needs a "
            f"dictionary that writes to blocks.<layer>.{{{', '.join(RESIDUAL_WRITE_HOOKS)}}}"
        )
    if model is None:
        return
    model.validate_hook_points([hook])
    width = {h: w for h, w, _ in sae_cfg.hook_widths()}[hook]
    if width != model.d_model:
        raise ValueError(
            f"the dictionary writes vectors of width {width} to {hook!r}, but model {model.cfg.model_name!r} has "
            f"d_model {model.d_model}: it belongs to another model"
        )


@torch.no_grad()
def direct_logits(directions: Tensor, unembedding: Unembedding) -> Tensor:
    """(n, d_model) directions -> (n, d_vocab) float32 logits, as defined in the module docstring."""
    directions = directions.float().to(unembedding.W_U.device)
    if unembedding.norm_centres:
        directions = directions - directions.mean(-1, keepdim=True)
    if unembedding.norm_weight is not None:
        directions = directions * unembedding.norm_weight.float()
    return directions @ unembedding.W_U.float()


def token_strings(tokenizer, token_ids: list[int]) -> dict[int, str]:
    """Each id decoded on its own, leading space kept (sentencepiece tokenizers drop it when decoding one token)."""
    unique = sorted(set(token_ids))
    texts = tokenizer.batch_decode([[i] for i in unique], clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(unique)
    return {
        i: " " + text if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" ") else text
        for i, text, piece in zip(unique, texts, pieces, strict=True)
    }


@torch.no_grad()
def attribute_directions(
    directions: Tensor, model: LanguageModel, cfg: DirectLogitAttributorConfig
) -> list[FeatureLogits]:
    """Top promoted and suppressed tokens of each direction, computed `feature_batch_size` directions at a time."""
    unembedding = model.unembedding()
    k = min(cfg.top_k, unembedding.W_U.shape[1])
    top_values, top_ids, bottom_values, bottom_ids = [], [], [], []
    for start in range(0, len(directions), cfg.feature_batch_size):
        logits = direct_logits(directions[start : start + cfg.feature_batch_size], unembedding)
        top = logits.topk(k, dim=-1)
        bottom = logits.topk(k, dim=-1, largest=False)
        top_values.append(top.values.cpu())
        top_ids.append(top.indices.cpu())
        bottom_values.append(bottom.values.cpu())
        bottom_ids.append(bottom.indices.cpu())
    if not top_ids:
        return []
    positive_ids, negative_ids = torch.cat(top_ids).tolist(), torch.cat(bottom_ids).tolist()
    positive_values, negative_values = torch.cat(top_values).tolist(), torch.cat(bottom_values).tolist()
    strings = token_strings(model.tokenizer, [i for row in positive_ids + negative_ids for i in row])

    def tokens(ids: list[int], values: list[float]) -> list[LogitToken]:
        return [LogitToken(token_id=i, token=strings[i], logit=v) for i, v in zip(ids, values, strict=True)]

    return [
        FeatureLogits(top_positive=tokens(pi, pv), top_negative=tokens(ni, nv))
        for pi, pv, ni, nv in zip(positive_ids, positive_values, negative_ids, negative_values, strict=True)
    ]
