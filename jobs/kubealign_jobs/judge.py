"""Pairwise win rates judged by a model, as the DPO paper reports its summarisation and dialogue
results (GPT-4 as the judge).

For each prompt the judge sees the policy's answer and the baseline's twice, once in each order
(A/B, then B/A), so a judge that prefers whichever answer comes first cancels out:

- both orders prefer the policy: a win (1); both prefer the baseline: a loss (0);
- the orders disagree, or the judge says ``tie``: a tie (1/2);
- a verdict that cannot be parsed drops that order; with neither order parsed the prompt is
  ``unparseable`` and left out of the win rate (counted and reported).

The win rate is the mean outcome over judged prompts with a 95% percentile bootstrap interval
over prompts; ``length_controlled`` adds the win rate at equal answer length (a logistic fit of
the outcome on the words-length difference, its value at zero difference), since judges favour
longer answers.

Backends: ``OpenAIChat`` (any OpenAI-compatible ``/chat/completions`` server: vLLM, llama.cpp's
server, ``transformers serve``, a hosted API; batched, at most ``max_concurrency`` requests in
flight, retried with exponential backoff on connection errors, 429 and 5xx) and ``LocalChat`` (a
causal LM loaded in the evaluate pod, greedy). Every verdict is cached by (judge, prompt) in the
stage's output, so a retried evaluate pays for no comparison twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from kubealign_jobs import storage
from kubealign_jobs.stages import JudgeSettings

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES: Final = 2000

# In the style of the DPO paper's GPT-4 prompts (its appendix C.2): a one-sentence comparison
# first, then the verdict alone on the last line.
TEMPLATES: Final = {
    "dialogue": (
        "For the following query to a chatbot, which response is more helpful?\n\n"
        "Query: {query}\n\n"
        "Response A:\n{answer_a}\n\n"
        "Response B:\n{answer_b}\n\n"
        "FIRST provide a one-sentence comparison of the two responses and explain which you feel "
        'is more helpful. SECOND, on a new line, state only "A" or "B" to indicate which response '
        "is more helpful. Your response should use the format:\n"
        "Comparison: <one-sentence comparison and explanation>\n"
        'More helpful: <"A" or "B">'
    ),
    "summarization": (
        "Which of the following summaries does a better job of summarizing the most important "
        "points in the given forum post, without including unimportant or irrelevant details? A "
        "good summary is both precise and concise.\n\n"
        "Post:\n{query}\n\n"
        "Summary A:\n{answer_a}\n\n"
        "Summary B:\n{answer_b}\n\n"
        "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer "
        'and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your '
        "response should use the format:\n"
        "Comparison: <one-sentence comparison and explanation>\n"
        'Preferred: <"A" or "B">'
    ),
}

_VERDICT_LINE = re.compile(
    r"^\W*(?:more helpful|preferred|preference|verdict|answer|winner|better)\W*[:\-]\W*"
    r"(?:response |summary )?(a|b|tie)\b",
    re.IGNORECASE,
)
_BARE = re.compile(r"^\W*(?:response |summary )?(a|b|tie)\W*$", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge could not be reached after every retry."""


def render(template: str, query: str, answer_a: str, answer_b: str) -> str:
    """The judge's prompt: a named template or the user's own, with the three fields filled in."""
    text = TEMPLATES.get(template, template)
    return text.replace("{query}", query).replace("{answer_a}", answer_a).replace("{answer_b}", answer_b)


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge's reply, or None: the last verdict line wins
    (``More helpful: A``, ``Preferred: "B"``...), else a last line that is only A, B or tie."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        found = _VERDICT_LINE.match(line)
        if found:
            return _normal(found.group(1))
    if lines:
        bare = _BARE.match(lines[-1])
        if bare:
            return _normal(bare.group(1))
    return None


def _normal(verdict: str) -> str:
    return "tie" if verdict.lower() == "tie" else verdict.upper()


def outcome(policy_first: str | None, policy_second: str | None) -> float | None:
    """The policy's result over both orders: ``policy_first`` is the verdict with the policy as A,
    ``policy_second`` with the policy as B. 1 win, 0 loss, 1/2 tie, None when neither parsed."""
    scores = []
    if policy_first is not None:
        scores.append({"A": 1.0, "B": 0.0, "tie": 0.5}[policy_first])
    if policy_second is not None:
        scores.append({"B": 1.0, "A": 0.0, "tie": 0.5}[policy_second])
    if not scores:
        return None
    mean = sum(scores) / len(scores)
    # Two orders that disagree are a tie, whatever each said.
    return 0.5 if len(scores) == 2 and scores[0] != scores[1] else mean


