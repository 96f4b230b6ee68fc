"""Datasets: reading rows, validating them, tokenising, collating, and a resumable sampler.

Inputs are JSONL, JSON arrays, Parquet or plain text, as one file or a prefix/directory of
them, local or on S3. Row formats:

- text (pretrain):   ``{"text": ...}`` rows, or the lines of a ``.txt`` file
- SFT:               ``{"instruction", "input"?, "output"}``, ``{"prompt", "completion"}``,
                     or chat ``{"messages": [{"role", "content"}, ...]}`` ending with the assistant
- preference:        ``{"prompt" | "question", "chosen", "rejected"}``, the answers as text or
                     turn lists (``{"prompt"?: [turns], "chosen": [turns], "rejected": [turns]}``)
- ranked:            ``{"prompt" | "question", "responses": [best, ..., worst]}``
- prompts (RL):      ``{"prompt" | "question"}``, ``{"instruction", "input"?}`` or chat turns
                     (``{"messages": [...]}`` ending before the assistant's turn)

A malformed row raises `DataError` naming the file, the 1-based line (JSONL) or row
(Parquet, JSON arrays) and the field. JSONL is parsed line by line for exactly that reason;
Parquet goes through ``datasets``.

Sequences are token lists ``[bos] + prompt + completion + [eos]``: prompt and completion are
tokenised separately, so the boundary between them is exact and BPE merges never straddle it.
Chat turns (SFT ``messages``; preference answers as turn lists, the prompt either a turn list
or the turns both answers share) are rendered with the tokenizer's chat template, and only the
assistant's answer is the completion: loss and log-probs fall on its tokens alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from kubealign_jobs import storage
from kubealign_jobs.config import MANIFEST_FILE, derive_seed

T = TypeVar("T")

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")

# The Alpaca layout, which the DPO slides' {"instruction", "input", "output"} rows come from.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# Used for chat rows when the tokenizer carries no chat template of its own.
CHAT_TURN_TEMPLATE = "<|{role}|>\n{content}\n"
CHAT_GENERATION_PROMPT = "<|assistant|>\n"
CHAT_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset is missing or malformed; the message names the file, line or row, and field."""


@dataclass(frozen=True)
class Row:
    """One raw row and where it came from, so errors can point at it."""

    source: str
    number: int  # 1-based line (JSONL, text) or row (Parquet, JSON array)
    unit: str  # "line" or "row"
    fields: dict[str, Any]

    def where(self, field: str | None = None) -> str:
        at = f"{self.source}: {self.unit} {self.number}"
        return f"{at}: field {field!r}" if field else at


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class RankedExample:
    prompt: str
    responses: tuple[str, ...]  # best first


# ---------------------------------------------------------------------------- reading


def data_files(uri: str, scratch: Path) -> list[tuple[str, Path]]:
    """Fetch ``uri`` (a file or a prefix of files) and return (display name, local path) per data file."""
    try:
        local = storage.fetch(uri, scratch)
    except storage.StorageError as exc:
        raise DataError(f"{uri}: cannot read dataset: {exc}") from exc
    if local.is_file():
        return [(uri, local)]
    # An upstream stage's artifact (inputs.data: {from: generate}) carries its manifest: not data.
    found = sorted(
        p for p in local.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES and p.name != MANIFEST_FILE
    )
    if not found:
        raise DataError(f"{uri}: no data files ({', '.join(DATA_SUFFIXES)}) found")
    return [(storage.join(uri, p.relative_to(local).as_posix()), p) for p in found]


def read_rows(uri: str, scratch: Path) -> list[Row]:
    """Every row of every data file under ``uri``, in file order."""
    rows: list[Row] = []
    for source, path in data_files(uri, scratch):
        rows.extend(_read_file(source, path))
    if not rows:
        raise DataError(f"{uri}: dataset is empty")
    return rows


def _decoded_lines(source: str, path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a UTF-8 file; bytes that are not UTF-8 fail naming line and byte."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{source}: line {number}: not valid UTF-8 at byte {offset + exc.start} of the file "
                    f"(0x{raw[exc.start]:02x}): {exc.reason}"
                ) from None
            offset += len(raw)


