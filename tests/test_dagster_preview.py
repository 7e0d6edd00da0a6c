"""The markdown feature previews shown in the Dagster UI: exact text on a hand-made context."""

import numpy as np

from lm_saes_core.store import FeatureSamples
from lm_saes_dagster.preview import context_line, escape


class Pieces:
    """A tokenizer stand-in whose ids index a list of token strings (the preview only calls `decode`)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def samples(activations: list[float]) -> FeatureSamples:
    n = len(activations)
    return FeatureSamples(
        name="top_activations",
        tokens=np.arange(n, dtype=np.int32)[None],
        activations=np.array([activations], dtype=np.float32),
        lengths=np.array([n], dtype=np.int32),
        doc_index=np.zeros(1, dtype=np.int64),
        doc_position=np.zeros(1, dtype=np.int64),
        dataset=["train"],
    )


def test_activating_runs_are_bold_with_spaces_outside_and_the_peak_value_after_it():
    tokenizer = Pieces(["def", " f", "(x", "):", "\n", " return", " x", "*", "2"])
    line = context_line(samples([0, 1.0, 2.5, 0, 0, 0.5, 3.0, 0, 0]), 0, tokenizer, radius=10)
    assert line == r"def **f\(x**\):↵ **return x**⟨3.00⟩\*2"


def test_a_long_context_is_cut_around_its_peak():
    tokenizer = Pieces([f" w{i}" for i in range(30)])
    acts = [0.0] * 30
    acts[20] = 4.0
    assert context_line(samples(acts), 0, tokenizer, radius=2) == "…  w18 w19 **w20**⟨4.00⟩ w21 w22 …"


def test_escape_keeps_markdown_literal_and_whitespace_visible():
    assert escape("*_[x]`") == r"\*\_\[x\]\`"
    assert escape("\n") == "↵" and escape("  ") == "··" and escape("") == "∅"
