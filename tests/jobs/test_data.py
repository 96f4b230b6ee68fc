"""Data: row formats, errors that name file/line/field, tokenisation boundaries, resumable sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kubealign_jobs import data, storage
from kubealign_jobs import model as models
from kubealign_jobs.data import DataError, DataPosition, EpochSampler
from tests.jobs.trainer_toys import preference_rows, sentences, write_jsonl


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return models.train_tokenizer(sentences(200), vocab_size=300)


def test_sft_row_formats(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"prompt": "2+2=", "completion": "4"},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]},
    ]
    examples = data.load(str(write_jsonl(tmp_path / "sft.jsonl", rows)), tmp_path, data.sft_example)
    assert examples[0] == data.SFTExample("### Instruction:\nSay hi\n\n### Response:\n", "hi")
    assert examples[1].prompt == "### Instruction:\nTranslate\n\n### Input:\nchat\n\n### Response:\n"
    assert examples[2] == data.SFTExample("2+2=", "4")
    assert examples[3] == data.SFTExample("<|user|>\nhello\n<|assistant|>\n", "hi there\n")


def test_preference_and_ranked_rows(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"question": "What is your name?", "chosen": "My name is Mary", "rejected": "Whats it to you?"},
        {"prompt": "q", "responses": ["a", "b", "c"]},
    ]
    path = str(write_jsonl(tmp_path / "prefs.jsonl", rows))
    pair = data.load(path, tmp_path, data.ranked_example)
    assert pair[0] == data.RankedExample("What is your name?", ("My name is Mary", "Whats it to you?"))
    assert pair[1].responses == ("a", "b", "c")
    with pytest.raises(DataError, match=r"prefs\.jsonl: line 2: field 'chosen': missing"):
        data.load(path, tmp_path, data.preference_example)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": '],
            r"line 2: not valid JSON",
        ),
        (['{"prompt": "a", "chosen": "b"}'], r"line 1: field 'rejected': missing"),
        (
            ['{"prompt": "a", "chosen": 3, "rejected": "c"}'],
            r"line 1: field 'chosen': expected a string, got int",
        ),
        (['{"chosen": "b", "rejected": "c"}'], r"line 1: field 'prompt': missing \(or 'question'\)"),
        (["", '{"prompt": " ", "chosen": "b", "rejected": "c"}'], r"line 2: field 'prompt': empty"),
        (['["a"]'], r"line 1: expected a JSON object, got list"),
        (
            ['{"prompt": "a", "chosen": "same", "rejected": "same "}'],
            r"line 1: field 'rejected': the same answer as 'chosen'",
        ),
        (['{"prompt": "a", "chosen": "b", "rejected": "  "}'], r"line 1: field 'rejected': empty"),
    ],
)
def test_malformed_preference_rows_name_file_line_and_field(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl: {message}"):
        data.load(str(path), tmp_path, data.preference_example)


def test_malformed_chat_and_ranking(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    with pytest.raises(DataError, match=r"line 1: field 'messages\[1\]\.role': 'robot' is not one of"):
        data.load(str(write_jsonl(tmp_path / "chat.jsonl", [chat])), tmp_path, data.sft_example)
    ranked = {"prompt": "q", "responses": ["a", ""]}
    with pytest.raises(DataError, match=r"line 1: field 'responses\[1\]': expected a non-empty string"):
        data.load(str(write_jsonl(tmp_path / "rank.jsonl", [ranked])), tmp_path, data.ranked_example)
    repeated = {"prompt": "q", "responses": ["a", "b", "a"]}
    with pytest.raises(DataError, match=r"line 1: field 'responses\[2\]': the same answer as an earlier one"):
        data.load(str(write_jsonl(tmp_path / "again.jsonl", [repeated])), tmp_path, data.ranked_example)


def test_reading_inputs_leaves_their_folder_byte_identical(tmp_path: Path) -> None:
    import datasets

    inputs = tmp_path / "upstream-artifact"
    inputs.mkdir()
    datasets.Dataset.from_list([{"text": "hello"}, {"text": "world"}]).to_parquet(
        str(inputs / "corpus.parquet")
    )
    (inputs / "corpus.txt").write_text("hello\nworld\n")
    (inputs / "rows.jsonl").write_text('{"text": "hello"}\n')

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(inputs)): p.read_bytes() for p in sorted(inputs.rglob("*")) if p.is_file()}

    before = snapshot()
    for name in ("corpus.parquet", "corpus.txt", "rows.jsonl"):
        rows = data.read_rows(str(inputs / name), tmp_path / "scratch")
        assert rows[0].fields["text"] == "hello"
    assert snapshot() == before and sorted(p.name for p in inputs.iterdir()) == sorted(before)


def test_a_file_that_is_not_parquet_names_itself(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        data.read_rows(str(tmp_path / "broken.parquet"), tmp_path / "scratch")


def test_parquet_rows_and_errors(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"text": "hello"}, {"text": ""}]).to_parquet(str(tmp_path / "corpus.parquet"))
    with pytest.raises(DataError, match=r"corpus\.parquet: row 2: field 'text': empty"):
        data.load(str(tmp_path / "corpus.parquet"), tmp_path, data.text_of)


@pytest.mark.s3
def test_prefix_of_files_on_s3(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/data"
    storage.write_text(f"{uri}/a.jsonl", "".join(json.dumps(r) + "\n" for r in preference_rows(3)))
    storage.write_text(f"{uri}/b.jsonl", "".join(json.dumps(r) + "\n" for r in preference_rows(2, seed=1)))
    assert len(data.load(uri, tmp_path, data.preference_example)) == 5
    storage.write_text(f"{uri}/c.jsonl", '{"prompt": "x"}\n')
    with pytest.raises(DataError, match=rf"s3://{bucket}/data/c\.jsonl: line 1: field 'chosen': missing"):
        data.load(uri, tmp_path / "again", data.preference_example)


def test_prompt_completion_encoding_masks_the_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    encoded = data.encode_prompt_completion(tokenizer, "Review the plot:", " it was good.", max_length=64)
    prompt_ids = [
        tokenizer.bos_token_id,
        *tokenizer("Review the plot:", add_special_tokens=False)["input_ids"],
    ]
    assert list(encoded.ids[: encoded.prompt_length]) == prompt_ids
    assert encoded.ids[-1] == tokenizer.eos_token_id
    batch = data.collate([encoded, data.Encoded((1, 5, 6), 2)], pad_token_id=0)
    assert batch.completion_mask[0].tolist() == [0] * encoded.prompt_length + [1] * (
        len(encoded.ids) - encoded.prompt_length
    )
    assert batch.completion_mask[1].tolist()[:3] == [0, 0, 1]
    assert batch.attention_mask[1].sum() == 3 and batch.input_ids[1, 3:].eq(0).all()


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer: PreTrainedTokenizerFast) -> None:
    long_prompt = " ".join(["the movie was good"] * 40)
    encoded = data.encode_prompt_completion(tokenizer, long_prompt, " it was dull.", max_length=24)
    assert len(encoded.ids) == 24
    completion = tokenizer(" it was dull.", add_special_tokens=False)["input_ids"]
    assert list(encoded.ids[encoded.prompt_length :]) == [*completion, tokenizer.eos_token_id]
    # bos stays first; the prompt's end is kept next to the answer.
    prompt = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert encoded.ids[0] == tokenizer.bos_token_id
    assert list(encoded.ids[1 : encoded.prompt_length]) == prompt[-(encoded.prompt_length - 1) :]


@pytest.mark.parametrize("max_length", [8, 12, 17])
def test_truncation_keeps_bos_first_and_eos_last(tokenizer: PreTrainedTokenizerFast, max_length: int) -> None:
    """A reward model reads its score at the last token: a long answer must still end in eos."""
    long_answer = " " + " ".join(["it was good and dull"] * 20)
    encoded = data.encode_prompt_completion(tokenizer, "Review the plot:", long_answer, max_length=max_length)
    assert len(encoded.ids) == max_length
    assert encoded.ids[0] == tokenizer.bos_token_id
    assert encoded.ids[-1] == tokenizer.eos_token_id
    answer = tokenizer(long_answer, add_special_tokens=False)["input_ids"]
    assert list(encoded.ids[encoded.prompt_length : -1]) == answer[: max_length - encoded.prompt_length - 1]
    # A template's eos with a token after it (SmolLM2's "<|im_end|>\n") keeps both at the end.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    joined = data.join_prompt_completion(
        tokenizer, [5, 6], [*answer, tokenizer.eos_token_id, *newline], max_length=max_length
    )
    assert list(joined.ids[-1 - len(newline) :]) == [tokenizer.eos_token_id, *newline]
    assert len(joined.ids) == max_length


def test_pack_texts_blocks(tokenizer: PreTrainedTokenizerFast) -> None:
    blocks = data.pack_texts(tokenizer, sentences(30), block_size=16)
    assert blocks.shape[1] == 16 and blocks.shape[0] >= 10
    assert int((blocks == tokenizer.eos_token_id).sum()) >= 29
    with pytest.raises(DataError, match="fewer than one block"):
        data.pack_texts(tokenizer, ["hi"], block_size=512)


def test_sampler_resumes_exactly_and_never_repeats_within_an_epoch() -> None:
    sampler = EpochSampler(23, 5, seed=7)
    assert sampler.steps_per_epoch == 4
    position = DataPosition()
    straight = []
    for _ in range(10):
        batch, position = sampler.next_batch(position)
        straight.append(batch)
    first_epoch = [i for batch in straight[:4] for i in batch]
    assert len(set(first_epoch)) == 20  # 3 examples dropped, none repeated
    assert straight[4] != straight[0]  # a new permutation each epoch

    resumed_position = DataPosition()
    for _ in range(6):
        _, resumed_position = EpochSampler(23, 5, seed=7).next_batch(resumed_position)
    restored = DataPosition.from_dict(json.loads(json.dumps(resumed_position.to_dict())))
    fresh = EpochSampler(23, 5, seed=7)  # a restarted process: nothing but the position survives
    rest = []
    for _ in range(4):
        batch, restored = fresh.next_batch(restored)
        rest.append(batch)
    assert rest == straight[6:]


def test_shard_splits_global_batch() -> None:
    assert data.shard([5, 6, 7, 8], rank=1, world_size=2) == [7, 8]
    with pytest.raises(DataError, match="fewer than one batch"):
        EpochSampler(3, 4, seed=0)


def test_collate_pads_to_multiple() -> None:
    batch = data.collate([data.Encoded((1, 2, 3), 1)], pad_token_id=9, pad_to_multiple_of=8)
    assert batch.input_ids.shape == (1, 8)
    assert batch.num_completion_tokens == 2
    assert torch.equal(batch.input_ids[0, 3:], torch.full((5,), 9))


def test_batched_encoding_equals_one_by_one(tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [data.RankedExample("Review the plot:", (" good.", " it was dull and long.", " x"))] * 3
    rows.append(data.RankedExample(" ".join(["the movie was good"] * 30), (" bad.", " fine.")))
    batched = data.encode_rankings(tokenizer, rows, max_length=32)
    single = [
        data.EncodedRanking(
            tuple(data.encode_prompt_completion(tokenizer, r.prompt, a, max_length=32) for a in r.responses)
        )
        for r in rows
    ]
    assert batched == single
    sft = [data.SFTExample(r.prompt, r.responses[0]) for r in rows]
    assert data.encode_sft(tokenizer, sft, max_length=32) == [s.sequences[0] for s in single]


# ---------------------------------------------------------------------------- chat preferences

# A ChatML template like SmolLM2's: bos opens each turn, eos closes it.
CHATML = (
    "{% for m in messages %}{{ '<|bos|>' + m['role'] + '\n' + m['content'] + '<|eos|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bos|>assistant\n' }}{% endif %}"
)


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.fixture()
def chat_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    templated = models.tokenizer_from_json(tokenizer.backend_tokenizer.to_str())
    templated.chat_template = CHATML
    return templated


def test_chat_preference_rows_explicit_and_shared_prompt(tmp_path: Path) -> None:
    question = [turn("user", "What is your name?")]
    rows = [
        {
            "prompt": question,
            "chosen": [turn("assistant", "My name is Mary")],
            "rejected": [turn("assistant", "Whats it to you?")],
        },
        {
            "chosen": [*question, turn("assistant", "My name is Mary")],
            "rejected": [*question, turn("assistant", "Whats it to you?")],
        },
    ]
    explicit, shared = data.load(
        str(write_jsonl(tmp_path / "p.jsonl", rows)), tmp_path, data.preference_example
    )
    assert explicit == shared
    assert explicit.prompt == "<|user|>\nWhat is your name?\n<|assistant|>\n"
    assert (explicit.chosen, explicit.rejected) == ("My name is Mary\n", "Whats it to you?\n")
    # The same prompt for sampling (generate, ppo, evaluate) and for the data baseline.
    assert data.prompt_text(data.read_rows(str(tmp_path / "p.jsonl"), tmp_path)[0]) == explicit.prompt
    ranked = data.load(str(tmp_path / "p.jsonl"), tmp_path, data.ranked_example)[0]
    assert ranked.responses == (explicit.chosen, explicit.rejected)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": [turn("user", "q")], "chosen": [turn("assistant", "a")], "rejected": "b"},
            r"field 'rejected': expected a list of turns like the other answer",
        ),
        (
            {"prompt": "q", "chosen": [turn("assistant", "a")], "rejected": [turn("assistant", "b")]},
            r"field 'prompt': expected a list of turns when the answers are turns",
        ),
        (
            {
                "prompt": [turn("user", "q")],
                "chosen": [turn("assistant", "a")],
                "rejected": [turn("robot", "b")],
            },
            r"field 'rejected\[0\]\.role': 'robot' is not one of",
        ),
        (
            {
                "prompt": [turn("user", "q")],
                "chosen": [turn("user", "a")],
                "rejected": [turn("assistant", "b")],
            },
            r"field 'chosen\[1\]\.role': the last turn must be 'assistant'",
        ),
        (
            {
                "chosen": [turn("user", "q"), turn("assistant", "a")],
                "rejected": [turn("user", "other"), turn("assistant", "b")],
            },
            r"field 'chosen': no 'prompt' and no leading turns shared with 'rejected'",
        ),
        (
            {"prompt": [turn("user", "q")], "chosen": [turn("assistant", "a")], "rejected": []},
            r"field 'rejected': expected a list of at least 1 turn",
        ),
        (
            {
                "prompt": [turn("user", "q")],
                "chosen": [turn("assistant", " ")],
                "rejected": [turn("assistant", "b")],
            },
            r"field 'chosen': empty answer",
        ),
        (
            {
                "prompt": [turn("user", "q")],
                "chosen": [turn("assistant", "same")],
                "rejected": [turn("assistant", "same")],
            },
            r"field 'rejected': the same answer as 'chosen'",
        ),
    ],
)
def test_malformed_chat_preference_rows_name_line_and_field(
    tmp_path: Path, row: dict[str, Any], message: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError, match=rf"bad\.jsonl: line 2: {message}"):
        data.load(str(path), tmp_path, data.preference_example)


def test_chat_prompts_for_sampling(tmp_path: Path) -> None:
    rows = [
        {"messages": [turn("user", "hello")]},
        {"messages": [turn("user", "hello"), turn("assistant", "hi")]},  # an SFT row: its prompt
        {"messages": [turn("assistant", "hi")]},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    first, second, third = data.read_rows(str(path), tmp_path)
    assert data.prompt_text(first) == data.prompt_text(second) == "<|user|>\nhello\n<|assistant|>\n"
    with pytest.raises(DataError, match=r"line 3: field 'messages': no turns before the assistant's answer"):
        data.prompt_text(third)


def test_chat_template_special_tokens_are_not_doubled(
    tmp_path: Path, chat_tokenizer: PreTrainedTokenizerFast
) -> None:
    """A template that opens with bos and closes answers with eos gets no second bos or eos."""
    row = {"messages": [turn("user", "hello"), turn("assistant", "hi there")]}
    chat_format = data.tokenizer_chat_format(chat_tokenizer)
    [example] = data.load(
        str(write_jsonl(tmp_path / "sft.jsonl", [row])), tmp_path, lambda r: data.sft_example(r, chat_format)
    )
    assert example.prompt == "<|bos|>user\nhello<|eos|>\n<|bos|>assistant\n"
    assert example.completion == "hi there<|eos|>\n"
    [encoded] = data.encode_sft(chat_tokenizer, [example], max_length=64)
    bos, eos = chat_tokenizer.bos_token_id, chat_tokenizer.eos_token_id
    assert encoded.ids[0] == bos and encoded.ids[1] != bos
    completion = encoded.ids[encoded.prompt_length :]
    assert completion.count(eos) == 1 and completion[-1] != eos  # the template's eos, then its newline
    assert chat_tokenizer.decode(list(encoded.ids)) == example.prompt + example.completion
    # Plain text still gets both.
    plain = data.encode_prompt_completion(chat_tokenizer, "hello", " hi", max_length=64)
    assert plain.ids[0] == bos and plain.ids[-1] == eos


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".json"])
def test_bytes_that_are_not_utf8_are_named_by_file_line_and_byte(tmp_path: Path, suffix: str) -> None:
    good = b'{"text": "fine"}\n' if suffix != ".txt" else b"fine\n"
    bad = b'{"text": "caf\xe9"}\n' if suffix != ".txt" else b"caf\xe9\n"
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(good + good + bad)
    offset = 2 * len(good) + bad.index(b"\xe9")
    with pytest.raises(
        DataError, match=rf"corpus\{suffix}: line 3: not valid UTF-8 at byte {offset} of the file \(0xe9\)"
    ):
        data.load(str(path), tmp_path, data.text_of)