def bootstrap_interval(values: Sequence[float], *, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``values`` (resampling the values)."""
    if not values:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOTSTRAP_RESAMPLES))
    low = means[int((1 - level) / 2 * (BOOTSTRAP_RESAMPLES - 1))]
    high = means[int((1 + level) / 2 * (BOOTSTRAP_RESAMPLES - 1))]
    return (low, high)


def length_controlled_win_rate(outcomes: Sequence[float], length_difference: Sequence[float]) -> float:
    """The win rate at equal length: a logistic regression of the outcome (1, 1/2, 0) on the
    standardised length difference (policy minus baseline), evaluated at zero difference.

    Fitted by Newton's method with a small ridge on the slope, so it stays finite when length
    separates the outcomes; with no length spread it is the plain win rate.
    """
    n = len(outcomes)
    if n == 0:
        return math.nan
    mean = sum(length_difference) / n
    spread = math.sqrt(sum((d - mean) ** 2 for d in length_difference) / n)
    if spread == 0:
        return sum(outcomes) / n
    xs = [(d - mean) / spread for d in length_difference]
    zero = -mean / spread  # equal length, in standardised units
    a = b = 0.0
    ridge = 1e-3 * n
    for _ in range(50):
        ps = [1 / (1 + math.exp(-(a + b * x))) for x in xs]
        ga = sum(y - p for y, p in zip(outcomes, ps, strict=True))
        gb = sum((y - p) * x for y, p, x in zip(outcomes, ps, xs, strict=True)) - ridge * b
        ws = [p * (1 - p) for p in ps]
        haa = sum(ws) + 1e-9
        hab = sum(w * x for w, x in zip(ws, xs, strict=True))
        hbb = sum(w * x * x for w, x in zip(ws, xs, strict=True)) + ridge
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if abs(da) + abs(db) < 1e-10:
            break
    return 1 / (1 + math.exp(-(a + b * zero)))


# ---------------------------------------------------------------------------- backends


class ChatBackend(Protocol):
    name: str

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """One reply per prompt, each a single user turn, in order."""
        ...


class OpenAIChat:
    """An OpenAI-compatible chat completions server, greedy (temperature 0)."""

    def __init__(
        self, settings: JudgeSettings, api_key: str | None = None, sleep: Callable[[float], None] = time.sleep
    ):
        assert settings.endpoint and settings.model
        self.url = settings.endpoint.rstrip("/") + "/chat/completions"
        self.model = settings.model
        self.settings = settings
        self.api_key = api_key
        self.name = f"{settings.model}@{settings.endpoint}"
        self.calls = 0
        self._sleep = sleep

    def complete(self, prompts: Sequence[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            return list(pool.map(self._one, prompts))

    def _one(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": self.settings.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.settings.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            retry_after: float | None = None
            try:
                self.calls += 1
                with urllib.request.urlopen(request, timeout=self.settings.timeout_seconds) as response:
                    text = response.read().decode()
                return reply_content(text)
            except urllib.error.HTTPError as exc:
                # 429 and 5xx are the server's to recover from; anything else is our request's fault.
                if exc.code != 429 and exc.code < 500:
                    detail = exc.read().decode(errors="replace")[:300]
                    raise JudgeError(f"judge {self.url}: HTTP {exc.code}: {detail}") from exc
                header = exc.headers.get("Retry-After") if exc.headers else None
                retry_after = float(header) if header and header.replace(".", "", 1).isdigit() else None
                problem = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                problem = str(exc)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise JudgeError(f"judge {self.url}: not a chat completions reply: {exc}") from exc
            if attempt == self.settings.max_retries:
                raise JudgeError(f"judge {self.url}: {problem} after {attempt + 1} attempts")
            wait = retry_after if retry_after is not None else min(30.0, 0.5 * 2**attempt)
            log.warning("judge %s: %s; retrying in %.1fs", self.url, problem, wait)
            self._sleep(wait)
        raise AssertionError("unreachable")


def reply_content(text: str) -> str:
    """The assistant's text from a chat completions reply: one JSON object, or (some servers stream
    whatever was asked, e.g. ``transformers serve``) server-sent ``data:`` chunks of deltas."""
    if not text.lstrip().startswith("data:"):
        return str(json.loads(text)["choices"][0]["message"]["content"] or "")
    parts = []
    for line in text.splitlines():
        payload = line.removeprefix("data:").strip()
        if not line.startswith("data:") or not payload or payload == "[DONE]":
            continue
        for choice in json.loads(payload).get("choices", []):
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


class LocalChat:
    """A causal LM in this process answering with its chat template, greedily, in batches."""

    def __init__(self, model_dir: Path, settings: JudgeSettings, *, device: Any, batch_size: int) -> None:
        from kubealign_jobs import model as models

        self.tokenizer = models.load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = models.load_causal_lm(model_dir).to(device).eval()
        self.device, self.batch_size, self.settings = device, batch_size, settings
        self.name = f"local:{settings.model_uri}"
        self.calls = 0

    def complete(self, prompts: Sequence[str]) -> list[str]:
        import torch

        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                if getattr(self.tokenizer, "chat_template", None)
                else f"{p}\n"
                for p in chunk
            ]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                self.device
            )
            with torch.inference_mode():
                out = self.model.generate(
                    **batch,
                    max_new_tokens=self.settings.max_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = out[:, batch["input_ids"].shape[1] :]
            replies += self.tokenizer.batch_decode(new, skip_special_tokens=True)
            self.calls += len(chunk)
        return replies


# ---------------------------------------------------------------------------- the cache


class VerdictCache:
    """Replies by (judge, prompt), kept under a storage prefix as JSON parts written as they come."""

    def __init__(self, prefix: str | None) -> None:
        self.prefix = prefix
        self.replies: dict[str, str] = {}
        self._new: dict[str, str] = {}
        self._parts = 0
        if prefix is not None:
            for name, _size in storage.list_files(prefix):
                if name.endswith(".json"):
                    self.replies.update(storage.read_json(storage.join(prefix, name)))
                    self._parts += 1

    @staticmethod
    def key(judge: str, prompt: str) -> str:
        return hashlib.sha256(json.dumps([judge, prompt]).encode()).hexdigest()

    def put(self, key: str, reply: str) -> None:
        self.replies[key] = reply
        self._new[key] = reply

    def flush(self) -> None:
        if self.prefix is None or not self._new:
            return
        digest = hashlib.sha256("".join(sorted(self._new)).encode()).hexdigest()[:12]
        storage.write_json(storage.join(self.prefix, f"part-{self._parts:05d}-{digest}.json"), self._new)
        self._parts += 1
        self._new = {}


# ---------------------------------------------------------------------------- judging


@dataclass
class Judged:
    """One cell's verdicts: outcomes per prompt (None: unparseable) and the raw replies."""

    outcomes: list[float | None]
    replies: list[tuple[str, str]] = field(default_factory=list)  # (policy as A, policy as B)

    def summary(
        self, answers: Sequence[str], baselines: Sequence[str], *, length_controlled: bool, seed: int
    ) -> dict[str, float]:
        kept = [(o, a, b) for o, a, b in zip(self.outcomes, answers, baselines, strict=True) if o is not None]
        values = [o for o, _, _ in kept]
        out = {
            "judge_wins": float(sum(1 for v in values if v == 1.0)),
            "judge_ties": float(sum(1 for v in values if v == 0.5)),
            "judge_losses": float(sum(1 for v in values if v == 0.0)),
            "judge_unparseable": float(len(self.outcomes) - len(values)),
            "judge_n": float(len(values)),
        }
        if not values:
            # No verdict parsed: no rate to report (and no NaN for JSON, the status or the tracker).
            return out
        low, high = bootstrap_interval(values, seed=seed)
        out.update(judge_win_rate=sum(values) / len(values), judge_win_rate_low=low, judge_win_rate_high=high)
        if length_controlled:
            difference = [len(a.split()) - len(b.split()) for _, a, b in kept]
            out["judge_lc_win_rate"] = length_controlled_win_rate(values, difference)
        return out


