"""Scoring an explanation on held-out examples: can the LLM, told only the explanation, tell where the feature fires?

* detection: shuffled activating and non-activating excerpts, no highlights; "is the feature active anywhere here?"
* fuzzing: activating excerpts, some with their true highlights and some with the highlights moved onto tokens
  where the feature is silent; "do the marked tokens fit the explanation?"

Missing answers (a reply with fewer values than excerpts, or values that are not booleans) count as wrong, so a
reply the scorer cannot read never earns credit.
"""

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.autointerp.examples import Example
from lm_saes_core.analysis.autointerp.llm import LLMClient
from lm_saes_core.analysis.autointerp.parsing import as_bool, find_json_object, get_key
from lm_saes_core.analysis.autointerp.prompts import Messages, detection_messages, fuzzing_messages
from lm_saes_core.store.records import InterpretationScore


@dataclass
class ScorerOutcome:
    """A scorer's score, or why it has none: `skipped` (not enough examples, not an error) or `error`."""

    method: str
    score: InterpretationScore | None
    details: dict[str, Any]
    skipped: str | None = None
    error: str | None = None


def binary_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean of the true-positive and true-negative rates), precision and recall of
    bool predictions against bool labels; a rate with an empty denominator is 0."""
    labels, predictions = labels.astype(bool), predictions.astype(bool)
    tp = int(np.sum(labels & predictions))
    tn = int(np.sum(~labels & ~predictions))
    fp = int(np.sum(~labels & predictions))
    fn = int(np.sum(labels & ~predictions))
    recall = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    rates = [rate for rate, n in ((recall, tp + fn), (specificity, tn + fp)) if n]
    return {
        "accuracy": (tp + tn) / len(labels) if len(labels) else 0.0,
        "balanced_accuracy": float(np.mean(rates)) if rates else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": recall,
    }


def parse_answers(reply: str, n: int) -> list[bool | None]:
    """`n` answers read from the reply's "answers" list (or an object keyed by excerpt number); None where the reply
    gives no readable answer."""
    answers: list[bool | None] = [None] * n
    obj = find_json_object(reply)
    if obj is None:
        return answers
    values = get_key(obj, "answers", "evaluation_results", "results")
    if isinstance(values, str):  # "true, false, true"
        values = [word for word in re.split(r"[\s,;]+", values) if word]
    if isinstance(values, list):
        for i, value in enumerate(values[:n]):
            answers[i] = as_bool(value)
    elif isinstance(values, dict) or values is None:
        keyed = values if isinstance(values, dict) else obj
        for i in range(n):
            value = get_key(keyed, str(i + 1), f"excerpt {i + 1}", f"excerpt_{i + 1}")
            answers[i] = as_bool(value) if value is not None else None
    return answers


async def _judge(
    llm: LLMClient,
    method: str,
    messages: Messages,
    labels: np.ndarray,
    sources: list[str],
    cfg: AutoInterpConfig,
) -> ScorerOutcome:
    reply = await llm.chat(messages, max_tokens=cfg.max_tokens_scoring)
    answers = parse_answers(reply.text, len(labels))
    # An unreadable answer is scored as the wrong answer.
    predictions = np.array([not y if answer is None else answer for answer, y in zip(answers, labels, strict=True)])
    metrics = binary_metrics(labels, predictions)
    score = InterpretationScore(
        method=method,
        accuracy=metrics["accuracy"],
        balanced_accuracy=metrics["balanced_accuracy"],
        precision=metrics["precision"],
        recall=metrics["recall"],
        n_examples=len(labels),
        passed=metrics["balanced_accuracy"] >= cfg.pass_threshold,
    )
    details = {
        "messages": messages,
        "response": reply.text,
        "elapsed_s": round(reply.elapsed_s, 3),
        "attempts": reply.attempts,
        "labels": labels.tolist(),
        "answers": answers,
        "n_unreadable_answers": sum(answer is None for answer in answers),
        "examples": sources,
    }
    return ScorerOutcome(method, score, details)


async def detection(
    llm: LLMClient,
    explanation: str,
    held_out: list[Example],
    non_activating: list[Example],
    cfg: AutoInterpConfig,
    rng: np.random.Generator,
) -> ScorerOutcome:
    n = cfg.detection_n_examples
    if len(held_out) < n or len(non_activating) < n:
        reason = (
            f"needs {n} held-out activating and {n} non-activating examples, has {len(held_out)} and "
            f"{len(non_activating)}"
        )
        return ScorerOutcome("detection", None, {"skipped": reason}, skipped=reason)
    positives = [held_out[i] for i in rng.choice(len(held_out), n, replace=False)]
    negatives = [non_activating[i] for i in rng.choice(len(non_activating), n, replace=False)]
    examples = positives + negatives
    labels = np.array([True] * n + [False] * n)
    order = rng.permutation(len(examples))
    examples, labels = [examples[i] for i in order], labels[order]
    messages = detection_messages(explanation, [example.text() for example in examples])
    return await _judge(llm, "detection", messages, labels, [example.source for example in examples], cfg)


def misplaced_highlights(example: Example, threshold: float, rng: np.random.Generator) -> np.ndarray | None:
    """A highlight mask with as many marks as the true one, on visible tokens where the feature is silent; None when
    the example has no such tokens."""
    n_marks = max(1, int(example.true_highlights(threshold).sum()))
    silent = np.flatnonzero((example.activations <= 0) & np.array([bool(piece.strip()) for piece in example.pieces]))
    if len(silent) == 0:
        return None
    mask = np.zeros(len(example.pieces), dtype=bool)
    mask[rng.choice(silent, min(n_marks, len(silent)), replace=False)] = True
    return mask


async def fuzzing(
    llm: LLMClient, explanation: str, held_out: list[Example], cfg: AutoInterpConfig, rng: np.random.Generator
) -> ScorerOutcome:
    n_correct, n_incorrect = cfg.fuzzing_n_correct, cfg.fuzzing_n_incorrect
    if len(held_out) < n_correct + n_incorrect:
        reason = f"needs {n_correct + n_incorrect} held-out activating examples, has {len(held_out)}"
        return ScorerOutcome("fuzzing", None, {"skipped": reason}, skipped=reason)
    chosen = [held_out[i] for i in rng.permutation(len(held_out))]
    texts, labels, sources = [], [], []
    for example in chosen:
        correct = len(texts) < n_correct
        if correct:
            mask = example.true_highlights(cfg.activation_threshold)
        else:
            mask = misplaced_highlights(example, cfg.activation_threshold, rng)
            if mask is None:  # active on every visible token: cannot be mis-highlighted, try the next one
                continue
        texts.append(example.highlighted(mask))
        labels.append(correct)
        sources.append(example.source)
        if len(texts) == n_correct + n_incorrect:
            break
    if len(texts) < n_correct + n_incorrect:
        reason = f"only {len(texts) - n_correct} of the held-out examples have silent tokens to mis-highlight"
        return ScorerOutcome("fuzzing", None, {"skipped": reason}, skipped=reason)
    order = rng.permutation(len(texts))
    texts, sources = [texts[i] for i in order], [sources[i] for i in order]
    messages = fuzzing_messages(explanation, texts)
    return await _judge(llm, "fuzzing", messages, np.array(labels)[order], sources, cfg)