def _read_file(source: str, path: Path) -> Iterator[Row]:
    if path.suffix == ".txt":
        for number, line in _decoded_lines(source, path):
            if line.strip():
                yield Row(source, number, "line", {"text": line.rstrip("\r\n")})
        return
    if path.suffix == ".parquet":
        # pyarrow reads the file and writes nothing: an input is read-only (datasets' from_parquet
        # would leave a cache beside it, inside another stage's published artifact).
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{source}: not a readable Parquet file: {exc}") from exc
        for number, fields in enumerate(table.to_pylist(), start=1):
            yield Row(source, number, "row", dict(fields))
        return
    lines = list(_decoded_lines(source, path))
    text = "".join(line for _, line in lines)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: line {exc.lineno}: not valid JSON: {exc.msg}") from exc
        for number, fields in enumerate(items, start=1):
            if not isinstance(fields, dict):
                raise DataError(f"{source}: row {number}: expected a JSON object")
            yield Row(source, number, "row", fields)
        return
    for number, line in lines:
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{source}: line {number}: not valid JSON: {exc.msg} (column {exc.colno})"
            ) from exc
        if not isinstance(fields, dict):
            raise DataError(f"{source}: line {number}: expected a JSON object, got {type(fields).__name__}")
        yield Row(source, number, "line", fields)


def _string(row: Row, field: str, *, allow_empty: bool = False) -> str:
    value = row.fields.get(field)
    if value is None:
        raise DataError(f"{row.where(field)}: missing")
    if not isinstance(value, str):
        raise DataError(f"{row.where(field)}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{row.where(field)}: empty")
    return value


def _prompt_field(row: Row) -> str:
    field = "prompt" if "prompt" in row.fields else "question" if "question" in row.fields else None
    if field is None:
        raise DataError(f"{row.where('prompt')}: missing (or 'question')")
    return _string(row, field)


def _instruction_prompt(row: Row) -> str:
    instruction = _string(row, "instruction")
    extra = row.fields.get("input")
    if extra is None or extra == "":
        return INSTRUCTION_TEMPLATE.format(instruction=instruction)
    return INSTRUCTION_INPUT_TEMPLATE.format(instruction=instruction, input=_string(row, "input"))


ChatFormatter = Callable[[list[dict[str, str]], bool], str]


