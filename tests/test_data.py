"""Fast tests of lora_cli.data: loading, format detection, masking, EOS, truncation, splits, batching, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import tiny
from lora_cli import data
from lora_cli.data import IGNORE_INDEX, Example
from lora_cli.errors import UserError

ALPACA_ROWS = [
    {"instruction": "Name the mayor of Quillhaven.", "input": "", "output": "Orla Fenwick."},
    {"instruction": "What colour is the lighthouse?", "input": "Quillhaven", "output": "It is green."},
    {"instruction": "Count to three.", "output": "1 2 3"},  # no input field at all
]

CHAT = [
    {"role": "system", "content": "You are nice."},
    {"role": "user", "content": "hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "Who is the mayor?"},
    {"role": "assistant", "content": "Orla Fenwick."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def trained_ids(example: Example) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


# --------------------------------------------------------------------------------------------------------------
# Loading


def test_each_file_type_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "hello there"}, {"text": "the quick brown fox"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("hello there\n\nthe quick brown fox\n", encoding="utf-8")

    for name in ["a.jsonl", "a.json", "b.json", "lines.json", "a.csv", "a.parquet", "a.txt"]:
        assert data.load_rows(str(tmp_path / name)) == rows, name


def test_folder_loads_sorted_files_of_the_split(tmp_path):
    write_jsonl(tmp_path / "train-00001.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "train-00000.jsonl", [{"text": "first"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "held out"}])
    (tmp_path / "README.md").write_text("not data")
    assert data.load_rows(str(tmp_path)) == [{"text": "first"}, {"text": "second"}]
    assert data.load_rows(str(tmp_path), split="test") == [{"text": "held out"}]


def test_folder_with_mixed_types_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(UserError, match=r"mixes data files of types \.jsonl, \.txt"):
        data.load_rows(str(tmp_path))


def test_auto_detect():
    assert data.detect_format([{"messages": []}], "f") == "chat"
    assert data.detect_format([{"conversations": []}], "f") == "chat"
    assert data.detect_format([{"instruction": "a", "output": "b"}], "f") == "alpaca"
    assert data.detect_format([{"instruction": "a", "input": "", "output": "b", "text": "c"}], "f") == "alpaca"
    assert data.detect_format([{"text": "a", "id": 1}], "f") == "text"


# --------------------------------------------------------------------------------------------------------------
# Masking and EOS


def test_alpaca_labels_mask_exactly_the_prompt(tokenizer):
    for row in ALPACA_ROWS:
        example, truncated = data.tokenize_row(row, "alpaca", tokenizer, 1024, train_on_inputs=False)
        prompt = data.alpaca_prompt(row["instruction"], row.get("input", ""))
        prompt_len = len(tokenizer(prompt)["input_ids"])
        assert not truncated
        assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
        assert example.input_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(trained_ids(example)) == row["output"] + tokenizer.eos_token


def test_alpaca_prompt_template():
    assert data.alpaca_prompt("Do it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo it.\n\n### Response:\n"
    )
    assert data.alpaca_prompt("Do it.", "with this") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo it.\n\n### Input:\nwith this\n\n### Response:\n"
    )


def test_train_on_inputs_trains_the_prompt(tokenizer):
    example, _ = data.tokenize_row(ALPACA_ROWS[1], "alpaca", tokenizer, 1024, train_on_inputs=True)
    assert example.labels == example.input_ids


def test_chat_trains_only_assistant_replies_and_their_end_tokens(tokenizer):
    example, _ = data.tokenize_row({"messages": CHAT}, "chat", tokenizer, 1024, train_on_inputs=False)
    assert example.input_ids == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False),
                                          add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token  # <|im_end|>
    assert tokenizer.decode(trained_ids(example)) == f"I am fine, thank you.{end}Orla Fenwick.{end}"
    # Exactly two contiguous trained runs, each ending on the end-of-turn token; the generation-prompt header
    # "<|im_start|>assistant\n" before each is masked.
    runs = [(a, b) for a, b, trained in data._label_runs(example.labels) if trained]
    assert len(runs) == 2
    for start, stop in runs:
        assert example.input_ids[stop - 1] == tokenizer.eos_token_id
        assert tokenizer.decode(example.input_ids[:start]).endswith("<|im_start|>assistant\n")
    assert example.input_ids.count(tokenizer.eos_token_id) == 5  # no extra EOS appended after the template's


def test_chat_sharegpt_conversations_match_messages(tokenizer):
    conversations = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                     for m in CHAT]
    a, _ = data.tokenize_row({"messages": CHAT}, "chat", tokenizer, 1024, False)
    b, _ = data.tokenize_row({"conversations": conversations}, "chat", tokenizer, 1024, False)
    assert a == b


def test_chat_train_on_inputs_trains_all_through_the_last_reply(tokenizer):
    example, _ = data.tokenize_row({"messages": CHAT}, "chat", tokenizer, 1024, train_on_inputs=True)
    assert example.labels[:-1] == example.input_ids[:-1]  # all but the template's trailing newline
    assert example.labels[-1] == IGNORE_INDEX
    assert example.labels[-2] == tokenizer.eos_token_id


def test_chat_template_whose_end_of_turn_is_not_the_eos():
    # E.g. a base model's tokenizer (eos <|endoftext|>) with a ChatML template: the appended EOS must be reachable,
    # so the newline between the reply's <|im_end|> and the EOS is trained too.
    tok = tiny.make_tokenizer()
    tok.eos_token = "<|endoftext|>"
    example, _ = data.tokenize_row({"messages": CHAT[:3]}, "chat", tok, 1024, False)
    assert example.input_ids[-1] == tok.eos_token_id and example.labels[-1] == tok.eos_token_id
    assert tok.decode(trained_ids(example)) == "I am fine, thank you.<|im_end|>\n<|endoftext|>"


def test_chat_template_whose_generation_prompt_is_not_a_prefix():
    # Like Qwen3 with thinking off: the generation prompt adds an empty think block that the rendered conversation
    # lacks, so prefix rendering cannot place the replies; they are found by their content instead.
    tok = tiny.make_tokenizer()
    tok.chat_template = tiny.CHAT_TEMPLATE.replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think></think>\n'")
    example, _ = data.tokenize_row({"messages": CHAT}, "chat", tok, 1024, False)
    assert "<think>" not in tok.decode(example.input_ids)
    assert tok.decode(trained_ids(example)) == "I am fine, thank you.<|im_end|>Orla Fenwick.<|im_end|>"


def test_chat_template_text_after_the_generation_prompt_is_trained():
    # The generation prompt ends with one newline but the template writes two before a reply: at inference the
    # model must produce the second one itself, so it is trained.
    tok = tiny.make_tokenizer()
    tok.chat_template = tiny.CHAT_TEMPLATE.replace(
        "message['role'] + '\n' + message['content']",
        "message['role'] + ('\n\n' if message['role'] == 'assistant' else '\n') + message['content']")
    example, _ = data.tokenize_row({"messages": CHAT}, "chat", tok, 1024, False)
    assert tok.decode(trained_ids(example)) == "\nI am fine, thank you.<|im_end|>\nOrla Fenwick.<|im_end|>"


def test_chat_without_template_is_an_error(tokenizer):
    plain = tiny.make_tokenizer()
    plain.chat_template = None
    with pytest.raises(UserError, match="no chat template.*text or alpaca"):
        data.tokenize_row({"messages": CHAT}, "chat", plain, 1024, False)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_eos_appended_and_trained(pad_is_eos):
    tok = tiny.make_tokenizer(pad_is_eos=pad_is_eos)
    eos = tok.eos_token_id
    example, _ = data.tokenize_row({"text": "The lighthouse is painted green."}, "text", tok, 1024, False)
    assert example.input_ids[-1] == eos and example.labels[-1] == eos
    assert example.labels == example.input_ids
    # Text that already ends with the EOS gets no second one.
    example, _ = data.tokenize_row({"text": "hello" + tok.eos_token}, "text", tok, 1024, False)
    assert example.input_ids.count(eos) == 1 and example.labels[-1] == eos
    # ... and it survives collation when pad == eos: padding is masked by position, not by id.
    short, _ = data.tokenize_row({"text": "hi"}, "text", tok, 1024, False)
    batch = data.collate([short, example], tok.pad_token_id)
    assert batch["labels"][0, len(short) - 1] == eos


# --------------------------------------------------------------------------------------------------------------
# Truncation and datasets


def test_truncation_and_dropping_counted(tmp_path, tokenizer):
    rows = [
        {"instruction": "hi", "output": "short"},
        {"instruction": "hi", "output": "The quick brown fox jumps over the lazy dog. " * 10},
        {"instruction": "Quillhaven is a small harbour town. " * 20, "output": "never reached"},
    ]
    bundle = data.build_datasets(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer, max_length=64)
    stats = bundle.stats
    assert stats.format == "alpaca"
    assert (stats.num_train, stats.num_truncated, stats.num_dropped, stats.num_rows) == (2, 2, 1, 3)
    assert [e.row_index for e in bundle.train] == [0, 1]
    assert all(len(e) <= 64 for e in bundle.train)
    assert len(bundle.train[1]) == 64 and bundle.train[1].input_ids[-1] != tokenizer.eos_token_id
    assert stats.train_tokens == sum(len(e) for e in bundle.train)
    assert stats.trained_tokens == sum(e.num_trained for e in bundle.train)
    assert stats.max_example_length == 64


def test_validation_split_sizes_and_determinism(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(20)]))

    def split(**kwargs):
        bundle = data.build_datasets(path, tokenizer, **kwargs)
        return [e.row_index for e in bundle.train], [e.row_index for e in bundle.val]

    train, val = split(val_size=0.25, seed=1)
    assert (len(train), len(val)) == (15, 5)
    assert sorted(train + val) == list(range(20))
    assert split(val_size=0.25, seed=1) == (train, val)
    assert split(val_size=0.25, seed=2) != (train, val)
    assert [len(s) for s in split(val_size=3)] == [17, 3]
    assert split(val_size=0) == (list(range(20)), [])

    val_path = str(write_jsonl(tmp_path / "v.jsonl", [{"text": "held out"}] * 4))
    bundle = data.build_datasets(path, tokenizer, val_path=val_path)
    assert (bundle.stats.num_train, bundle.stats.num_val) == (20, 4)

    with pytest.raises(UserError, match="leaving none for training"):
        data.build_datasets(path, tokenizer, val_size=20)


def test_build_with_csv_chat_txt(tmp_path, tokenizer):
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA_ROWS)
    assert data.build_datasets(str(tmp_path / "a.csv"), tokenizer).stats.num_train == 3
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}])
    assert data.build_datasets(str(chat), tokenizer).stats.format == "chat"
    (tmp_path / "t.txt").write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    bundle = data.build_datasets(str(tmp_path / "t.txt"), tokenizer)
    assert (bundle.stats.format, bundle.stats.num_train) == ("text", 3)


# --------------------------------------------------------------------------------------------------------------
# Batching


def test_collate_pads_to_the_longest_in_the_batch():
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Example([8, 9, 10, 11, 12], [8, 9, 10, 11, 12])
    batch = data.collate([a, b], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3, 3], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], [8, 9, 10, 11, 12]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_length_grouped_batches():
    lengths = [(i * 37) % 500 + 1 for i in range(1000)]
    batches = data.length_grouped_batches(lengths, batch_size=8, seed=0)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) == 8 for b in batches)
    # Similar lengths within a batch: far less spread than random batches would have (~500).
    spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(spreads) / len(spreads) < 50
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest first: OOM shows at step 1
    assert data.length_grouped_batches(lengths, 8, seed=0) == batches
    assert data.length_grouped_batches(lengths, 8, seed=0, epoch=1) != batches
    assert data.length_grouped_batches(lengths, 8, seed=1) != batches
    assert data.length_grouped_batches([], 8, seed=0) == []
    assert data.length_grouped_batches([3, 1], 8, seed=0) == [[0, 1]]


# --------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_field_names_row_and_field(tmp_path, tokenizer):
    rows = [ALPACA_ROWS[0], ALPACA_ROWS[1], {"instruction": "no output here", "outptu": "typo"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=r"d\.jsonl' row 3 \(line 3\).*'output' is missing"):
        data.build_datasets(str(path), tokenizer)


@pytest.mark.parametrize("messages, problem", [
    ("hello", "'messages' must be a non-empty list"),
    ([{"role": "user", "content": 5}], "'messages' turn 1 has a 'content' of type int"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "turn 2 has the role 'bot'"),
])
def test_bad_chat_rows_name_row_and_field(tmp_path, tokenizer, messages, problem):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": messages}])
    with pytest.raises(UserError, match="row 2.*" + problem.replace("(", r"\(")):
        data.build_datasets(str(path), tokenizer)


def test_bad_json_line_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl' line 3 is not valid JSON"):
        data.load_rows(str(path))


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl' is not valid UTF-8: byte 28 \(line 2\)"):
        data.load_rows(str(path))


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.json", "[]"), ("e.txt", "\n\n"), ("e.csv", "text\n")])
def test_empty_file(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=rf"{name}' contains no examples"):
        data.load_rows(str(tmp_path / name))


def test_unknown_format_fields(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(UserError, match=r"\['answer', 'question'\].*chat: messages or conversations.*alpaca"):
        data.build_datasets(str(path), tokenizer)


def test_nonexistent_path(tmp_path):
    with pytest.raises(UserError, match="neither an existing file nor a reachable"):
        data.load_rows(str(tmp_path / "nope.jsonl"))
    # A name that could be a Hub dataset is tried there; offline in the tests, so it fails the same way.
    with pytest.raises(UserError, match="'no-such-owner/no-such-dataset' is neither an existing file nor a reachable"):
        data.load_rows("no-such-owner/no-such-dataset")


# --------------------------------------------------------------------------------------------------------------
# Preview


def test_preview_highlights_the_trained_text(tokenizer):
    example, _ = data.tokenize_row({"messages": CHAT}, "chat", tokenizer, 1024, False)
    text = data.preview(example, tokenizer)
    assert text.plain == tokenizer.decode(example.input_ids)
    trained = "".join(text.plain[span.start : span.end] for span in text.spans if span.style == data.TRAINED_STYLE)
    assert trained == "I am fine, thank you.<|im_end|>Orla Fenwick.<|im_end|>"
    assert "<|im_start|>user" in "".join(
        text.plain[span.start : span.end] for span in text.spans if span.style == data.MASKED_STYLE)
