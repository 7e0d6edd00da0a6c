"""Ask the LLM for a one-sentence explanation of a feature from its highlighted strongest examples."""

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.autointerp.examples import Example
from lm_saes_core.analysis.autointerp.llm import LLMClient
from lm_saes_core.analysis.autointerp.parsing import find_json_object, get_key
from lm_saes_core.analysis.autointerp.prompts import explanation_messages

MAX_EXPLANATION_CHARS = 500
_EXPLANATION_STRING = re.compile(r'"(?:final_)?explanation"\s*:\s*"((?:[^"\\]|\\.)*)"', re.I)
_PLAIN_EXPLANATION = re.compile(r"(this feature (?:activates|fires|is active) (?:on|when|for|in)\b[^\n]*)", re.I)


class UnusableReplyError(ValueError):
    """The LLM answered, but nothing usable could be read from the answer; the message quotes its start."""


@dataclass
class Explanation:
    text: str
    consistency: int | None = None
    complexity: int | None = None
    steps: list[str] = field(default_factory=list)


def _score_1_to_5(value: Any) -> int | None:
    try:
        score = round(float(value))
    except (TypeError, ValueError):
        return None
    return score if 1 <= score <= 5 else None


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    # A sentence cut out of broken JSON may end in the string's closing quote and a comma.
    return (match.group(1) if match else text).strip().rstrip('",}').strip()


def parse_explanation(reply: str) -> Explanation:
    """The explanation in `reply`: the JSON object's "explanation" field, else a plain "This feature activates on
    ..." sentence; UnusableReplyError when there is neither."""
    obj = find_json_object(reply)
    if obj is not None:
        text = get_key(obj, "explanation", "final_explanation", "description")
        if isinstance(text, str) and text.strip():
            steps = get_key(obj, "steps")
            return Explanation(
                text=" ".join(text.split())[:MAX_EXPLANATION_CHARS],
                consistency=_score_1_to_5(get_key(obj, "consistency", "activation_consistency")),
                complexity=_score_1_to_5(get_key(obj, "complexity")),
                steps=[str(step) for step in steps] if isinstance(steps, list) else [],
            )
    # A reply cut off by max_tokens: the object never closes, but its explanation string may be complete.
    match = _EXPLANATION_STRING.search(reply)
    if match:
        text = json.loads(f'"{match.group(1)}"')
        if text.strip():
            return Explanation(text=" ".join(text.split())[:MAX_EXPLANATION_CHARS])
    match = _PLAIN_EXPLANATION.search(reply)
    if match:
        return Explanation(text=_first_sentence(match.group(1))[:MAX_EXPLANATION_CHARS])
    raise UnusableReplyError(f"no explanation in the reply (no JSON 'explanation' field): {reply[:200]!r}")


async def explain(
    llm: LLMClient, examples: list[Example], cfg: AutoInterpConfig
) -> tuple[Explanation | None, dict[str, Any]]:
    """The explanation (None when the reply is unusable) and the details to keep: prompt, raw reply, timing, error.
    LLMError (no reply at all) propagates."""
    texts = [example.highlighted(example.true_highlights(cfg.activation_threshold)) for example in examples]
    messages = explanation_messages(texts, cfg.include_cot)
    reply = await llm.chat(messages, max_tokens=cfg.max_tokens_explanation)
    details: dict[str, Any] = {
        "messages": messages,
        "response": reply.text,
        "elapsed_s": round(reply.elapsed_s, 3),
        "attempts": reply.attempts,
        "examples": [example.source for example in examples],
    }
    try:
        explanation = parse_explanation(reply.text)
    except UnusableReplyError as error:
        details["error"] = str(error)
        return None, details
    details.update(consistency=explanation.consistency, complexity=explanation.complexity, steps=explanation.steps)
    return explanation, details