def default_chat_format(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render chat turns for tokenizers without a chat template of their own."""
    text = "".join(CHAT_TURN_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    return text + (CHAT_GENERATION_PROMPT if add_generation_prompt else "")


def tokenizer_chat_format(tokenizer: Any) -> ChatFormatter:
    """The tokenizer's own chat template when it has one, else `default_chat_format`."""
    if not getattr(tokenizer, "chat_template", None):
        return default_chat_format

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text: str = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text

    return render


def _turns(row: Row, field: str, *, minimum: int = 1) -> list[dict[str, str]]:
    """The chat turns in ``row.fields[field]``, each ``{role, content}``, checked one by one."""
    messages = row.fields[field]
    if not isinstance(messages, list) or len(messages) < minimum:
        plural = "turn" if minimum == 1 else "turns"
        raise DataError(f"{row.where(field)}: expected a list of at least {minimum} {plural}")
    turns: list[dict[str, str]] = []
    for index, turn in enumerate(messages):
        at = f"{field}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{row.where(at)}: expected an object with 'role' and 'content'")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{row.where(at + '.role')}: {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{row.where(at + '.content')}: expected a string")
        turns.append({"role": role, "content": content})
    return turns


def _render_completion(
    row: Row,
    field: str,
    chat_format: ChatFormatter,
    prompt: list[dict[str, str]],
    answer: list[dict[str, str]],
) -> tuple[str, str]:
    """(prompt text, completion text) of a conversation split after ``prompt``.

    The completion is what the template renders after the generation prompt, so the model is
    trained and scored on exactly the tokens it would produce when asked.
    """
    if not answer:
        raise DataError(f"{row.where(field)}: no turns after the prompt")
    if answer[-1]["role"] != "assistant":
        last = f"{field}[{len(prompt) + len(answer) - 1}].role"
        raise DataError(f"{row.where(last)}: the last turn must be 'assistant'")
    prompt_text = chat_format(prompt, True)
    full = chat_format(prompt + answer, False)
    if not full.startswith(prompt_text):
        raise DataError(f"{row.where(field)}: chat template does not render the prompt as a prefix")
    completion = full[len(prompt_text) :]
    if not completion.strip():
        raise DataError(f"{row.where(field)}: empty answer")
    return prompt_text, completion


def _chat(row: Row, chat_format: ChatFormatter) -> SFTExample:
    turns = _turns(row, "messages", minimum=2)
    prompt, completion = _render_completion(row, "messages", chat_format, turns[:-1], turns[-1:])
    return SFTExample(prompt=prompt, completion=completion)


def _chat_pair(row: Row, chat_format: ChatFormatter) -> PreferenceExample:
    """A preference pair whose answers are turn lists, rendered with ``chat_format``.

    Either ``prompt`` is a turn list and ``chosen``/``rejected`` continue it, or there is no
    prompt and the two conversations share their leading turns, which are the prompt (both
    layouts TRL's conversational preference format uses).
    """
    for field in ("chosen", "rejected"):
        if not isinstance(row.fields.get(field), list):
            raise DataError(f"{row.where(field)}: expected a list of turns like the other answer")
    chosen, rejected = _turns(row, "chosen"), _turns(row, "rejected")
    if "prompt" in row.fields:
        if not isinstance(row.fields["prompt"], list):
            raise DataError(f"{row.where('prompt')}: expected a list of turns when the answers are turns")
        prompt = _turns(row, "prompt")
        chosen_turns, rejected_turns = prompt + chosen, prompt + rejected
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataError(
                f"{row.where('chosen')}: no 'prompt' and no leading turns shared with 'rejected' (the prompt)"
            )
        prompt, chosen_turns, rejected_turns = chosen[:shared], chosen, rejected
    prompt_text, chosen_text = _render_completion(
        row, "chosen", chat_format, prompt, chosen_turns[len(prompt) :]
    )
    _, rejected_text = _render_completion(row, "rejected", chat_format, prompt, rejected_turns[len(prompt) :])
    return _distinct(row, PreferenceExample(prompt=prompt_text, chosen=chosen_text, rejected=rejected_text))


def _distinct(row: Row, pair: PreferenceExample) -> PreferenceExample:
    """A pair whose two answers are the same text says nothing, and its loss has no gradient."""
    if pair.chosen.strip() == pair.rejected.strip():
        raise DataError(
            f"{row.where('rejected')}: the same answer as 'chosen'; a pair needs two different answers"
        )
    return pair


def sft_example(row: Row, chat_format: ChatFormatter = default_chat_format) -> SFTExample:
    """Normalise one SFT row (instruction/input/output, prompt/completion or messages)."""
    if "messages" in row.fields:
        return _chat(row, chat_format)
    if "instruction" in row.fields:
        return SFTExample(prompt=_instruction_prompt(row), completion=_string(row, "output"))
    if "prompt" in row.fields or "question" in row.fields:
        return SFTExample(prompt=_prompt_field(row), completion=_string(row, "completion"))
    raise DataError(
        f"{row.where()}: not an SFT row: expected 'instruction' + 'output', "
        "'prompt' + 'completion' or 'messages'"
    )


def preference_example(row: Row, chat_format: ChatFormatter = default_chat_format) -> PreferenceExample:
    """Normalise one preference row: text answers, or chat turns rendered with ``chat_format``."""
    if isinstance(row.fields.get("chosen"), list) or isinstance(row.fields.get("rejected"), list):
        return _chat_pair(row, chat_format)
    return _distinct(
        row,
        PreferenceExample(
            prompt=_prompt_field(row), chosen=_string(row, "chosen"), rejected=_string(row, "rejected")
        ),
    )


def ranked_example(row: Row, chat_format: ChatFormatter = default_chat_format) -> RankedExample:
    """A ranking, best first; a preference pair is a ranking of two."""
    if "responses" not in row.fields:
        if "chosen" in row.fields or "rejected" in row.fields:
            pair = preference_example(row, chat_format)
            return RankedExample(prompt=pair.prompt, responses=(pair.chosen, pair.rejected))
        raise DataError(f"{row.where('responses')}: missing (or 'chosen' and 'rejected')")
    responses = row.fields["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{row.where('responses')}: expected a list of at least two answers, best first")
    for index, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{row.where(f'responses[{index}]')}: expected a non-empty string")
        if response.strip() in (r.strip() for r in responses[:index]):
            raise DataError(f"{row.where(f'responses[{index}]')}: the same answer as an earlier one")
    return RankedExample(prompt=_prompt_field(row), responses=tuple(responses))


def prompt_text(row: Row, chat_format: ChatFormatter = default_chat_format) -> str:
    """The prompt of an RL or eval row: ``prompt``/``question``, an instruction (with optional
    input), or chat turns (``messages`` or ``prompt`` as a turn list, the turns before the last
    answer, or the prompt of a chat preference pair) rendered with the generation prompt."""
    if "instruction" in row.fields:
        return _instruction_prompt(row)
    if isinstance(row.fields.get("chosen"), list) or isinstance(row.fields.get("rejected"), list):
        return _chat_pair(row, chat_format).prompt
    for field in ("messages", "prompt"):
        if isinstance(row.fields.get(field), list):
            turns = _turns(row, field)
            if turns[-1]["role"] == "assistant":  # an SFT conversation: the prompt precedes its answer
                turns = turns[:-1]
                if not turns:
                    raise DataError(f"{row.where(field)}: no turns before the assistant's answer")
            return chat_format(turns, True)
    return _prompt_field(row)


def text_of(row: Row) -> str:
    return _string(row, "text")


def load(uri: str, scratch: Path, parse: Callable[[Row], T]) -> list[T]:
    """Read every row under ``uri`` and normalise it with ``parse`` (e.g. `preference_example`)."""
    return [parse(row) for row in read_rows(uri, scratch)]


# ---------------------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class Encoded:
    """A tokenised sequence; ``prompt_length`` tokens of prompt, then the completion."""

    ids: tuple[int, ...]
    prompt_length: int


def _special(token_id: int | None) -> list[int]:
    return [] if token_id is None else [int(token_id)]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


# Texts per batched tokenizer call: large enough for the Rust tokenizer's parallelism,
# small enough to bound the memory of one call.
_ENCODE_CHUNK = 4096


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts through batched calls (an order of magnitude faster than one by one)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        ids.extend(
            tokenizer(list(texts[start : start + _ENCODE_CHUNK]), add_special_tokens=False)["input_ids"]
        )
    return ids


def with_bos(tokenizer: Any, prompt_ids: Sequence[int]) -> list[int]:
    """``[bos] prompt``, unless the prompt already starts with bos (a chat template put it there)."""
    bos = _special(tokenizer.bos_token_id)
    return list(prompt_ids) if prompt_ids[:1] == bos else bos + list(prompt_ids)


def join_prompt_completion(
    tokenizer: Any, prompt_ids: Sequence[int], completion_ids: Sequence[int], *, max_length: int
) -> Encoded:
    """``[bos] prompt completion [eos]``, truncated to ``max_length`` tokens.

    Text rendered by a chat template already carries its special tokens (SmolLM2's prompt
    starts with its bos ``<|im_start|>``, its answer ends with its eos ``<|im_end|>``): a prompt
    that starts with bos gets no second one, and a completion that holds eos gets none after it.
    Truncation keeps the end of the prompt (the part next to the answer) and at least half of
    ``max_length`` for the completion, whose tail is cut last. The special tokens survive it:
    bos stays first, and the completion's eos (with whatever the template puts after it) stays
    last, so a reward model always reads its score where it was trained to, at the end.
    """
    prompt = with_bos(tokenizer, prompt_ids)
    eos = _special(tokenizer.eos_token_id)
    completion = list(completion_ids) + ([] if eos and eos[0] in completion_ids else eos)
    if len(prompt) + len(completion) <= max_length:
        return Encoded(ids=tuple(prompt + completion), prompt_length=len(prompt))
    head = prompt[:1] if prompt[:1] == _special(tokenizer.bos_token_id) else []
    prompt_budget = max(max_length - len(completion), max_length // 2)
    kept = max(prompt_budget - len(head), 0)
    prompt = head + (prompt[len(head) :][-kept:] if kept else [])
    budget = max_length - len(prompt)
    tail = (
        completion[len(completion) - completion[::-1].index(eos[0]) - 1 :]
        if eos and eos[0] in completion
        else []
    )
    tail = tail[-budget:] if budget > 0 else []
    completion = completion[: max(budget - len(tail), 0)] + tail
    return Encoded(ids=tuple(prompt + completion), prompt_length=len(prompt))


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str, *, max_length: int) -> Encoded:
    """One ``[bos] prompt completion [eos]`` sequence (see `join_prompt_completion`)."""
    return join_prompt_completion(
        tokenizer, encode_text(tokenizer, prompt), encode_text(tokenizer, completion), max_length=max_length
    )


def encode_sft(tokenizer: Any, examples: Sequence[SFTExample], *, max_length: int) -> list[Encoded]:
    prompts = encode_texts(tokenizer, [e.prompt for e in examples])
    completions = encode_texts(tokenizer, [e.completion for e in examples])
    return [
        join_prompt_completion(tokenizer, p, c, max_length=max_length)
        for p, c in zip(prompts, completions, strict=True)
    ]


@dataclass(frozen=True)
class EncodedRanking:
    """A prompt and K answers, each as a full ``[bos] prompt answer [eos]`` sequence (best first)."""

    sequences: tuple[Encoded, ...]


def encode_ranking(
    tokenizer: Any, prompt: str, responses: Sequence[str], *, max_length: int
) -> EncodedRanking:
    return encode_rankings(tokenizer, [RankedExample(prompt, tuple(responses))], max_length=max_length)[0]


def encode_rankings(
    tokenizer: Any, examples: Sequence[RankedExample], *, max_length: int
) -> list[EncodedRanking]:
    """Rankings (pairs are rankings of two) with every prompt and answer tokenised in batched calls."""
    prompts = encode_texts(tokenizer, [e.prompt for e in examples])
    answers = iter(encode_texts(tokenizer, [r for e in examples for r in e.responses]))
    return [
        EncodedRanking(
            tuple(
                join_prompt_completion(tokenizer, prompt, next(answers), max_length=max_length)
                for _ in example.responses
            )
        )
        for prompt, example in zip(prompts, examples, strict=True)
    ]


def encode_preferences(
    tokenizer: Any, examples: Sequence[PreferenceExample], *, max_length: int
) -> list[EncodedRanking]:
    rankings = [RankedExample(e.prompt, (e.chosen, e.rejected)) for e in examples]
    return encode_rankings(tokenizer, rankings, max_length=max_length)


def pack_texts(tokenizer: Any, texts: Sequence[str], *, block_size: int) -> torch.Tensor:
    """Concatenate ``[bos] text [eos]`` documents and cut the stream into (N, block_size) blocks.

    Packing wastes no compute on padding; the incomplete tail block is dropped.
    """
    stream: list[int] = []
    bos, eos = _special(tokenizer.bos_token_id), _special(tokenizer.eos_token_id)
    for ids in encode_texts(tokenizer, texts):
        stream.extend(bos + ids + eos)
    blocks = len(stream) // block_size
    if blocks == 0:
        raise DataError(f"corpus has {len(stream)} tokens, fewer than one block of block_size={block_size}")
    return torch.tensor(stream[: blocks * block_size], dtype=torch.long).view(blocks, block_size)


# ---------------------------------------------------------------------------- collating


@dataclass(frozen=True)
class CompletionBatch:
    """Right-padded sequences. ``completion_mask`` marks tokens whose likelihood counts. All (B, T).

    A packed batch (`collate_packed`) is one row of sequences laid end to end, with
    ``position_ids`` restarting at 0 for each: the model then keeps attention inside each
    sequence (a block-diagonal causal mask with SDPA, variable-length kernels with flash attention).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> CompletionBatch:
        return CompletionBatch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.completion_mask.to(device, non_blocking=True),
            None if self.position_ids is None else self.position_ids.to(device, non_blocking=True),
        )

    @property
    def num_tokens(self) -> int:
        """Real tokens, padding excluded (a packed row has none)."""
        return int(self.attention_mask.sum())

    @property
    def num_completion_tokens(self) -> int:
        """Tokens that are predicted (a completion token at position 0 has no prediction)."""
        return int(self.completion_mask[:, 1:].sum())


def collate(
    sequences: Sequence[Encoded], *, pad_token_id: int, pad_to_multiple_of: int = 1
) -> CompletionBatch:
    """Pad to the longest sequence (rounded up to ``pad_to_multiple_of``)."""
    longest = max(len(s.ids) for s in sequences)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq.ids)
        input_ids[row, :n] = torch.tensor(seq.ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        completion_mask[row, seq.prompt_length : n] = 1
    return CompletionBatch(input_ids, attention_mask, completion_mask)


def collate_packed(sequences: Sequence[Encoded]) -> CompletionBatch:
    """The sequences end to end in one (1, total) row: no padding, positions restarting per sequence.

    The logit at a sequence's last token predicts the next sequence's first token; that token
    never counts (its completion mask is 0), so no loss crosses a boundary and the result equals
    `collate`'s, summed over the same tokens.
    """
    ids: list[int] = []
    positions: list[int] = []
    completion: list[int] = []
    for seq in sequences:
        n = len(seq.ids)
        ids.extend(seq.ids)
        positions.extend(range(n))
        completion.extend([0] * max(seq.prompt_length, 1) + [1] * (n - max(seq.prompt_length, 1)))
    input_ids = torch.tensor([ids], dtype=torch.long)
    return CompletionBatch(
        input_ids,
        torch.ones_like(input_ids),
        torch.tensor([completion], dtype=torch.long),
        torch.tensor([positions], dtype=torch.long),
    )


# ---------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class DataPosition:
    """How far training has read: examples consumed in ``epoch`` (across all ranks)."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> DataPosition:
        return cls(epoch=int(value["epoch"]), index=int(value["index"]))


class EpochSampler:
    """Deterministic shuffled batches that resume exactly where a checkpoint left off.

    Each epoch is a permutation seeded by (seed, epoch), so any process can recompute the
    order from a `DataPosition` alone; the incomplete last batch of an epoch is dropped so
    every step sees the same global batch size.
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size: must be >= 1, got {batch_size}")
        if num_examples < batch_size:
            raise DataError(f"dataset has {num_examples} examples, fewer than one batch of {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._order: list[int] = []

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
                self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            else:
                self._order = list(range(self.num_examples))
            self._epoch = epoch
        return self._order

    def next_batch(self, position: DataPosition) -> tuple[list[int], DataPosition]:
        """The global batch of example indices at ``position`` and the position after it."""
        if position.index + self.batch_size > self.num_examples:
            position = DataPosition(epoch=position.epoch + 1, index=0)
        order = self._order_of(position.epoch)
        batch = order[position.index : position.index + self.batch_size]
        return batch, DataPosition(epoch=position.epoch, index=position.index + self.batch_size)


def shard_positions(size: int, *, rank: int, world_size: int) -> range:
    """Where this rank's contiguous share lies in a global batch of ``size`` (a multiple of the world)."""
    per_rank = size // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def shard(indices: Sequence[int], *, rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (the batch size is a multiple of the world size)."""
    return [indices[i] for i in shard_positions(len(indices), rank=rank, world_size=world_size)]
