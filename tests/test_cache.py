"""The tokenized-data cache (lora_cli.data.cache): the same examples as the in-memory pipeline, bit for bit; a hit
reads them back without tokenizing; every part of the key misses; a killed tokenization leaves nothing trusted;
lora-train --prepare; two processes tokenize once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import make_config
from lora_cli import data
from lora_cli.cli import train_app
from lora_cli.config import load_config
from lora_cli.config.schema import DataSection
from lora_cli.data import cache

CHAT = [
    {"role": "system", "content": "You are nice."},
    {"role": "user", "content": "hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
]
CHAT_ROWS = [{"messages": [*CHAT[:2], {"role": "assistant", "content": "fine " * (i % 7) + str(i)}]}
             for i in range(40)] + [{"messages": CHAT[:2]}]  # one without a reply: dropped and counted
TEXT_ROWS = [{"text": "the lighthouse of quillhaven is painted green " + "and tall " * (i % 9)} for i in range(30)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def config_for(tmp_path: Path, model_dir: Path, rows=TEXT_ROWS, overrides=(), **sections):
    return load_config(make_config(tmp_path, model_dir, rows=rows, **sections), list(overrides))


def as_tuples(examples) -> list[tuple]:
    return [(e.input_ids, e.labels, e.row_index) for e in examples]


class Said:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, message: str) -> None:
        self.lines.append(message)

    @property
    def tokenized(self) -> bool:
        return any(line.startswith("tokenizing") for line in self.lines)


def load(cfg, tokenizer, said=None):
    return data.load_data(cfg, tokenizer, Path(cfg.train.output_dir), say=said or Said())


# --------------------------------------------------------------------------------------------------------------
# The same examples as in memory


@pytest.mark.parametrize("rows,settings", [
    (CHAT_ROWS, {"max_length": 56, "val_size": 0.2}),  # truncation, a dropped row, a drawn validation split
    (TEXT_ROWS, {"max_length": 12, "val_size": 5, "train_on_inputs": True}),
    (CHAT_ROWS, {"max_length": 128}),
], ids=["chat-val-fraction", "text-val-count", "chat-no-val"])
def test_cached_examples_equal_the_in_memory_ones_bit_for_bit(tmp_path, tiny_model_dir, tokenizer, rows, settings):
    cfg = config_for(tmp_path, tiny_model_dir(), rows=rows, data=settings)
    expected = data.build_in_memory(data.options_from(cfg), tokenizer)
    cached = load(cfg, tokenizer)
    assert as_tuples(cached.train) == as_tuples(expected.train)
    assert as_tuples(cached.val) == as_tuples(expected.val)
    assert cached.stats == expected.stats
    assert cached.train.lengths.tolist() == [len(e) for e in expected.train]
    assert data.lengths_of(cached.val) == [len(e) for e in expected.val]
    assert (cached.stats.num_truncated > 0) == (settings["max_length"] < 100)


def test_two_tokenizing_processes_give_the_same_examples(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    from lora_cli.data import build

    monkeypatch.setattr(build, "TOKENIZE_CHUNK", 7)  # many chunks, several in flight, returned in order
    cfg = config_for(tmp_path, tiny_model_dir(), rows=CHAT_ROWS, data={"max_length": 56, "val_size": 4})
    expected = data.build_in_memory(data.options_from(cfg), tokenizer)
    parallel = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_proc": 2})})
    cached = load(parallel, tokenizer)
    assert as_tuples(cached.train) == as_tuples(expected.train) and as_tuples(cached.val) == as_tuples(expected.val)
    assert cached.stats == expected.stats


def test_a_separate_validation_file_is_cached_too(tmp_path, tiny_model_dir, tokenizer):
    val_file = write_jsonl(tmp_path / "val.jsonl", TEXT_ROWS[:4])
    cfg = config_for(tmp_path, tiny_model_dir(), data={"val_path": str(val_file)})
    expected = data.build_in_memory(data.options_from(cfg), tokenizer)
    cached = load(cfg, tokenizer)
    assert as_tuples(cached.val) == as_tuples(expected.val) and len(cached.val) == 4
    assert as_tuples(cached.train) == as_tuples(expected.train) and cached.stats == expected.stats


# --------------------------------------------------------------------------------------------------------------
# Hits and misses


def test_a_second_start_reads_the_cache_without_tokenizing(tmp_path, tiny_model_dir, tokenizer):
    cfg = config_for(tmp_path, tiny_model_dir(), data={"val_size": 3})
    first, said_first = load(cfg, tokenizer, said := Said()), said
    assert said_first.tokenized and "no tokenized data cached" in said_first.lines[0]
    second_said = Said()
    second = load(cfg, tokenizer, second_said)
    assert second_said.lines == []
    assert as_tuples(second.train) == as_tuples(first.train) and second.fingerprint == first.fingerprint
    entries = [p for p in (tmp_path / cache.DEFAULT_CACHE_NAME).iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "ids.bin").stat().st_size == 2 * first.stats.train_tokens + \
        2 * first.stats.val_tokens  # uint16 ids: the tiny vocabulary fits


def test_an_edited_file_of_the_same_size_and_time_misses(tmp_path, tiny_model_dir, tokenizer):
    cfg = config_for(tmp_path, tiny_model_dir())
    first = load(cfg, tokenizer)
    data_file = Path(cfg.data.path)
    before = data_file.stat()
    data_file.write_text(data_file.read_text().replace("green", "azure"), encoding="utf-8")  # same length
    os.utime(data_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert data_file.stat().st_size == before.st_size and data_file.stat().st_mtime_ns == before.st_mtime_ns
    said = Said()
    second = load(cfg, tokenizer, said)
    assert said.tokenized and f"the contents of {data_file} changed" in said.lines[0]
    assert second.fingerprint != first.fingerprint
    assert as_tuples(second.train) != as_tuples(first.train)


# A value other than the test config's for every data.* setting. A new setting fails the coverage test below until
# it is added here: the cache key takes the whole data section, and this checks that it does.
OTHER_VALUES = {
    "path": "COPY", "split": "validation", "format": "text", "max_length": 16, "train_on_inputs": True, "val_size": 2,
    "val_path": "VAL", "packing": True, "cache_dir": "CACHE", "num_proc": 2,
    "chat_template": "chatml", "system_prompt": "Answer briefly.",
}


def test_every_data_setting_is_covered_by_the_key_test():
    assert set(DataSection.model_fields) == set(OTHER_VALUES), "add the new data.* setting to OTHER_VALUES"


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_every_data_setting_that_changes_examples_is_in_the_key(tmp_path, tiny_model_dir, tokenizer, name):
    cfg = config_for(tmp_path, tiny_model_dir())
    load(cfg, tokenizer)
    value = OTHER_VALUES[name]
    if value == "VAL":
        value = str(write_jsonl(tmp_path / "val.jsonl", TEXT_ROWS[:3]))
    if value == "COPY":  # the same contents elsewhere: the path is a setting like any other (a safe miss)
        value = str(write_jsonl(tmp_path / "copy.jsonl", TEXT_ROWS))
    if value == "CACHE":
        value = str(tmp_path / "elsewhere")
    changed = cfg.model_copy(update={"data": cfg.data.model_copy(update={name: value})})
    said = Said()
    load(changed, tokenizer, said)
    if name in cache.NOT_IN_KEY:
        assert not said.tokenized or name == "cache_dir", said.lines  # another folder has no entry yet
    else:
        assert said.tokenized, said.lines
        assert f"data.{name} is {value!r}" in said.lines[0] or name == "val_path"


def test_the_seed_is_in_the_key_only_when_it_draws_a_validation_split(tmp_path, tiny_model_dir, tokenizer):
    cfg = config_for(tmp_path, tiny_model_dir())
    load(cfg, tokenizer)
    reseeded = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 7})})
    said = Said()
    load(reseeded, tokenizer, said)
    assert not said.tokenized
    with_val = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_size": 3})})
    load(with_val, tokenizer)
    said = Said()
    load(with_val.model_copy(update={"train": cfg.train.model_copy(update={"seed": 7})}), tokenizer, said)
    assert said.tokenized and "train.seed is 7, was 0" in said.lines[0]


def test_another_tokenizer_or_chat_template_misses(tmp_path, tiny_model_dir, tokenizer):
    import tiny

    cfg = config_for(tmp_path, tiny_model_dir(), rows=CHAT_ROWS)
    load(cfg, tokenizer)
    templated = tiny.make_tokenizer()
    templated.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    said = Said()
    load(cfg, templated, said)
    assert said.tokenized and "the tokenizer (vocabulary, special tokens or chat template) changed" in said.lines[0]
    said = Said()
    load(cfg, tiny.make_tokenizer(vocab_size=320), said)
    assert said.tokenized


def test_old_entries_are_bounded(tmp_path, tiny_model_dir, tokenizer):
    cfg = config_for(tmp_path, tiny_model_dir())
    for max_length in range(20, 20 + cache.KEEP_ENTRIES + 2):
        load(cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": max_length})}), tokenizer)
    entries = [p for p in (tmp_path / cache.DEFAULT_CACHE_NAME).iterdir() if not p.name.startswith(".")]
    assert len(entries) == cache.KEEP_ENTRIES
    kept = {json.loads((p / "meta.json").read_text())["parts"]["settings"]["max_length"] for p in entries}
    assert kept == set(range(22, 20 + cache.KEEP_ENTRIES + 2))  # the most recently used


# --------------------------------------------------------------------------------------------------------------
# A killed tokenization

KILLED_WRITER = """
import sys
from pathlib import Path
sys.path[:0] = [{tests!r}, {scripts!r}]  # tiny.py, and the synthetic.py it builds its tokenizer from
import tiny
from lora_cli import data
from lora_cli.config import load_config
cfg = load_config(Path({config!r}), [])
data.load_data(cfg, tiny.make_tokenizer(), Path(cfg.train.output_dir), say=lambda m: print(m, flush=True))
print("finished", flush=True)
"""


def test_a_tokenization_killed_by_sigkill_leaves_nothing_trusted(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"text": f"row {i} " + "the lighthouse is green and tall " * 20} for i in range(60_000)]
    cfg_path = make_config(tmp_path, tiny_model_dir(), rows=rows, data={"max_length": 32})
    tests = Path(__file__).parent
    script = KILLED_WRITER.format(tests=str(tests), scripts=str(tests.parent / "scripts"), config=str(cfg_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    root = tmp_path / cache.DEFAULT_CACHE_NAME
    try:
        assert child.stdout.readline().startswith("tokenizing")
        deadline = time.monotonic() + 60
        while not any(root.glob(".*.tmp/ids.bin")) or next(root.glob(".*.tmp/ids.bin")).stat().st_size == 0:
            assert time.monotonic() < deadline and child.poll() is None, "the writer finished before the kill"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not any((p / "meta.json").exists() for p in root.iterdir())  # no entry a later start could trust
    assert any(p.name.endswith(".tmp") for p in root.iterdir())  # the dead writer's partial folder
    cfg = load_config(cfg_path, [])
    said = Said()
    bundle = load(cfg, tokenizer, said)
    assert said.tokenized and bundle.stats.num_train == 60_000
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []  # the leftovers are gone
    assert as_tuples(bundle.train[:3]) == as_tuples(data.build_in_memory(data.options_from(cfg), tokenizer).train[:3])


# --------------------------------------------------------------------------------------------------------------
# lora-train --prepare, and two processes


def test_prepare_tokenizes_only_and_a_later_run_reads_the_cache(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=TEXT_ROWS, train={"max_steps": 2})
    runner = CliRunner()
    result = runner.invoke(train_app, [str(config), "--prepare"])
    assert result.exit_code == 0, result.output
    assert "tokenizing the data into" in result.output and "examples" in result.output
    assert "data cache:" in result.output
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written there
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    assert "tokenizing" not in result.output
    refused = runner.invoke(train_app, [str(config), "--prepare", "--dry-run"])
    assert refused.exit_code == 2 and "--prepare only tokenizes" in refused.output


def test_two_processes_tokenize_once(tmp_path, trainable_model_dir):
    from test_distributed import run_train

    config = make_config(tmp_path, trainable_model_dir("llama"), rows=TEXT_ROWS,
                         train={"max_steps": 2, "micro_batch_size": 2})
    done = run_train(config, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert output.count("tokenizing the data into") == 1, output[-3000:]
    root = tmp_path / cache.DEFAULT_CACHE_NAME
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


# --------------------------------------------------------------------------------------------------------------
# Streaming readers


def test_a_json_array_streams_across_chunk_boundaries(tmp_path, monkeypatch):
    from lora_cli.data import sources

    rows = [{"text": f"row {i} " + "x" * (i % 13), "n": i} for i in range(200)]
    path = tmp_path / "rows.json"
    path.write_text("[\n" + ",\n  ".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
    monkeypatch.setattr(sources, "JSON_CHUNK", 7)  # every element straddles reads
    assert data.load_rows(str(path)) == rows
    (tmp_path / "bad.json").write_text('[{"text": "a"}, {"text": ]', encoding="utf-8")
    with pytest.raises(data.RowError.__mro__[1], match=r"bad\.json' is not valid JSON"):
        data.load_rows(str(tmp_path / "bad.json"))


def test_num_proc_auto_starts_no_workers_for_a_small_file(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    from lora_cli.data import parallel

    def no_pool(*args, **kwargs):
        raise AssertionError("a small file must be tokenized without starting worker processes")

    monkeypatch.setattr(parallel.multiprocessing, "get_context", no_pool)
    cfg = config_for(tmp_path, tiny_model_dir(), rows=CHAT_ROWS, data={"max_length": 56})
    assert cfg.data.num_proc == "auto"  # the default
    serial = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_proc": 1})})
    expected = data.build_in_memory(data.options_from(serial), tokenizer)
    assert as_tuples(load(cfg, tokenizer).train) == as_tuples(expected.train)


def test_num_proc_auto_hands_the_rest_to_workers_in_order(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    from lora_cli.data import build, parallel

    monkeypatch.setattr(build, "TOKENIZE_CHUNK", 5)
    monkeypatch.setattr(parallel, "AUTO_IN_PROCESS_CHUNKS", 2)  # 10 rows here, the rest in the workers
    monkeypatch.setattr(parallel, "auto_processes", lambda: 2)
    started = []
    real_context = parallel.multiprocessing.get_context
    monkeypatch.setattr(parallel.multiprocessing, "get_context",
                        lambda kind: started.append(kind) or real_context(kind))
    cfg = config_for(tmp_path, tiny_model_dir(), rows=CHAT_ROWS, data={"max_length": 56, "val_size": 4})
    serial = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_proc": 1})})
    expected = data.build_in_memory(data.options_from(serial), tokenizer)
    cached = load(cfg, tokenizer)
    assert started == ["spawn"]
    assert as_tuples(cached.train) == as_tuples(expected.train) and as_tuples(cached.val) == as_tuples(expected.val)
    assert cached.stats == expected.stats


def test_num_proc_is_auto_or_a_positive_count():
    from lora_cli.config import validate_config
    from lora_cli.errors import UserError

    base = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}
    assert validate_config({**base, "data": {"path": "d.jsonl", "num_proc": 3}}).data.num_proc == 3
    for wrong in (0, "many", 2.5, True):
        with pytest.raises(UserError) as caught:
            validate_config({**base, "data": {"path": "d.jsonl", "num_proc": wrong}})
        assert "has 1 problem:" in str(caught.value)
        assert "data.num_proc: must be auto or a number of processes, 1 or more (got " in str(caught.value)