class PairwiseJudge:
    """Asks ``backend`` about each (query, policy answer, baseline answer) in both orders."""

    def __init__(self, backend: ChatBackend, template: str, cache: VerdictCache) -> None:
        self.backend, self.template, self.cache = backend, template, cache
        self.asked = 0  # prompts sent to the backend (cache misses)

    def judge(self, queries: Sequence[str], answers: Sequence[str], baselines: Sequence[str]) -> Judged:
        prompts: list[str] = []
        for query, answer, baseline in zip(queries, answers, baselines, strict=True):
            prompts.append(render(self.template, query, answer, baseline))  # the policy as A
            prompts.append(render(self.template, query, baseline, answer))  # the policy as B
        keys = [VerdictCache.key(self.backend.name, p) for p in prompts]
        missing = sorted(
            {k: p for k, p in zip(keys, prompts, strict=True) if k not in self.cache.replies}.items()
        )
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            replies = self.backend.complete([p for _, p in chunk])
            self.asked += len(chunk)
            for (key, _), reply in zip(chunk, replies, strict=True):
                self.cache.put(key, reply)
            self.cache.flush()  # a killed evaluate keeps every chunk it paid for
        replies = [self.cache.replies[k] for k in keys]
        pairs = list(zip(replies[0::2], replies[1::2], strict=True))
        return Judged(
            outcomes=[outcome(parse_verdict(first), parse_verdict(second)) for first, second in pairs],
            replies=pairs,
        )


def query_format(messages: list[dict[str, str]], _add_generation_prompt: bool) -> str:
    """Chat turns as the judge reads them: a lone user turn as its text, else ``role: text`` lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
