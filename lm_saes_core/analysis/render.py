"""Terminal views of the record store with rich: one feature (where a crosscoder's or CLT's feature lives,
statistics, explanation, contexts with the activating tokens highlighted, DLA tokens) and the table of dictionaries.

Highlighting: a token with activation a > 0 gets a background colour by its share of the feature's max activation m:
yellow up to m/3, orange up to 2m/3, red above. Without colours (`markers=True`, used when the console has none, e.g.
piped output or NO_COLOR) activating tokens are wrapped in « » instead, and those above 2m/3 in «« »».

Tokens are decoded with the tokenizer of the dictionary's model (see `load_tokenizer`); without one they are shown
as their ids, e.g. [1234].
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lm_saes_core.analysis.feature_analyzer import TOP_POOL
from lm_saes_core.analysis.z_patterns import MIN_SHOWN_SHARE, shown_sources
from lm_saes_core.store import (
    DictionaryRecord,
    FeatureAnalysis,
    FeatureRecord,
    FeatureSamples,
    Interpretation,
    LogitToken,
    RecordStore,
)

BAND_STYLES = ("black on yellow", "black on dark_orange", "bold white on red")
BAND_MARKERS = (("«", "»"), ("«", "»"), ("««", "»»"))
SPARK = "▁▂▃▄▅▆▇█"


# ------------------------------------------------------------------------------------------------ tokenizer lookup


def load_tokenizer(store: RecordStore, dictionary: DictionaryRecord) -> tuple[object | None, str]:
    """The tokenizer of the dictionary's model, and a note saying where it came from or why there is none.

    The model is `dictionary.model_name`, else a `model_name` key of its config (SAELens-style configs carry one).
    Its stored model record (a LanguageModelConfig, as the runners store it) locates the weights, else the name
    itself is resolved (the bundled model, a local directory, or a hub name in the local cache)."""
    from pydantic import ValidationError

    from lm_saes_core.backend.base import LanguageModelConfig
    from lm_saes_core.backend.registry import resolve_model_dir

    model_name = dictionary.model_name or dictionary.cfg.get("model_name")
    if not model_name:
        return None, "the dictionary record names no model; token ids shown"
    record = store.get_model(model_name)
    try:
        cfg = LanguageModelConfig.model_validate(record.cfg if record is not None else {"model_name": model_name})
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg))
    except (ValidationError, OSError, ValueError) as exc:
        return None, f"no tokenizer for model {model_name!r} ({type(exc).__name__}: {exc}); token ids shown"
    return tokenizer, f"tokens decoded with the tokenizer of {model_name!r}"


def token_pieces(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Text of each token such that the pieces join to the decoded text. A character split over several byte-level
    tokens belongs to the token that completes it; the earlier ones get ''."""
    if tokenizer is None:
        return [f"[{i}]" for i in token_ids]
    pieces, emitted = [], ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(list(token_ids[:end]), clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and end < len(token_ids):  # an incomplete character: wait for its next byte
            pieces.append("")
            continue
        # Decoding is prefix-stable for the tokenizers we know; if one rewrites earlier text, keep only what is new.
        pieces.append(text[len(os.path.commonprefix([emitted, text])) :])
        emitted = text
    return pieces


def visible(text: str) -> str:
    """Whitespace that would otherwise vanish or break the line, shown as symbols."""
    return text.replace("\n", "↵").replace("\r", "").replace("\t", "⇥")


def visible_token(text: str) -> str:
    """A vocabulary entry on its own: spaces matter (' the' vs 'the'), so they are shown as ␣."""
    return visible(text).replace(" ", "␣")


# ------------------------------------------------------------------------------------------------ pieces of a view


def band(activation: float, max_activation: float) -> int:
    """-1 for a non-activating token, else 0, 1, 2 for up to a third, two thirds, or more of the feature max."""
    if activation <= 0:
        return -1
    share = activation / max_activation if max_activation > 0 else 1.0
    return 0 if share <= 1 / 3 else 1 if share <= 2 / 3 else 2


def context_text(
    samples: FeatureSamples, row: int, tokenizer, max_activation: float, window: int, markers: bool
) -> Text:
    """One context cropped to ±window tokens around its strongest position, activating tokens highlighted."""
    length = int(samples.lengths[row])
    tokens = samples.tokens[row, :length].tolist()
    activations = samples.activations[row, :length].astype(np.float64)
    centre = int(activations.argmax()) if length else 0
    start, end = max(0, centre - window), min(length, centre + window + 1)
    pieces = token_pieces(tokenizer, tokens[start:end])
    text = Text()
    if start > 0:
        text.append("…", style="dim")
    carried = 0.0  # activation of tokens whose text arrives with a later token (split characters)
    for piece, activation in zip(pieces, activations[start:end], strict=True):
        carried = max(carried, float(activation))
        if not piece:
            continue
        level, carried = band(carried, max_activation), 0.0
        shown = visible(piece) + (" " if tokenizer is None else "")
        if level < 0:
            text.append(shown)
        elif markers:
            left, right = BAND_MARKERS[level]
            text.append(f"{left}{shown}{right}")
        else:
            text.append(shown, style=BAND_STYLES[level])
    if end < length:
        text.append("…", style="dim")
    return text


def context_lines(
    samples: FeatureSamples, n_rows: int, tokenizer, max_activation: float, window: int, markers: bool
) -> list[RenderableType]:
    lines: list[RenderableType] = []
    for row in range(min(n_rows, len(samples))):
        length = int(samples.lengths[row])
        row_max = float(samples.activations[row, :length].max()) if length else 0.0
        header = Text(
            f"{row + 1}. max {row_max:.3g} · {samples.dataset[row]} doc {int(samples.doc_index[row])} "
            f"from token {int(samples.doc_position[row])}",
            style="dim",
        )
        lines += [header, context_text(samples, row, tokenizer, max_activation, window, markers)]
        sources = z_pattern_line(samples, row, tokenizer)
        if sources is not None:
            lines.append(sources)
    return lines


def z_pattern_line(samples: FeatureSamples, row: int, tokenizer) -> Text | None:
    """A Lorsa's top context: `← 'token'(position) contribution, ...`, the source tokens that feed its peak
    activation, strongest first (see `ZPatterns`; the weak ones only counted); None for rows without z-patterns."""
    if samples.z_patterns is None:
        return None
    shown, n_weak = shown_sources(samples, row)
    tokens = samples.tokens[row]
    pieces = [
        f"'{visible(token_pieces(tokenizer, [int(tokens[source])])[0])}'({source}) {value:.3g}"
        for source, value in shown
    ]
    line = Text("← " + ", ".join(pieces), style="cyan")
    if n_weak:
        line.append(f"{', ' if pieces else ''}+{n_weak} under {MIN_SHOWN_SHARE:.0%} of the max", style="dim")
    return line


def sparkline(counts: np.ndarray) -> str:
    """Bar heights by log(1 + count), so rare large activations still show; empty bins are blank."""
    heights = np.log1p(counts.astype(np.float64))
    top = heights.max() if len(heights) else 0.0
    if top <= 0:
        return ""
    levels = np.ceil(heights / top * len(SPARK)).astype(int)
    return "".join(SPARK[level - 1] if level > 0 else " " for level in levels)


def statistics_table(analysis: FeatureAnalysis) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    frequency = analysis.frequency
    one_in = f" (1 in {1 / frequency:,.0f})" if frequency > 0 else ""
    table.add_row("Activation times", f"{analysis.act_times:,} of {analysis.n_analyzed_tokens:,} analysed tokens")
    table.add_row("Frequency", f"{frequency:.4%}{one_in}")
    table.add_row("Max activation", f"{analysis.max_feature_acts:.4g}")
    table.add_row("Mean activation", f"{analysis.mean_feature_acts:.4g} (over the positions where it fires)")
    counts, edges = np.asarray(analysis.histogram_counts), np.asarray(analysis.histogram_edges)
    filled = np.flatnonzero(counts)
    if len(filled):
        first, last = filled[0], filled[-1]
        table.add_row(
            "Histogram",
            Text.assemble(
                (f"{edges[first]:.3g} ", "dim"),
                (sparkline(counts[first : last + 1]), "cyan"),
                (f" {edges[last + 1]:.3g}", "dim"),
                (f"  ({int(counts.sum()):,} activations, log counts)", "dim"),
            ),
        )
    return table


def location_view(analysis: FeatureAnalysis) -> RenderableType | None:
    """`lives in: <location> (<hook> <decoder norm>, ...)` and, for a crosscoder, the cosines of its heads' decoders
    (one row per head, columns in the same order); None for a feature with one decoder."""
    if analysis.decoder_norms is None and analysis.location is None:
        return None
    norms = ", ".join(f"{hook} {norm:.3g}" for hook, norm in (analysis.decoder_norms or {}).items())
    line = Text.assemble(("lives in: ", "bold"), analysis.location or "?", f" ({norms})" if norms else "")
    cosines = analysis.decoder_cosines
    if cosines is None:
        return line
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    for _ in cosines:
        table.add_column(justify="right")
    heads = list(analysis.decoder_norms or {}) or [f"head {h}" for h in range(len(cosines))]
    for head, row in zip(heads, cosines, strict=True):
        table.add_row(head, *(f"{value:.2f}" for value in row))
    return Group(line, Text("decoder cosines between heads:", style="dim"), table)


def interpretation_view(interpretation: Interpretation) -> RenderableType:
    if interpretation.explanation is None:
        head = Text(f"no explanation: {interpretation.error or 'unknown error'}", style="red")
    else:
        head = Text(interpretation.explanation, style="bold")
    parts: list[RenderableType] = [head, Text(f"by {interpretation.model}", style="dim")]
    if interpretation.scores:
        scores = Table("scorer", "accuracy", "balanced", "precision", "recall", "n", "passed", box=None)
        for score in interpretation.scores:
            scores.add_row(
                score.method,
                f"{score.accuracy:.3f}",
                f"{score.balanced_accuracy:.3f}",
                f"{score.precision:.3f}",
                f"{score.recall:.3f}",
                str(score.n_examples),
                "yes" if score.passed else "no",
            )
        parts.append(scores)
    return Group(*parts)


def logits_table(positive: Sequence[LogitToken], negative: Sequence[LogitToken]) -> Table:
    table = Table(box=None)
    table.add_column("promoted", style="green")
    table.add_column("logit", justify="right")
    table.add_column("suppressed", style="red")
    table.add_column("logit", justify="right")
    for row in range(max(len(positive), len(negative))):
        cells: list[str] = []
        for tokens in (positive, negative):
            cells += [visible_token(tokens[row].token), f"{tokens[row].logit:+.3f}"] if row < len(tokens) else ["", ""]
        table.add_row(*cells)
    return table


# ------------------------------------------------------------------------------------------------ whole views


def feature_view(
    feature: FeatureRecord,
    dictionary: DictionaryRecord,
    analysis: FeatureAnalysis | None,
    tokenizer,
    tokenizer_note: str,
    *,
    n_samples: int = 5,
    n_other_samples: int = 2,
    window: int = 20,
    markers: bool = False,
) -> Group:
    """Everything known about one feature, strongest evidence first."""
    d_sae = dictionary.cfg.get("d_sae", "?")
    title = f"feature {feature.index} of {dictionary.name} (series {dictionary.series}, d_sae {d_sae})"
    _, hooks = dictionary_label(dictionary.cfg)
    info = Text.assemble(
        (f"model {dictionary.model_name or '?'} · hook {hooks}", "dim"),
        (f" · analysis {analysis.name!r}" if analysis else " · no analysis stored", "dim"),
    )
    parts: list[RenderableType] = [Panel(info, title=title, title_align="left")]
    location = location_view(analysis) if analysis is not None else None
    if location is not None:  # model diffing looks here first
        parts.append(Panel(location, title="Where it lives", title_align="left"))
    if feature.interpretation is not None:
        parts.append(Panel(interpretation_view(feature.interpretation), title="Explanation", title_align="left"))
    if analysis is not None:
        parts.append(Panel(statistics_table(analysis), title="Statistics", title_align="left"))
        parts += _pool_panels(analysis, tokenizer, tokenizer_note, n_samples, n_other_samples, window, markers)
    if feature.logits is not None:
        table = logits_table(feature.logits.top_positive, feature.logits.top_negative)
        parts.append(Panel(table, title="Direct logit attribution", title_align="left"))
    return Group(*parts)


def _pool_panels(
    analysis: FeatureAnalysis,
    tokenizer,
    tokenizer_note: str,
    n_samples: int,
    n_other_samples: int,
    window: int,
    markers: bool,
) -> list[RenderableType]:
    max_activation = analysis.max_feature_acts
    if markers:
        legend = Text("« » activating, «« »» above 2/3 of the max", style="dim")
    else:
        legend = Text.assemble(
            ("activation up to 1/3 of the max ", "dim"),
            ("yellow", BAND_STYLES[0]),
            (", up to 2/3 ", "dim"),
            ("orange", BAND_STYLES[1]),
            (", above ", "dim"),
            ("red", BAND_STYLES[2]),
        )
    note = Text(f"{tokenizer_note}; ±{window} tokens around each context's max", style="dim")
    top = analysis.pool(TOP_POOL)
    if top is not None and top.z_patterns is not None:
        note.append("; ← the source tokens (position) feeding a context's max and their contribution (z-pattern)")
    pools = sorted(analysis.samples, key=lambda pool: pool.name != TOP_POOL)  # top contexts first, then as stored
    panels: list[RenderableType] = []
    for pool in pools:
        n_rows = n_samples if pool.name == TOP_POOL else n_other_samples
        if n_rows <= 0:
            continue
        body: list[RenderableType] = [note, legend] if not panels else []
        body += context_lines(pool, n_rows, tokenizer, max_activation, window, markers) or [Text("(empty)")]
        shown = min(n_rows, len(pool))
        title = f"{pool.name} ({shown} of {len(pool)} contexts)"
        panels.append(Panel(Group(*body), title=title, title_align="left"))
    return panels


def analysed_feature_count(cfg: Mapping) -> int | None:
    """How many features the analysis of a stored dictionary numbers (None when its config has no d_sae): d_sae,
    but d_sae per layer for a CLT, whose feature s * d_sae + i is feature i of layer s."""
    d_sae = cfg.get("d_sae")
    if d_sae is None:
        return None
    if cfg.get("sae_type") == "clt":
        return int(d_sae) * len(cfg.get("hook_points_in") or ())
    return int(d_sae)


def dictionary_label(cfg: Mapping) -> tuple[str, str]:
    """(sae_type, hooks) of a stored dictionary config: hooks as `in` when it reconstructs what it reads, else
    `in → out` (a transcoder); ("?", "?") parts for a config this version cannot read."""
    from lm_saes_core.models import SparseDictionary

    try:
        parsed = SparseDictionary.kind(str(cfg.get("sae_type"))).config_class.model_validate(dict(cfg))
    except ValueError:
        return str(cfg.get("sae_type", "?")), "?"
    hooks_in, hooks_out = ", ".join(parsed.hooks_in), ", ".join(parsed.hooks_out)
    return parsed.sae_type, hooks_in if hooks_in == hooks_out else f"{hooks_in} → {hooks_out}"


def dictionaries_table(
    dictionaries: Sequence[DictionaryRecord], analysed: Mapping[tuple[str, str], Mapping[str, int]]
) -> Table:
    """One row per dictionary: what it is, how it scored, how many of its features each analysis covered."""
    table = Table("series", "name", "model", "type", "d_sae", "hook", "EV", "L0", "dead", "analysed", "path")
    for record in dictionaries:
        cfg = record.cfg
        kind, hook = dictionary_label(cfg)
        counts = analysed.get((record.series, record.name), {})
        table.add_row(
            record.series,
            record.name,
            record.model_name or "",
            f"{kind}/{cfg.get('act_fn', '?')}",
            str(cfg.get("d_sae", "?")),
            hook,
            _metric(record.metrics, "explained_variance", "{:.3f}"),
            _metric(record.metrics, "l0", "{:.1f}"),
            _metric(record.metrics, "dead_fraction", "{:.1%}"),
            ", ".join(f"{name}: {count}" for name, count in counts.items()) or "0",
            record.path,
        )
    return table


def _metric(metrics: Mapping[str, float], name: str, spec: str) -> str:
    """Evaluation stores `metrics/<name>`; other writers may use the bare name."""
    value = metrics.get(f"metrics/{name}", metrics.get(name))
    return "" if value is None else spec.format(value)
