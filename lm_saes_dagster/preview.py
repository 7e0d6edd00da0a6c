"""Markdown previews of a few features for the Dagster UI: top contexts with the activating tokens marked, the
tokens a feature promotes and suppresses, and its explanation. Kept small (metadata lives in the event log)."""

import re
from collections.abc import Sequence

import numpy as np

from lm_saes_core.analysis.feature_analyzer import TOP_POOL
from lm_saes_core.store import FeatureRecord, FeatureSamples, RecordStore

CONTEXT_RADIUS = 10
"""Tokens shown on each side of a context's strongest activation."""
MAX_FREQUENCY = 0.01
"""Previews and interpretations pick among features active on at most this fraction of tokens."""
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+\-.!|~])")


def escape(text: str) -> str:
    """A token as literal markdown text: special characters escaped, whitespace made visible."""
    text = text.replace("\n", "↵").replace("\t", "⇥")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text) if text.strip() else text.replace(" ", "·") or "∅"


def decode_tokens(tokenizer, token_ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [f"[{token_id}]" for token_id in token_ids]
    return [tokenizer.decode([int(token_id)]) for token_id in token_ids]


def _bold(text: str) -> str:
    """Markdown bold around the text, its outer spaces left outside (`** x**` would not render as bold)."""
    core = text.strip(" ")
    if not core:
        return text
    lead, trail = text[: len(text) - len(text.lstrip(" "))], text[len(text.rstrip(" ")) :]
    return f"{lead}**{core}**{trail}"


def context_line(samples: FeatureSamples, row: int, tokenizer, radius: int = CONTEXT_RADIUS) -> str:
    """One context around its strongest position: runs of activating tokens in bold, the peak's value after it."""
    length = int(samples.lengths[row])
    acts = samples.activations[row, :length]
    peak = int(np.argmax(acts))
    start, stop = max(0, peak - radius), min(length, peak + radius + 1)
    tokens = decode_tokens(tokenizer, samples.tokens[row, start:stop])
    pieces, run = [], []
    for position, token in zip(range(start, stop), tokens, strict=True):
        if acts[position] > 0:
            run.append(escape(token))
        else:
            pieces.append(_bold("".join(run)))
            run = []
            pieces.append(escape(token))
        if position == peak:
            pieces.append(_bold("".join(run)) + f"⟨{acts[peak]:.2f}⟩")
            run = []
    pieces.append(_bold("".join(run)))
    return ("… " if start > 0 else "") + "".join(pieces) + (" …" if stop < length else "")


def feature_markdown(
    record: FeatureRecord, tokenizer, *, analysis_name: str = "default", n_contexts: int = 3, parts=("contexts",)
) -> str:
    """One feature: statistics, then the requested parts ("contexts", "logits", "explanation")."""
    lines = [f"#### Feature {record.index}"]
    analysis = record.analysis(analysis_name)
    if analysis is not None:
        lines.append(
            f"frequency {analysis.frequency:.2e} · max activation {analysis.max_feature_acts:.3g} · "
            f"mean activation {analysis.mean_feature_acts:.3g}"
        )
    if "explanation" in parts:
        interpretation = record.interpretation
        if interpretation is None:
            lines.append("*not interpreted*")
        elif interpretation.explanation is None:
            lines.append(f"*interpretation failed: {escape(interpretation.error or 'unknown error')}*")
        else:
            scores = ", ".join(f"{s.method} {s.balanced_accuracy:.2f}" for s in interpretation.scores)
            lines.append(f"> {escape(interpretation.explanation)}")
            lines.append(f"balanced accuracy: {scores or 'not scored'}")
    if "logits" in parts and record.logits is not None:
        for label, tokens in (("promotes", record.logits.top_positive), ("suppresses", record.logits.top_negative)):
            shown = " ".join(f"`{t.token.strip() or repr(t.token)}` {t.logit:+.2f}" for t in tokens[:6])
            lines.append(f"{label}: {shown}")
    if "contexts" in parts and analysis is not None:
        top = analysis.pool(TOP_POOL)
        if top is not None and len(top):
            lines.extend(f"- {context_line(top, row, tokenizer)}" for row in range(min(n_contexts, len(top))))
        else:
            lines.append("*never active in the analysed tokens*")
    return "\n\n".join(lines)


def most_active_features(
    store: RecordStore, dictionary: str, series: str, analysis_name: str, n: int, max_frequency: float = MAX_FREQUENCY
) -> list[int]:
    """The `n` features that fired on the most analysed tokens (ties by index) among those active on at most
    `max_frequency` of them: denser features are rarely interpretable. All active features when none is that sparse."""
    counts, dense = [], []
    for record in store.iter_features(dictionary, series, with_samples=False):
        analysis = record.analysis(analysis_name)
        if analysis is not None and analysis.act_times > 0:
            (counts if analysis.frequency <= max_frequency else dense).append((-analysis.act_times, record.index))
    return [index for _, index in sorted(counts or dense)[:n]]


def features_markdown(
    store: RecordStore,
    dictionary: str,
    series: str,
    indices: Sequence[int],
    tokenizer,
    *,
    analysis_name: str = "default",
    parts=("contexts",),
) -> str:
    blocks = []
    for index in indices:
        record = store.get_feature(dictionary, series, index)
        if record is not None:
            blocks.append(feature_markdown(record, tokenizer, analysis_name=analysis_name, parts=parts))
    return "\n\n---\n\n".join(blocks) if blocks else "*no active feature to show*"
