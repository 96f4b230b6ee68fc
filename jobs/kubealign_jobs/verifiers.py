"""Verifiable rewards: score a completion against the row's reference ``answer``, 1.0 or 0.0.

Rows are ``{prompt, answer}``; each scorer reads the completion as a model writes it (leading
spaces, a trailing sentence, another format of the same number) and decides whether it holds
the answer:

- ``exact_match``: the completion's first non-empty line equals the answer, ignoring case,
  surrounding and repeated whitespace, and trailing ``.``; anything else on that line fails.
- ``math``: the completion's number equals the answer's, numerically (1e-6 relative): the
  first number of its final answer (``\\boxed{...}``, else after ``####``, else after the last
  ``=``, else anywhere in the completion).
  ``1,234``, ``1234.0``, ``+1234``, ``\u22121234`` (a Unicode minus), ``3/4``, ``50%`` and ``1e3``
  are numbers; text around them is ignored.
- ``regex``: the completion contains a match of ``pattern``, in which ``{answer}`` stands for
  the row's answer, escaped.

``combined`` adds weighted scorers: ``{"exact_match": 1.0, "math": 0.5}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Final

VERIFIERS: Final = ("exact_match", "math", "regex")

_SPACE = re.compile(r"\s+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# A signed decimal with optional thousands separators, exponent, fraction or percent sign.
MINUS: Final = "\u2212"
_SIGN = rf"[+\-{MINUS}]?"
_NUMBER = re.compile(
    rf"(?<![\w.]){_SIGN}(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?(?:[eE][+\-]?\d+)?(?:\s*/\s*\d+)?%?"
    rf"|(?<![\w.]){_SIGN}\.\d+"
)


def _normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip().rstrip(".").strip().casefold()


def exact_match(completion: str, answer: str) -> float:
    lines = [line for line in completion.splitlines() if line.strip()]
    return 1.0 if lines and _normalise(lines[0]) == _normalise(answer) else 0.0


def parse_number(text: str) -> float | None:
    """The first number in ``text`` as a float, or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    # "50%" answers "what percent" as 50 does; separators and spaces carry no value.
    token = match.group(0).replace(MINUS, "-").replace(",", "").replace(" ", "").rstrip("%")
    try:
        return float(Fraction(token)) if "/" in token else float(token)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(completion: str) -> str:
    """Where a completion states its result: the last ``\\boxed{...}``, else what follows the last
    ``####`` (GSM8K's marker), else what follows the last ``=``, else the whole completion."""
    boxed = _BOXED.findall(completion)
    if boxed:
        return str(boxed[-1])
    for marker in ("####", "="):
        if marker in completion:
            return completion.rsplit(marker, 1)[1]
    return completion


def math_match(completion: str, answer: str) -> float:
    got = parse_number(final_answer(completion))
    want = parse_number(answer)
    if got is None or want is None:
        return 0.0
    return 1.0 if math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9) else 0.0


def regex_match(completion: str, answer: str, pattern: str) -> float:
    compiled = re.compile(pattern.replace("{answer}", re.escape(answer.strip())))
    return 1.0 if compiled.search(completion) else 0.0


Verifier = Callable[[str, str], float]


def verifier(name: str, *, pattern: str | None = None) -> Verifier:
    """The scorer ``name``; ``regex`` needs ``pattern``. ValueError names what is wrong."""
    if name == "exact_match":
        return exact_match
    if name == "math":
        return math_match
    if name == "regex":
        if not pattern:
            raise ValueError("hyperparameters.regex: the regex verifier needs a pattern")
        try:
            re.compile(pattern.replace("{answer}", "x"))
        except re.error as exc:
            raise ValueError(f"hyperparameters.regex: not a regular expression: {exc}") from exc
        return lambda completion, answer: regex_match(completion, answer, pattern)
    raise ValueError(f"hyperparameters.verifiers.{name}: unknown verifier; one of {', '.join(VERIFIERS)}")


def combined(
    weights: Mapping[str, float], *, pattern: str | None = None
) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """A batch scorer: the weighted sum of the named verifiers for each (completion, answer)."""
    parts = [(verifier(name, pattern=pattern), float(weight)) for name, weight in weights.items()]

    def score(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
        return [sum(w * check(c, a) for check, w in parts) for c, a in zip(completions, answers, strict=True)]

    return score
