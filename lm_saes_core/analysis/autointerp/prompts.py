"""The chat messages sent to the LLM: one prompt to explain a feature, two to score an explanation.

Every prompt asks for a single JSON object, so the replies can be parsed without guessing; the parsers in
`parsing.py` still cope with the usual deviations (code fences, chatter around the object, trailing commas).
"""

Messages = list[dict[str, str]]

EXPLAIN_SYSTEM = """\
You study one feature of a neural network that reads text. A feature is active on some tokens and silent on the \
rest. You will see numbered text excerpts; in each, the tokens where the feature is most active are wrapped in \
<< and >>. Say briefly what the feature responds to.

Look at the marked tokens and at the words just before them. Find what they share: one particular word or word \
piece, a kind of word, a piece of syntax, or a topic. When the marked tokens differ but their surroundings have \
something in common, describe that.
{steps}
Reply with one JSON object and nothing else:
{{{steps_field}"explanation": "This feature activates on ...", "consistency": 1 to 5, "complexity": 1 to 5}}
- explanation: at most 20 words, starting with "This feature activates on".
- consistency: 5 when every excerpt fits the explanation, 1 when you found no shared pattern.
- complexity: 1 for a single word or token, 5 for a broad theme spread over many different words."""

EXPLAIN_STEPS = """
Work in at most three short steps and put them in "steps": 1. list the marked tokens; 2. note what the text around \
them has in common; 3. state the pattern.
"""
EXPLAIN_STEPS_FIELD = '"steps": [up to 3 short strings], '

DETECTION_SYSTEM = """\
A feature of a neural network that reads text has been described in one sentence. You will see numbered text \
excerpts. For each excerpt, decide whether the described feature would be active on at least one of its tokens.
Reply with one JSON object and nothing else: {"answers": [true or false for each excerpt, in order]}"""

FUZZING_SYSTEM = """\
A feature of a neural network that reads text has been described in one sentence. You will see numbered text \
excerpts in which some tokens are wrapped in << and >>. In some excerpts the marks sit on the tokens where the \
feature is really active; in others they were put on unrelated tokens. For each excerpt, decide whether the marked \
tokens fit the description.
Reply with one JSON object and nothing else: {"answers": [true or false for each excerpt, in order]}"""


def numbered(texts: list[str]) -> str:
    # Newlines inside an excerpt would blur where one ends; show them as spaces.
    return "\n".join(f"Excerpt {i}: {' '.join(text.split())}" for i, text in enumerate(texts, start=1))


def explanation_messages(highlighted_texts: list[str], include_cot: bool) -> Messages:
    # No worked example: small models copy it verbatim instead of reading the excerpts.
    system = EXPLAIN_SYSTEM.format(
        steps=EXPLAIN_STEPS if include_cot else "", steps_field=EXPLAIN_STEPS_FIELD if include_cot else ""
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": numbered(highlighted_texts)}]


def _judgement_messages(system: str, explanation: str, texts: list[str]) -> Messages:
    user = (
        f"Description: {explanation}\n\n{numbered(texts)}\n\n"
        f'Answer with {{"answers": [...]}} holding exactly {len(texts)} true/false values.'
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def detection_messages(explanation: str, texts: list[str]) -> Messages:
    return _judgement_messages(DETECTION_SYSTEM, explanation, texts)


def fuzzing_messages(explanation: str, highlighted_texts: list[str]) -> Messages:
    return _judgement_messages(FUZZING_SYSTEM, explanation, highlighted_texts)
