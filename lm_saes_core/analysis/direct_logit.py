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

Which decoder rows make a feature's direction (`attributed_hooks`, `feature_directions`), by kind:

- one output hook (SAE, transcoder): its decoder row W_D[i], which must write a residual-stream hook;
- a crosscoder: the decoder row W_D[h, i] of ONE head h, the `head` asked for or by default the deepest head on the
  residual stream (the last layer's, closest to the unembedding, so the direct path skips the fewest layers). Each
  head reconstructs its own hook, and head h's copy of the feature moves that hook by W_D[h, i] per unit of its
  activation. One head, not one list per head: a stored feature has one pair of top_positive / top_negative lists
  (`FeatureLogits`), so another head is another run (`head: blocks.4.hook_resid_post`, e.g. under another series);
- a CLT: a feature (s, i) of source layer s writes W_D[t][s, i] to the output of every layer t >= s, and every output
  (`hook_mlp_out`, `hook_attn_out`, ...) is added into the residual stream, so its direct effect is that of the sum
  d = sum_{t >= s} W_D[t][s, i] / c_out(t). c_out(t) is the output's raw scale: 1 once folded; a CLT that cannot
  fold (decoder-norm gating with outputs of different dataset-wise norms) keeps each output's dataset-wise scale,
  which must be undone per layer before the sum. Features are numbered s * d_sae + i, as the analysis numbers them.

Kinds or hooks off the residual stream (e.g. a transcoder into `ln2.hook_out`, a crosscoder whose heads are all MLP
inputs) have no direct logit effect: `check_attributable` says why, and callers skip them.
"""

import torch
from pydantic import Field
from torch import Tensor

from lm_saes_core.backend.base import LanguageModel, Unembedding
from lm_saes_core.config import BaseConfig
from lm_saes_core.models import (
    CLTConfig,
    CrossCoder,
    CrossCoderConfig,
    CrossLayerTranscoder,
    SparseDictionary,
    SparseDictionaryConfig,
)
from lm_saes_core.store.records import FeatureLogits, LogitToken

RESIDUAL_WRITE_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
"""Per-block hooks whose activation is (or is added into) the residual stream, so a direction there reaches the final
norm unchanged along the direct path; in the order the forward pass reaches them within a block."""


class DirectLogitAttributorConfig(BaseConfig):
    top_k: int = Field(default=10, gt=0)
    """How many promoted and how many suppressed tokens to keep per feature."""
    feature_batch_size: int = Field(default=256, gt=0)
    """Features whose full (batch, d_vocab) logits exist at once: memory is batch x d_vocab x 4 bytes."""


def residual_position(hook: str) -> tuple[int, int] | None:
    """(layer, stage within the block) of a residual-stream hook `blocks.<layer>.<suffix>`, or None for any other."""
    parts = hook.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in RESIDUAL_WRITE_HOOKS:
        return None
    return int(parts[1]), RESIDUAL_WRITE_HOOKS.index(parts[2])


def _not_residual(hook: str) -> str:
    return (
        f"the output hook is {hook!r}, which is not a residual-stream hook; direct logit attribution needs a "
        f"dictionary that writes to blocks.<layer>.{{{', '.join(RESIDUAL_WRITE_HOOKS)}}}"
    )


def attributed_hooks(sae_cfg: SparseDictionaryConfig, head: str | None = None) -> list[str]:
    """The output hooks whose decoder rows make each feature's direction (see the module docstring): the one output
    hook; a crosscoder's `head` (default: its deepest residual-stream head); every output of a CLT (a feature of layer
    s uses those of layers t >= s). Raises ValueError saying why the dictionary has no direct logit effect, or why
    `head` cannot be chosen."""
    if isinstance(sae_cfg, CrossCoderConfig):
        if head is not None:
            if head not in sae_cfg.heads:
                raise ValueError(f"head {head!r} is not one of the crosscoder's heads {sae_cfg.heads}")
            if residual_position(head) is None:
                raise ValueError(f"head {head!r}: {_not_residual(head)}")
            return [head]
        residual = [hook for hook in sae_cfg.heads if residual_position(hook) is not None]
        if not residual:
            raise ValueError(
                f"none of the crosscoder's heads {sae_cfg.heads} is a residual-stream hook; direct logit attribution "
                f"needs a head at blocks.<layer>.{{{', '.join(RESIDUAL_WRITE_HOOKS)}}}"
            )
        return [max(residual, key=residual_position)]
    if head is not None and isinstance(sae_cfg, CLTConfig):
        raise ValueError(
            "head: a CLT feature writes to the output of its layer and of every later one, and its direct logit "
            "effect is the sum of those decoders; there is no head to choose (leave head unset)"
        )
    if isinstance(sae_cfg, CLTConfig):
        off = [hook for hook in sae_cfg.hooks_out if residual_position(hook) is None]
        if off:
            raise ValueError(
                f"the CLT writes to {off}, which {'is' if len(off) == 1 else 'are'} not residual-stream hooks; a CLT "
                "feature's direct logit effect is the sum of its decoders into the residual stream, so every output "
                f"must be blocks.<layer>.{{{', '.join(RESIDUAL_WRITE_HOOKS)}}}"
            )
        return list(sae_cfg.hooks_out)
    kind = SparseDictionary.kind(sae_cfg.sae_type)
    if kind.output_directions is SparseDictionary.output_directions:
        raise ValueError(f"sae_type {sae_cfg.sae_type!r} has no single output direction per feature")
    if len(sae_cfg.hooks_out) != 1:
        raise ValueError(
            f"the dictionary writes to {sae_cfg.hooks_out}; direct logit attribution needs one output hook"
        )
    (hook,) = sae_cfg.hooks_out
    if head is not None and head != hook:
        raise ValueError(f"head {head!r}: the dictionary has one output hook, {hook!r}")
    if residual_position(hook) is None:
        raise ValueError(_not_residual(hook))
    return [hook]


def check_attributable(
    sae_cfg: SparseDictionaryConfig, model: LanguageModel | None = None, head: str | None = None
) -> list[str]:
    """Direct logit attribution needs each feature's output direction(s) written to residual-stream hooks (of
    `model`, with width d_model, when it is given): otherwise a feature's decoder does not reach the unembedding
    directly and DLA means nothing. Returns the attributed hooks (`attributed_hooks`); raises ValueError saying why
    not."""
    hooks = attributed_hooks(sae_cfg, head)
    if model is None:
        return hooks
    model.validate_hook_points(hooks)
    widths = {h: w for h, w, _ in sae_cfg.hook_widths()}
    for hook in hooks:
        if widths[hook] != model.d_model:
            raise ValueError(
                f"the dictionary writes vectors of width {widths[hook]} to {hook!r}, but model "
                f"{model.cfg.model_name!r} has d_model {model.d_model}: it belongs to another model"
            )
    return hooks


def output_scale(sae: SparseDictionary, hook: str) -> float:
    """The factor by which `sae` scales the raw activations of output `hook` (a decoder row divided by it is in raw
    space): the dataset-wise scale of a model that could not fold, else 1 (a folded model; a token-wise one, whose
    factor changes per token and is left out as the module docstring says; a CLT's sum then weighs its layers'
    decoders as they are in the normalised space)."""
    return sae.dataset_scale(hook) if sae.cfg.norm_activation == "dataset-wise" else 1.0


@torch.no_grad()
def feature_directions(sae: SparseDictionary, hooks: list[str]) -> Tensor:
    """(n_analysed_features, d_model): each feature's raw-space direction into the residual stream from its decoder
    rows to `hooks` (what `attributed_hooks` returned for `sae.cfg`), as the module docstring defines them."""
    if isinstance(sae, CrossCoder):
        (head,) = hooks
        return sae.W_D[sae.cfg.heads.index(head)].detach() / output_scale(sae, head)
    if isinstance(sae, CrossLayerTranscoder):
        outputs = sae.cfg.hooks_out
        layers = []
        for s in range(sae.cfg.n_layers):  # a feature of layer s writes to every output t >= s
            layers.append(sum(sae.W_D[t][s] / output_scale(sae, outputs[t]) for t in range(s, len(outputs))))
        return torch.stack(layers).flatten(0, 1).detach()  # feature s * d_sae + i
    (hook,) = hooks
    return sae.output_directions() / output_scale(sae, hook)


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
