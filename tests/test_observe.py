"""Watching a run: trackers through Accelerate (TensorBoard, W&B offline), loss.png and --plot, sample answers to
train.eval_prompts, and the closing summary."""

from __future__ import annotations

import importlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import CHAT_ROWS, interrupted_copy, make_config
from lora_cli.cli import train_app
from lora_cli.config import load_config
from lora_cli.train import train
from lora_cli.training import trackers as trackers_lib

runner = CliRunner()
PROMPTS = ["Who is the mayor?", "What colour is the lighthouse?"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def live_dir(out: Path) -> Path:
    (folder,) = [p for p in (out / "runs").iterdir() if (p / "metrics.jsonl").is_file()]
    return folder


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        steps = [p.step for p in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step shown twice: {steps}"
        scalars[tag] = {p.step: p.value for p in points}
    return scalars


def expected_scalars(records: list[dict]) -> dict[str, dict[int, float]]:
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for tag, value in trackers_lib.scalars(record).items():
            expected.setdefault(tag, {})[record["step"]] = value
    return expected


def assert_same_scalars(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        assert sorted(got[tag]) == sorted(want[tag]), tag
        for step, value in want[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)


# --- trackers ----------------------------------------------------------------------------------------------------


def test_tensorboard_scalars_equal_metrics_also_after_resume(tmp_path, trainable_model_dir):
    pytest.importorskip("tensorboard")
    train_section = {"max_steps": 6, "save_steps": 2, "eval_steps": 3, "report_to": "tensorboard",
                     "run_name": "first-try"}
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS, data={"val_size": 3},
                         train=train_section)
    cfg = load_config(config)
    train(cfg, quiet=True)
    out = Path(cfg.train.output_dir)
    records = jsonl(out / "metrics.jsonl")
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/ppl"} <= set(expected_scalars(records))
    assert_same_scalars(tensorboard_scalars(out / "runs" / "first-try"), expected_scalars(records))
    untracked = load_config(config, [f"train.output_dir={tmp_path / 'untracked'}", "train.report_to=none"])
    train(untracked, quiet=True)  # the trackers change nothing that is trained
    weights = "adapter_model.safetensors"
    assert (tmp_path / "untracked" / weights).read_bytes() == (out / weights).read_bytes()

    # Killed after step 6 was logged but resumed from checkpoint-2: TensorBoard shows every step once, the
    # resumed run's values after step 2 (purge_step), and the same run folder is appended to.
    resumed_out = interrupted_copy(out, 2, tmp_path / "resumed")
    shutil.copytree(out / "runs", resumed_out / "runs")
    resumed_cfg = load_config(config, [f"train.output_dir={resumed_out}", "train.resume_from_checkpoint=auto"])
    train(resumed_cfg, quiet=True)
    resumed_records = jsonl(resumed_out / "metrics.jsonl")
    assert [r["step"] for r in resumed_records] == [r["step"] for r in records]
    assert sorted(p.name for p in (resumed_out / "runs").iterdir()) == ["first-try"]  # the name was kept
    assert len(list((resumed_out / "runs" / "first-try").glob("events.out.tfevents.*"))) == 2
    assert_same_scalars(tensorboard_scalars(resumed_out / "runs" / "first-try"), expected_scalars(resumed_records))


def test_a_fresh_run_reusing_a_run_name_hides_the_older_runs_events(tmp_path, trainable_model_dir):
    """A second fresh run named like the first (train.run_name) writes into the same TensorBoard folder: it must show
    only its own steps, as its metrics.jsonl does, not the first run's longer curve behind it."""
    pytest.importorskip("tensorboard")
    train_section = {"max_steps": 6, "report_to": "tensorboard", "run_name": "again"}
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS, train=train_section)
    train(load_config(config), quiet=True)
    second = load_config(config, ["train.max_steps=3", "train.learning_rate=0.002", "train.overwrite_output_dir=true"])
    train(second, quiet=True)
    out = Path(second.train.output_dir)
    assert len(list((out / "runs" / "again").glob("events.out.tfevents.*"))) == 2
    assert_same_scalars(tensorboard_scalars(out / "runs" / "again"), expected_scalars(jsonl(out / "metrics.jsonl")))


def wandb_history(run_file: Path) -> tuple[dict, dict[int, dict]]:
    """The run's (id, name, project) and history rows of an offline W&B run file (a leveldb-style log of
    wandb_internal Record protos)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows, run = 7, 32768, b"", {}, {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                run = {"id": record.run.run_id, "name": record.run.display_name, "project": record.run.project}
            if record.WhichOneof("record_type") == "history":
                # W&B stores a key holding "/" (train/loss) as its parts in nested_key
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                rows.setdefault(record.history.step.num, {}).update(items)
    return run, rows


def test_wandb_offline_gets_every_record_and_the_samples(tmp_path, trainable_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS, data={"val_size": 3},
                         train={"max_steps": 4, "eval_steps": 2, "report_to": ["wandb"], "wandb_project": "quill",
                                "eval_prompts": PROMPTS[:1], "eval_max_new_tokens": 4})
    cfg = load_config(config)
    train(cfg, quiet=True)
    out = Path(cfg.train.output_dir)
    (run_file,) = (out / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    run, history = wandb_history(run_file)
    state = json.loads((out / "trainer_state.json").read_text())
    assert run == {"id": state["run_id"], "name": state["run_name"], "project": "quill"}
    for tag, by_step in expected_scalars(jsonl(out / "metrics.jsonl")).items():
        for step, value in by_step.items():
            assert history[step][tag] == pytest.approx(value, rel=1e-9), (tag, step)
    # The answers as a table per evaluation, holding what samples.jsonl holds.
    assert {step for step, row in history.items() if row.get("samples/_type") == "table-file"} == {2, 4}
    tables = [json.loads((run_file.parent / "files" / history[step]["samples/path"]).read_text()) for step in (2, 4)]
    assert [row for table in tables for row in table["data"]] == [
        [r["step"], r["prompt"], r["answer"]] for r in jsonl(out / "samples.jsonl")]


@pytest.mark.parametrize("given, expected", [
    (None, []), ("none", []), ("tensorboard", ["tensorboard"]), (["wandb", "tensorboard"], ["wandb", "tensorboard"]),
    (["none"], []), ("TensorBoard", ["tensorboard"]),
])
def test_report_to_spellings(tmp_path, tiny_model_dir, given, expected):
    cfg = load_config(make_config(tmp_path, tiny_model_dir("llama"), train={"report_to": given}))
    assert cfg.train.report_to == expected


def test_unknown_tracker_bad_run_name_and_empty_prompts_are_config_errors(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir("llama"),
                         train={"report_to": ["tensorbord"], "run_name": "a/b", "eval_prompts": []})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 2
    assert "train.report_to[0]: must be one of tensorboard, wandb" in result.output
    assert "did you mean `tensorboard`" in result.output
    assert "train.run_name: must be a folder name" in result.output
    assert "train.eval_prompts: must be a list of prompts" in result.output


def test_logging_dir_moves_the_tracker_files_but_not_the_live_log(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    config = make_config(tmp_path, tiny_model_dir("llama"),
                         train={"max_steps": 2, "report_to": ["tensorboard"], "run_name": "r1",
                                "logging_dir": str(tmp_path / "tb")})
    train(load_config(config), quiet=True)
    assert list((tmp_path / "tb" / "r1").glob("events.out.tfevents.*"))
    assert (tmp_path / "out" / "runs" / "r1" / "metrics.jsonl").is_file()
    assert not list((tmp_path / "out" / "runs" / "r1").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("tracker, install", [("tensorboard", 'pip install -e ".[tensorboard]"'),
                                              ("wandb", "pip install wandb")])
def test_missing_tracker_exits_2_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, tracker, install):
    train_module = importlib.import_module("lora_cli.train")  # the module; lora_cli.train is the API function

    monkeypatch.setattr(trackers_lib, "_installed", lambda name: name != tracker)
    monkeypatch.setattr(train_module, "prepare_model_and_data", lambda *a: pytest.fail("the model was loaded"))
    config = make_config(tmp_path, tiny_model_dir("llama"), train={"report_to": ["tensorboard", "wandb"]})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 2, result.output
    assert f"train.report_to asks for {tracker}, which is not installed" in result.output
    assert install in result.output
    assert not (tmp_path / "out").exists()


def test_trackers_are_ended_when_the_run_fails(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    train_module = importlib.import_module("lora_cli.train")  # the module; lora_cli.train is the API function

    ended = []
    monkeypatch.setattr(trackers_lib.Trackers, "end", lambda self: ended.append(True))
    monkeypatch.setattr(train_module, "fit", lambda run, loop, stop: (_ for _ in ()).throw(RuntimeError("boom")))
    config = make_config(tmp_path, tiny_model_dir("llama"), train={"report_to": ["tensorboard"]})
    with pytest.raises(RuntimeError, match="boom"):
        train(load_config(config), quiet=True)
    assert ended


# --- loss.png and --plot ------------------------------------------------------------------------------------------


def test_loss_png_at_the_end_in_checkpoints_and_by_plot(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS, data={"val_size": 3},
                         train={"max_steps": 6, "save_steps": 3, "eval_steps": 3})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for picture in (out / "loss.png", out / "checkpoint-3" / "loss.png"):
        width, height = png_size(picture)
        assert (width, height) == (900, 600)
        assert picture.stat().st_size > 20_000  # curves, labels and a legend, not an empty canvas
    # The end-of-run summary, with where everything is.
    for text in ("run summary", "optimizer steps", "6 of 6", "best validation loss", str(out / "loss.png")):
        assert text in result.output, text

    drawn = out / "loss.png"
    drawn.unlink()
    result = runner.invoke(train_app, ["--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert png_size(drawn) == (900, 600) and f"loss curves drawn to {drawn}" in result.output

    # An interrupted run (a checkpoint and the live log only) is drawn from runs/<run_name>/metrics.jsonl.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(out / "checkpoint-3", cut / "checkpoint-3")
    shutil.copytree(out / "runs", cut / "runs")
    with open(live_dir(cut) / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss"')  # a line the running job is still writing
    result = runner.invoke(train_app, ["--plot", str(cut)])
    assert result.exit_code == 0, result.output
    # Beside the live log it was drawn from: a folder's top level holds only a finished result's picture.
    assert png_size(live_dir(cut) / "loss.png") == (900, 600) and not (cut / "loss.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--plot", "{tmp}/nowhere"], "no such folder"),
    (["--plot", "{tmp}"], "there is no metrics.jsonl"),
    (["--plot", "{tmp}", "config.yaml"], "takes no config, overrides or other options (got config.yaml)"),
    (["--plot", "{tmp}", "--estimate"], "(got --estimate)"),
    (["--plot", "{tmp}", "--json"], "(got --json)"),
    (["--plot", "{tmp}", "--dry-run", "--gpu", "t4"], "(got --dry-run --gpu)"),
    ([], "Missing the config file"),
])
def test_plot_usage_errors(tmp_path, args, message):
    result = runner.invoke(train_app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_run_without_matplotlib_still_finishes(tmp_path, tiny_model_dir, monkeypatch):
    from lora_cli.training import plot

    monkeypatch.setattr(plot, "matplotlib_missing", lambda: True)
    monkeypatch.setattr(plot, "_warned", [])
    config = make_config(tmp_path, tiny_model_dir("llama"), train={"max_steps": 2, "save_steps": 1})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    assert result.output.count("matplotlib is not installed") == 1
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "loss.png").exists()
    assert not (out / "checkpoint-1" / "loss.png").exists()
    assert "run summary" in result.output and "loss.png" not in result.output.split("run summary")[1]  # no plot row


def test_learning_rate_tick_labels_fit_the_margin():
    from lora_cli.training.plot import short_number

    assert [short_number(v) for v in (0, 1.5e-4, 1e-4, 5e-5, 2e-3, 1.25e-6)] == ["0", "1.5e-4", "1e-4",
                                                                               "5e-5", "0.002", "1.3e-6"]
    assert all(len(short_number(v * 1e-6)) <= 6 for v in range(1, 1000))


def test_smoothing_follows_the_trend_without_lag_at_the_start():
    from lora_cli.training.plot import smooth

    assert smooth([5.0] * 30) == pytest.approx([5.0] * 30)  # bias-corrected: no pull towards zero
    noisy = [10 - 0.2 * i + (0.5 if i % 2 else -0.5) for i in range(40)]
    smoothed = smooth(noisy)
    tail = smoothed[5:]
    assert max(abs(a - b) for a, b in zip(tail[1:], tail[:-1])) < 0.45  # the zigzag (steps of 1.2) is gone
    assert smoothed[-1] < smoothed[0] - 5  # the trend stays


# --- sample answers -----------------------------------------------------------------------------------------------


def test_eval_prompts_answer_at_every_evaluation_without_changing_training(tmp_path, trainable_model_dir):
    """Packing, gradient checkpointing and LoRA dropout: every state generation could disturb is in play."""
    model_dir = trainable_model_dir("llama")
    common = {"max_steps": 6, "eval_steps": 2, "gradient_checkpointing": True}
    data = {"val_size": 3, "packing": True}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = make_config(tmp_path / "a", model_dir, rows=CHAT_ROWS, data=data, lora={"dropout": 0.1},
                        train={**common, "output_dir": str(tmp_path / "a/out")})
    asked = make_config(tmp_path / "b", model_dir, rows=CHAT_ROWS, data=data, lora={"dropout": 0.1},
                        train={**common, "output_dir": str(tmp_path / "b/out"), "eval_prompts": PROMPTS,
                               "eval_max_new_tokens": 6})
    train(load_config(plain), quiet=True)
    result = runner.invoke(train_app, [str(asked)])
    assert result.exit_code == 0, result.output
    a, b = tmp_path / "a/out", tmp_path / "b/out"
    assert (b / "adapter_model.safetensors").read_bytes() == (a / "adapter_model.safetensors").read_bytes()
    compared = ("step", "loss", "grad_norm", "eval_loss")
    assert ([{k: r.get(k) for k in compared} for r in jsonl(b / "metrics.jsonl")]
            == [{k: r.get(k) for k in compared} for r in jsonl(a / "metrics.jsonl")])

    rows = jsonl(b / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (2, 4, 6) for p in PROMPTS]  # none twice
    assert all(isinstance(r["answer"], str) for r in rows)
    assert jsonl(live_dir(b) / "samples.jsonl") == rows
    assert "step 2 sample: Who is the mayor?" in result.output
    assert not (a / "samples.jsonl").exists()


def test_eval_prompts_from_a_file_without_validation_data(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    # No validation data: answers every train.eval_steps, and at the end.
    config = make_config(tmp_path, tiny_model_dir("llama"), rows=CHAT_ROWS,
                         train={"max_steps": 5, "eval_steps": 2, "eval_prompts": str(prompts),
                                "eval_max_new_tokens": 3})
    train(load_config(config), quiet=True)
    rows = jsonl(tmp_path / "out" / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (2, 4, 5) for p in PROMPTS]
    assert "eval/loss" not in json.dumps(jsonl(tmp_path / "out" / "metrics.jsonl"))


def test_eval_prompts_at_each_epoch_end_when_no_eval_steps(tmp_path, tiny_model_dir):
    # 12 examples in batches of 4: 3 steps an epoch.
    config = make_config(tmp_path, tiny_model_dir("llama"), rows=CHAT_ROWS,
                         train={"max_steps": None, "epochs": 2, "eval_prompts": PROMPTS[:1], "eval_max_new_tokens": 2})
    train(load_config(config), quiet=True)
    assert [r["step"] for r in jsonl(tmp_path / "out" / "samples.jsonl")] == [3, 6]


def test_missing_prompt_file_exits_2_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    train_module = importlib.import_module("lora_cli.train")  # the module; lora_cli.train is the API function

    monkeypatch.setattr(train_module, "prepare_model_and_data", lambda *a: pytest.fail("the model was loaded"))
    config = make_config(tmp_path, tiny_model_dir("llama"), train={"eval_prompts": "What is LoRA?"})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 2
    assert "train.eval_prompts: 'What is LoRA?' is not a file" in result.output
    assert 'eval_prompts: ["What is LoRA?"]' in result.output


def test_resumed_run_continues_the_samples_without_duplicates(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS,
                         train={"max_steps": 6, "eval_steps": 2, "save_steps": 3, "eval_prompts": PROMPTS[:1],
                                "eval_max_new_tokens": 4})
    cfg = load_config(config)
    train(cfg, quiet=True)
    out = Path(cfg.train.output_dir)
    resumed = interrupted_copy(out, 3, tmp_path / "resumed")
    shutil.copytree(out / "runs", resumed / "runs")  # the live samples.jsonl holds steps 4 and 6 already
    train(load_config(config, [f"train.output_dir={resumed}", "train.resume_from_checkpoint=auto",
                               "train.run_name=second-part"]), quiet=True)
    rows = jsonl(resumed / "samples.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows == jsonl(out / "samples.jsonl")  # exact resume: the same answers
    assert jsonl(resumed / "runs" / "second-part" / "samples.jsonl") == rows  # a new name was given


def test_a_stopped_run_prints_a_short_summary_with_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from lora_cli.training.signals import StopRequests

    def asked_at_once(self):  # as if Ctrl-C came during the first step
        self.signum = 2
        return self

    monkeypatch.setattr(StopRequests, "__enter__", asked_at_once)
    config = make_config(tmp_path, tiny_model_dir("llama"), train={"max_steps": 5})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 130, result.output
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert "stopped: run summary" in result.output and "1 of 5" in result.output
    assert str(checkpoint) in result.output and str(checkpoint / "loss.png") in result.output
    assert png_size(checkpoint / "loss.png") == (900, 600)
