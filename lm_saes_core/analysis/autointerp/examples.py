"""Text examples of one feature, cut from the stored sample pools: windows of `max_length` tokens decoded with the
model's tokenizer, each token keeping its activation so it can be highlighted with << >>.

Which examples go where matters for honest scores: the explainer sees the strongest contexts of "top_activations";
the scorers only see contexts the explainer never saw (the rest of "top_activations" and the "band_*" pools), and
contexts are de-duplicated across pools by their provenance.
"""

from dataclasses import dataclass

import numpy as np

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.store.records import FeatureAnalysis, FeatureSamples

TOP_POOL = "top_activations"
NON_ACTIVATING_POOL = "non_activating"
BAND_PREFIX = "band_"


@dataclass
class Example:
    """One window of a context: its tokens as text pieces (their concatenation is the window's text) and the
    feature's activation at each."""

    pieces: list[str]
    activations: np.ndarray
    """(L,) float32."""
    source: str
    """Pool and row it was cut from, e.g. "top_activations[3]" (kept in the details for inspection)."""

    @property
    def max_activation(self) -> float:
        return float(self.activations.max()) if len(self.activations) else 0.0

    def text(self) -> str:
        return "".join(self.pieces)

    def true_highlights(self, threshold: float) -> np.ndarray:
        """(L,) bool: tokens at or above `threshold` x this example's max (nothing when the feature is silent)."""
        peak = self.max_activation
        if peak <= 0:
            return np.zeros(len(self.pieces), dtype=bool)
        return self.activations >= threshold * peak

    def highlighted(self, mask: np.ndarray) -> str:
        """The text with runs of masked tokens wrapped in << >>; a token's leading spaces stay outside the marks."""
        out: list[str] = []
        inside = False
        for piece, marked in zip(self.pieces, mask, strict=True):
            if marked and not inside and piece.strip():
                stripped = piece.lstrip()
                out.append(piece[: len(piece) - len(stripped)] + "<<" + stripped)
                inside = True
                continue
            if inside and not marked:
                out.append(">>")
                inside = False
            out.append(piece)
        if inside:
            out.append(">>")
        return "".join(out)


@dataclass
class FeatureExamples:
    shown: list[Example]
    """Given to the explainer."""
    held_out: list[Example]
    """Activating examples the explainer never saw, for scoring."""
    non_activating: list[Example]
    """Windows where the feature is silent everywhere."""


def decode_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """One text piece per token such that their concatenation is the decoded text. Decoding prefixes (instead of
    each id alone) keeps multi-byte characters split across tokens intact and byte-level spaces right."""
    pieces: list[str] = []
    emitted = ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if end < len(token_ids):
            text = text.rstrip("\ufffd")  # an incomplete character: it belongs to the token that completes it
        if text.startswith(emitted):
            pieces.append(text[len(emitted) :])
        else:  # a tokenizer whose prefixes do not extend each other: fall back to the token alone
            pieces.append(tokenizer.decode([token_ids[end - 1]], skip_special_tokens=False))
        emitted = text
    return pieces


def centred_window(length: int, centre: int, max_length: int) -> tuple[int, int]:
    """[start, end) of at most `max_length` positions within [0, length), centred on `centre` where it fits."""
    start = max(0, min(centre - max_length // 2, length - max_length))
    return start, min(length, start + max_length)


def silent_window(activations: np.ndarray, max_length: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """A random window (as long as possible, up to `max_length`) in which the feature is nowhere > 0, or None."""
    length = len(activations)
    width = min(max_length, length)
    if width == 0:
        return None
    active = np.concatenate([[0], np.cumsum(activations > 0)])
    starts = np.flatnonzero(active[width:] - active[: length - width + 1] == 0)
    if len(starts) == 0:
        return None
    start = int(rng.choice(starts))
    return start, start + width


def _row_key(samples: FeatureSamples, row: int) -> tuple[str, int, int]:
    return samples.dataset[row], int(samples.doc_index[row]), int(samples.doc_position[row])


def _cut(tokenizer, samples: FeatureSamples, row: int, window: tuple[int, int]) -> Example:
    start, end = window
    ids = samples.tokens[row, start:end].astype(np.int64).tolist()
    activations = samples.activations[row, start:end].astype(np.float32)
    # Special tokens (BOS, ...) are not text: show them only where the feature fires on them.
    special = set(tokenizer.all_special_ids)
    pieces = [
        "" if token in special and activation <= 0 else piece
        for token, activation, piece in zip(ids, activations, decode_pieces(tokenizer, ids), strict=True)
    ]
    return Example(pieces, activations, f"{samples.name}[{row}]")


def _activating_rows(samples: FeatureSamples) -> list[int]:
    return [row for row in range(len(samples)) if samples.activations[row, : samples.lengths[row]].max(initial=0) > 0]


def band_pools(analysis: FeatureAnalysis) -> list[FeatureSamples]:
    return [samples for samples in analysis.samples if samples.name.startswith(BAND_PREFIX)]


def build_examples(
    analysis: FeatureAnalysis, tokenizer, cfg: AutoInterpConfig, rng: np.random.Generator
) -> FeatureExamples:
    """Split the feature's stored contexts into explainer examples, held-out activating examples and non-activating
    examples (see the module docstring)."""
    seen: set[tuple[str, int, int]] = set()
    shown: list[Example] = []
    held_out: list[Example] = []

    def take(samples: FeatureSamples, rows: list[int], into: list[Example]) -> None:
        for row in rows:
            key = _row_key(samples, row)
            if key in seen:
                continue
            seen.add(key)
            length = int(samples.lengths[row])
            centre = int(np.argmax(samples.activations[row, :length]))
            into.append(_cut(tokenizer, samples, row, centred_window(length, centre, cfg.max_length)))

    top = analysis.pool(TOP_POOL)
    if top is not None:
        rows = _activating_rows(top)  # pools are sorted strongest first
        take(top, rows[: cfg.n_activating_examples], shown)
        take(top, rows[cfg.n_activating_examples :], held_out)
    if cfg.use_band_pools:
        for samples in band_pools(analysis):
            take(samples, _activating_rows(samples), held_out)

    non_activating: list[Example] = []
    pool = analysis.pool(NON_ACTIVATING_POOL)
    if pool is not None:
        for row in range(len(pool)):  # one row is one context: iterate rows, never positions
            if len(non_activating) == cfg.n_non_activating_examples:
                break
            key = _row_key(pool, row)
            if key in seen:
                continue
            window = silent_window(pool.activations[row, : int(pool.lengths[row])], cfg.max_length, rng)
            if window is not None:
                seen.add(key)
                non_activating.append(_cut(tokenizer, pool, row, window))
    return FeatureExamples(shown, held_out, non_activating)
