"""Reading JSON out of LLM replies that were asked for JSON but may wrap it in code fences or prose, or bend the
syntax (trailing commas, single quotes, Python literals)."""

import ast
import json
import re
from typing import Any

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _candidate_objects(text: str) -> list[str]:
    """Every balanced {...} span that starts at an opening brace outside a string, in order of appearance."""
    spans = []
    for start in (i for i, char in enumerate(text) if char == "{"):
        depth, quote, escaped = 0, None, False
        for end in range(start, len(text)):
            char = text[end]
            if quote:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == quote:
                    quote = None
            elif char in "\"'":
                quote = char
            elif char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    spans.append(text[start : end + 1])
                    break
    return spans


def _loads_lenient(candidate: str) -> Any:
    try:
        return json.loads(candidate)
    except json.JSONDecodeError:
        pass
    repaired = _TRAILING_COMMA.sub(r"\1", candidate)
    try:
        return json.loads(repaired)
    except json.JSONDecodeError:
        pass
    # Single quotes and Python's True/False/None: read it as a Python literal.
    pythonic = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", repaired)))
    try:
        return ast.literal_eval(pythonic)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def find_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text` (fenced blocks first), or None when there is none that parses."""
    sources = [*_FENCE.findall(text), text]
    for source in sources:
        for candidate in _candidate_objects(source):
            value = _loads_lenient(candidate)
            if isinstance(value, dict):
                return value
    return None


def get_key(obj: dict[str, Any], *names: str) -> Any:
    """`obj[name]` for the first of `names` present, matching keys case-insensitively; None when absent."""
    lowered = {str(key).strip().lower(): value for key, value in obj.items()}
    for name in names:
        if name in lowered:
            return lowered[name]
    return None


def as_bool(value: Any) -> bool | None:
    """true/false, yes/no, 1/0 in their usual spellings; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().strip(".").lower()
        if word in ("true", "yes", "y", "1", "active", "correct"):
            return True
        if word in ("false", "no", "n", "0", "inactive", "incorrect"):
            return False
    return None
