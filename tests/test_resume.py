"""Exact resume: a run continued from its checkpoint at step k gives the same per-step losses and byte-identical
adapter_model.safetensors as the run that was never interrupted (CPU, fp32, fixed seed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import CHAT_ROWS, interrupted_copy, make_config
from lora_cli.cli import train_app
from lora_cli.config import load_config
from lora_cli.errors import UserError
from lora_cli.train import train

runner = CliRunner()
STEPS = 8
COMPARED = ("step", "epoch", "loss", "learning_rate", "grad_norm", "skipped_steps", "eval_loss", "eval_tokens")


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in COMPARED if k in r} for r in rows]


def weights(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


def resume_case(tmp_path, model_dir, stop_at: int, **sections):
    """(uninterrupted output_dir, resumed output_dir) for the same config."""
    train_section = {"max_steps": STEPS, "save_steps": 1, "learning_rate": 1e-2, **sections.pop("train", {})}
    config = make_config(tmp_path, model_dir, rows=CHAT_ROWS, train=train_section, **sections)
    cfg = load_config(config)
    train(cfg, quiet=True)
    reference = Path(cfg.train.output_dir)
    resumed_out = interrupted_copy(reference, stop_at, tmp_path / "resumed")
    resumed = load_config(config, [f"train.output_dir={resumed_out}", "train.resume_from_checkpoint=auto"])
    train(resumed, quiet=True)
    return reference, resumed_out


@pytest.mark.parametrize("case", [
    {},
    {"data": {"packing": True, "max_length": 64}},
    {"train": {"gradient_accumulation_steps": 2, "micro_batch_size": 2}},
    {"data": {"val_size": 3}, "train": {"eval_steps": 3}},
    {"lora": {"dropout": 0.1}},
], ids=["plain", "packing", "accumulation", "validation", "dropout"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, trainable_model_dir, case):
    reference, resumed = resume_case(tmp_path, trainable_model_dir("llama"), stop_at=3, **case)
    assert records(resumed) == records(reference)
    assert weights(resumed) == weights(reference)
    assert [r["step"] for r in records(resumed) if "loss" in r] == list(range(1, STEPS + 1))  # none doubled or lost


def test_resume_with_save_total_limit_keeps_the_runs_newest(tmp_path, trainable_model_dir):
    reference, resumed = resume_case(tmp_path, trainable_model_dir("llama"), stop_at=4,
                                     train={"save_steps": 2, "save_total_limit": 2})
    assert weights(resumed) == weights(reference)
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_checkpoint_holds_the_full_training_state_and_loads_in_peft(tmp_path, trainable_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model_dir = trainable_model_dir("llama")
    config = make_config(tmp_path, model_dir, rows=CHAT_ROWS, train={"max_steps": 4, "save_steps": 2})
    train(load_config(config), quiet=True)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    for name in ("adapter_config.json", "adapter_model.safetensors", "lora_config.yaml", "trainer_state.json",
                 "optimizer.pt", "scheduler.pt", "rng_state.pth", "tokenizer.json"):
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["batch_in_epoch"] == 2 and state["run_id"]
    assert len(torch.load(checkpoint / "rng_state.pth", weights_only=True)) == 1  # one process
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert all(s["step"].item() == 2 for s in optimizer["state"].values())
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), checkpoint)  # still an adapter


def test_max_steps_may_grow_on_resume(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS,
                         train={"max_steps": 4, "save_steps": 2, "lr_scheduler": "constant"})
    train(load_config(config), quiet=True)
    longer = load_config(config, ["train.max_steps=6", "train.resume_from_checkpoint=auto"])
    result = train(longer, quiet=True)
    assert result.state.global_step == 6
    assert [r["step"] for r in records(tmp_path / "out") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_new_length_on_resume_says_the_schedule_is_replanned(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS,
                         train={"max_steps": 4, "save_steps": 2})
    assert runner.invoke(train_app, [str(config)]).exit_code == 0
    shorter = runner.invoke(train_app, [str(config), "train.max_steps=1", "train.resume_from_checkpoint="
                                        f"{tmp_path / 'out' / 'checkpoint-2'}"])
    assert shorter.exit_code == 2 and "fewer than it has already done" in shorter.output
    assert "at least 2" in shorter.output
    longer = runner.invoke(train_app, [str(config), "train.max_steps=8", "train.resume_from_checkpoint=auto"])
    assert longer.exit_code == 0, longer.output
    assert "trains 8 steps in all, the checkpoint's run 4" in " ".join(longer.output.split())
    assert "re-planned" in longer.output


def test_auto_on_a_finished_run_has_nothing_to_do(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 3, "save_steps": 2})
    assert runner.invoke(train_app, [str(config)]).exit_code == 0
    before = weights(tmp_path / "out")
    result = runner.invoke(train_app, [str(config), "train.resume_from_checkpoint=auto"])
    assert result.exit_code == 0, result.output
    assert "already holds this run's finished adapter" in result.output
    assert weights(tmp_path / "out") == before


def test_auto_without_checkpoint_starts_fresh(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2})
    result = runner.invoke(train_app, [str(config), "train.resume_from_checkpoint=auto"])
    assert result.exit_code == 0, result.output
    assert "starting a fresh run" in result.output


@pytest.mark.parametrize("override,key", [
    ("lora.r=4", "lora.r"), ("train.learning_rate=0.5", "train.learning_rate"), ("train.seed=3", "train.seed"),
    ("data.max_length=32", "data.max_length"), ("train.micro_batch_size=2", "train.micro_batch_size"),
    ("train.lr_scheduler=linear", "train.lr_scheduler"),
])
def test_resume_refuses_a_config_that_changes_the_result(tmp_path, trainable_model_dir, override, key):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 4, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = interrupted_copy(tmp_path / "out", 2, tmp_path / "cut")
    result = runner.invoke(train_app, [str(config), f"train.output_dir={cut}", override,
                                       "train.resume_from_checkpoint=auto"])
    assert result.exit_code == 2, result.output
    assert key in result.output and "in the checkpoint" in result.output
    assert "Traceback" not in result.output


def test_resume_allows_watching_and_saving_changes(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 4, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = interrupted_copy(tmp_path / "out", 2, tmp_path / "cut")
    cfg = load_config(config, [f"train.output_dir={cut}", "train.resume_from_checkpoint=auto", "train.logging_steps=2",
                               "train.save_steps=1", "train.save_total_limit=1", "train.gradient_checkpointing=true"])
    assert train(cfg, quiet=True).state.global_step == 4


def test_resume_refuses_changed_data(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 4, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = interrupted_copy(tmp_path / "out", 2, tmp_path / "cut")
    data = tmp_path / "data.jsonl"
    data.write_text(data.read_text().replace("green", "blue"))
    with pytest.raises(UserError, match="training or validation data differs"):
        train(load_config(config, [f"train.output_dir={cut}", "train.resume_from_checkpoint=auto"]), quiet=True)


def test_explicit_checkpoint_path(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 4, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = interrupted_copy(tmp_path / "out", 2, tmp_path / "cut")
    cfg = load_config(config, [f"train.output_dir={cut}", f"train.resume_from_checkpoint={cut / 'checkpoint-2'}"])
    train(cfg, quiet=True)
    assert weights(cut) == weights(tmp_path / "out")
    train(load_config(config, [f"train.output_dir={tmp_path / 'other'}", "train.max_steps=1"]), quiet=True)
    elsewhere = load_config(config, [f"train.output_dir={tmp_path / 'other'}",
                                     f"train.resume_from_checkpoint={cut / 'checkpoint-2'}"])
    with pytest.raises(UserError, match="holds another run's files"):  # another run's finished adapter
        train(elsewhere, quiet=True)
    bad = load_config(config, [f"train.output_dir={tmp_path / 'x'}", f"train.resume_from_checkpoint={tmp_path}"])
    with pytest.raises(UserError, match="cannot be resumed from"):
        train(bad, quiet=True)


def test_rerun_over_an_interrupted_run_says_what_it_found(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 6, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = interrupted_copy(tmp_path / "out", 4, tmp_path / "cut")
    result = runner.invoke(train_app, [str(config), f"train.output_dir={cut}"])
    assert result.exit_code == 2
    assert "checkpoint-4" in result.output and "step 4 of 6" in result.output
    assert "train.resume_from_checkpoint=auto" in result.output and "overwrite_output_dir" in result.output
    assert (cut / "checkpoint-4").is_dir()  # nothing changed


def test_overwrite_starts_over_and_drops_the_old_runs_checkpoints(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 6, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = interrupted_copy(tmp_path / "out", 4, tmp_path / "cut")
    cfg = load_config(config, [f"train.output_dir={cut}", "train.overwrite_output_dir=true", "train.max_steps=3",
                               "train.save_total_limit=1"])
    train(cfg, quiet=True)
    # The stale checkpoint-4 (a higher step than anything of the new run) is gone, not kept over the new ones.
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((cut / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_early_stopping_and_best_adapter(tmp_path, trainable_model_dir, monkeypatch):
    import lora_cli.training.loop as loop

    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9])  # best at the 2nd evaluation, then two without improvement

    def fake_evaluate(*args, **kwargs):
        loss = next(losses)
        return {"eval_loss": loss, "eval_ppl": 2.0, "eval_tokens": 1}

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS, data={"val_size": 2},
                         train={"max_steps": 12, "eval_steps": 2, "save_steps": 4, "early_stopping_patience": 2,
                                "load_best_at_end": True})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 0, result.output
    assert "early stopping at step 8" in result.output
    assert "best evaluated one: step 4" in result.output
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["best_step"] == 4 and state["stopped_early"]
    # The final adapter is the one from step 4: exactly checkpoint-4's weights.
    assert weights(out) == weights(out / "checkpoint-4")


def test_early_stopping_needs_validation_data(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"early_stopping_patience": 2})
    result = runner.invoke(train_app, [str(config)])
    assert result.exit_code == 2
    assert "train.early_stopping_patience" in result.output and "data.val_size" in result.output


def test_save_minutes_checkpoints_by_time(tmp_path, trainable_model_dir, monkeypatch):
    import lora_cli.training.loop as loop

    clock = iter(range(0, 10_000, 40))  # every call 40 s later: with save_minutes=1, every other step saves
    monkeypatch.setattr(loop.time, "monotonic", lambda: float(next(clock)))
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 6, "save_minutes": 1})
    train(load_config(config), quiet=True)
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    assert steps and all(0 < s < 6 for s in steps)


def test_resolved_config_of_a_checkpoint_reloads(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2, "save_steps": 1})
    train(load_config(config), quiet=True)
    saved = yaml.safe_load((tmp_path / "out" / "checkpoint-1" / "lora_config.yaml").read_text())
    assert saved["train"]["resume_from_checkpoint"] is None


def test_early_stopping_and_the_best_adapter_survive_a_resume(tmp_path, trainable_model_dir, monkeypatch):
    """Stopped after step 3 and resumed, a run with early stopping and load_best_at_end stops at the same step with
    the same best adapter as the run never interrupted: the counters and the best weights are in the checkpoint."""
    import lora_cli.training.loop as loop

    real = loop.evaluate

    def mirrored(*args, **kwargs):  # 10 - the real loss: the first evaluation is the best, later ones are worse
        metrics = real(*args, **kwargs)
        return {**metrics, "eval_loss": 10.0 - metrics["eval_loss"]}

    monkeypatch.setattr(loop, "evaluate", mirrored)
    reference, resumed = resume_case(
        tmp_path, trainable_model_dir("llama"), stop_at=3, data={"val_size": 3},
        train={"max_steps": 12, "eval_steps": 2, "early_stopping_patience": 2, "load_best_at_end": True},
    )
    for out in (reference, resumed):
        state = json.loads((out / "trainer_state.json").read_text())
        assert state["stopped_early"] and state["global_step"] == 6 and state["best_step"] == 2
    assert records(resumed) == records(reference)
    assert weights(resumed) == weights(reference) == weights(reference / "checkpoint-2")  # the best, not the last
    assert (resumed / "checkpoint-3" / "best_adapter.safetensors").is_file()


def test_resume_refuses_changed_validation_data(tmp_path, trainable_model_dir):
    """The validation set decides early stopping and the best adapter: a changed val_path file is refused too."""
    from helpers import write_jsonl

    val = write_jsonl(tmp_path / "val.jsonl", CHAT_ROWS[:3])
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS, data={"val_path": str(val)},
                         train={"max_steps": 4, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = interrupted_copy(tmp_path / "out", 2, tmp_path / "cut")
    val.write_text(val.read_text().replace("Orla", "Olga"))
    with pytest.raises(UserError, match="training or validation data differs"):
        train(load_config(config, [f"train.output_dir={cut}", "train.resume_from_checkpoint=auto"]), quiet=True)


def test_a_damaged_newest_checkpoint_is_skipped_with_a_note(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS,
                         train={"max_steps": 6, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = tmp_path / "cut"
    cut.mkdir()
    for step in (2, 4):
        shutil.copytree(tmp_path / "out" / f"checkpoint-{step}", cut / f"checkpoint-{step}")
    damaged = cut / "checkpoint-4" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # cut short
    result = runner.invoke(train_app, [str(config), f"train.output_dir={cut}", "train.resume_from_checkpoint=auto"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "checkpoint-4 cannot be resumed from: its adapter_model.safetensors is damaged" in text
    assert f"resuming from {cut / 'checkpoint-2'}" in text
    assert weights(cut) == weights(tmp_path / "out")
    damaged.write_bytes(damaged.read_bytes()[:100])  # the resumed run wrote a good checkpoint-4: damage it again
    explicit = runner.invoke(train_app, [str(config), f"train.output_dir={tmp_path / 'other'}",
                                         f"train.resume_from_checkpoint={cut / 'checkpoint-4'}"])
    assert explicit.exit_code == 2 and "is damaged" in explicit.output and "Traceback" not in explicit.output


def test_auto_with_overwrite_starts_over_when_the_checkpoints_are_of_another_config(tmp_path, trainable_model_dir):
    """The same command rerun blindly (auto + overwrite) after a change of config: the old run's checkpoints cannot
    be continued, and overwrite_output_dir allows discarding them, so it starts over instead of refusing."""
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 4, "save_steps": 2})
    train(load_config(config), quiet=True)
    cut = interrupted_copy(tmp_path / "out", 2, tmp_path / "cut")
    args = [str(config), f"train.output_dir={cut}", "train.resume_from_checkpoint=auto", "lora.r=4"]
    refused = runner.invoke(train_app, args)
    assert refused.exit_code == 2 and "lora.r" in refused.output
    result = runner.invoke(train_app, args + ["train.overwrite_output_dir=true"])
    assert result.exit_code == 0, result.output
    assert "starting over" in result.output
    assert json.loads((cut / "adapter_config.json").read_text())["r"] == 4


def test_the_finished_message_says_how_to_train_further(tmp_path, trainable_model_dir):
    config = make_config(tmp_path, trainable_model_dir("llama"), train={"max_steps": 2})
    train(load_config(config), quiet=True)
    result = runner.invoke(train_app, [str(config), "train.resume_from_checkpoint=auto"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "kept no checkpoint to continue from" in text and "overwrite_output_dir" in text


@pytest.mark.parametrize("best", [False, True], ids=["last", "load_best_at_end"])
def test_extending_a_finished_run_continues_from_its_last_step(tmp_path, trainable_model_dir, best):
    """A finished run made longer (max_steps 4 -> 8, resume_from_checkpoint=auto) continues from step 4, where the
    result left it, not from checkpoint-2 (which would discard steps 3-4): with a constant learning rate it then
    equals the run that trained 8 steps at once, and save_total_limit still holds."""
    train_section = {"max_steps": 4, "save_steps": 2, "save_total_limit": 1, "lr_scheduler": "constant",
                     "learning_rate": 1e-2, "load_best_at_end": best, **({"eval_steps": 2} if best else {})}
    sections = {"lora": {"dropout": 0.1}, **({"data": {"val_size": 3}} if best else {})}
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS, train=train_section, **sections)
    train(load_config(config), quiet=True)
    out = tmp_path / "out"
    longer = runner.invoke(train_app, [str(config), "train.max_steps=8", "train.resume_from_checkpoint=auto"])
    assert longer.exit_code == 0, longer.output
    assert f"resuming from {out} (step 4" in " ".join(longer.output.split())
    reference = tmp_path / "reference"
    train(load_config(config, ["train.max_steps=8", f"train.output_dir={reference}"]), quiet=True)
    assert weights(out) == weights(reference)
    assert [r for r in records(out) if "loss" in r] == [r for r in records(reference) if "loss" in r]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-6"]


def test_load_best_at_end_switched_on_at_a_resume_restores_the_best(tmp_path, trainable_model_dir, monkeypatch):
    """The run kept no best weights (load_best_at_end was off): switched on at a resume, the best weights are read
    from the checkpoint of the best evaluation; when that checkpoint is gone the change is refused."""
    import lora_cli.training.loop as loop

    losses = iter([1.0, 2.0, 3.0, 4.0, 5.0])  # the best is the first evaluation, at step 2

    def fake_evaluate(*args, **kwargs):
        return {"eval_loss": next(losses), "eval_ppl": 2.0, "eval_tokens": 1}

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    config = make_config(tmp_path, trainable_model_dir("llama"), rows=CHAT_ROWS, data={"val_size": 3},
                         train={"max_steps": 4, "save_steps": 2, "eval_steps": 2})
    train(load_config(config), quiet=True)
    out, gone = tmp_path / "out", tmp_path / "gone"
    shutil.copytree(out, gone)
    shutil.rmtree(gone / "checkpoint-2")  # the best step's checkpoint is not there
    refused = runner.invoke(train_app, [str(config), f"train.output_dir={gone}", "train.max_steps=8",
                                        "train.resume_from_checkpoint=auto", "train.load_best_at_end=true"])
    assert refused.exit_code == 2, refused.output
    text = " ".join(refused.output.split())
    assert "train.load_best_at_end=true was switched on at this resume" in text and "step 2" in text

    result = runner.invoke(train_app, [str(config), "train.max_steps=8", "train.resume_from_checkpoint=auto",
                                       "train.load_best_at_end=true"])
    assert result.exit_code == 0, result.output
    assert "best evaluated one: step 2" in result.output
    assert weights(out) == weights(out / "checkpoint-2")  # the best, not the last
