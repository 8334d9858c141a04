"""Where a run starts, as a table: resume.plan_start is a pure function of the config and one snapshot of
output_dir, so each case is a hand-made snapshot (no model, no files) and the decision it must give."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lora_cli.config.schema import Config
from lora_cli.errors import UserError
from lora_cli.training.resume import flat_config, plan_start
from lora_cli.training.snapshot import CheckpointInfo, Snapshot
from lora_cli.training.state import TrainState

OUT = Path("/runs/out")
STARTED = "2026-01-01T10:00:00+00:00"


def config(**train) -> Config:
    return Config.model_validate({
        "model": {"name_or_path": "base"}, "lora": {"r": 8}, "data": {"path": "train.jsonl"},
        "train": {"output_dir": str(OUT), "max_steps": 4, "save_steps": 2, **train},
    })


def checkpoint(step: int, run: str = "A", problem: str = "", cfg: Config | None = None, has_best: bool = False,
               best_step: int | None = None, path: Path | None = None, started: str = STARTED) -> CheckpointInfo:
    state = TrainState(global_step=step, total_steps=4, run_id=run, run_started=started, best_step=best_step,
                       best_eval_loss=None if best_step is None else 1.25)
    return CheckpointInfo(path or OUT / f"checkpoint-{step}", step, state, problem, flat_config(cfg or config()),
                          has_best)


def folder(*checkpoints: CheckpointInfo, result: CheckpointInfo | None = None, resumable_result: bool = False,
           result_cfg: Config | None = None) -> Snapshot:
    state = None if result is None else {"global_step": result.step, "run_id": result.run_id}
    settings = flat_config(result_cfg or config()) if result is not None else {}
    as_checkpoint = replace(result, path=OUT) if result is not None and resumable_result else None
    return Snapshot(OUT, True, result is not None, state, settings, as_checkpoint, checkpoints)


def decide(cfg: Config, snapshot: Snapshot, explicit: CheckpointInfo | None = None):
    try:
        plan = plan_start(cfg, snapshot, explicit)
    except UserError as err:
        return "refused", str(err)
    if plan.finished:
        return "finished", plan.finished
    if plan.checkpoint is None:
        return "fresh", " ".join(plan.notes)
    best = f"; best from {plan.best.path.name}" if plan.best else ""
    return "resume", f"{plan.checkpoint.path.name} at {plan.checkpoint.step}{best}; " + " ".join(plan.notes)


AUTO = {"resume_from_checkpoint": "auto"}
CASES = {
    # name: (train overrides, snapshot, expected kind, a text the decision must contain)
    "empty-folder": ({}, folder(), "fresh", ""),
    "empty-folder-auto": (AUTO, folder(), "fresh", "no checkpoint to resume"),
    "interrupted-run-without-auto": ({}, folder(checkpoint(2)), "refused", "checkpoints of an interrupted run"),
    "interrupted-run-overwritten": ({"overwrite_output_dir": True}, folder(checkpoint(2)), "fresh", "starting over"),
    "finished-adapter-without-auto": ({}, folder(result=checkpoint(4)), "refused", "already holds a trained adapter"),
    "auto-takes-the-newest": (AUTO, folder(checkpoint(2), checkpoint(4)), "resume", "checkpoint-4 at 4"),
    "auto-skips-a-damaged-newest": (AUTO, folder(checkpoint(2), checkpoint(4, problem="its x is damaged")), "resume",
                                    "checkpoint-2 at 2; note: checkpoint-4 cannot be resumed from: its x is damaged"),
    "auto-newest-run-wins": (AUTO, folder(checkpoint(6, run="old", started="2025-01-01T00:00:00+00:00"),
                                          checkpoint(2)), "resume", "checkpoint-2 at 2"),
    "auto-finished-same-length": (AUTO, folder(checkpoint(2), result=checkpoint(4)), "finished",
                                  "nothing to resume. To train further, raise train.max_steps or train.epochs and "
                                  "the run continues from step 2"),
    "auto-finished-without-checkpoints": (AUTO, folder(result=checkpoint(4)), "finished",
                                          "kept no checkpoint to continue from"),
    # A longer run continues from the finished result (it carries the resume state), not from checkpoint-2.
    "auto-extends-a-finished-run": ({**AUTO, "max_steps": 8}, folder(checkpoint(2), result=checkpoint(4),
                                                                     resumable_result=True), "resume", "out at 4"),
    "auto-extends-from-an-old-style-result": ({**AUTO, "max_steps": 8}, folder(checkpoint(2), result=checkpoint(4)),
                                              "resume", "checkpoint-2 at 2"),
    "auto-another-config": (AUTO, folder(checkpoint(2, cfg=config(learning_rate=1.0))), "refused",
                            "train.learning_rate: 1.0 in the checkpoint, 0.0002 now"),
    "auto-another-config-overwritten": ({**AUTO, "overwrite_output_dir": True},
                                        folder(checkpoint(2, cfg=config(learning_rate=1.0))), "fresh",
                                        "belong to a run with another config"),
    "auto-another-runs-adapter": (AUTO, folder(result=checkpoint(4, run="B"), result_cfg=config(learning_rate=1.0)),
                                  "refused", "holds a trained adapter of another run"),
    # train.load_best_at_end switched on at a resume: the best weights come from the best step's checkpoint.
    "best-switched-on-from-its-checkpoint": ({**AUTO, "load_best_at_end": True},
                                             folder(checkpoint(2), checkpoint(4, best_step=2)), "resume",
                                             "checkpoint-4 at 4; best from checkpoint-2"),
    "best-switched-on-at-the-checkpoint-itself": ({**AUTO, "load_best_at_end": True},
                                                  folder(checkpoint(4, best_step=4)), "resume",
                                                  "best from checkpoint-4"),
    "best-switched-on-but-gone": ({**AUTO, "load_best_at_end": True}, folder(checkpoint(4, best_step=2)), "refused",
                                  "train.load_best_at_end=true was switched on at this resume"),
    "best-kept-all-along": ({**AUTO, "load_best_at_end": True},
                            folder(checkpoint(4, best_step=2, has_best=True, cfg=config(load_best_at_end=True))),
                            "resume", "checkpoint-4 at 4; resuming"),
    "best-without-any-evaluation": ({**AUTO, "load_best_at_end": True}, folder(checkpoint(4)), "resume",
                                    "checkpoint-4 at 4; resuming"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_where_a_run_starts(name):
    train, snapshot, kind, text = CASES[name]
    got_kind, got_text = decide(config(**train), snapshot)
    assert (got_kind, text in got_text) == (kind, True), got_text


def test_an_explicit_checkpoint_must_not_mix_into_another_runs_folder():
    elsewhere = checkpoint(2, run="A", path=Path("/elsewhere/checkpoint-2"))
    cfg = config(resume_from_checkpoint=str(elsewhere.path))
    kind, text = decide(cfg, folder(checkpoint(4, run="B")), explicit=elsewhere)
    assert kind == "refused" and "another run's files (checkpoint-4)" in text
    assert decide(cfg, folder(), explicit=elsewhere)[0] == "resume"
    damaged = replace(elsewhere, problem="it lacks optimizer.pt")
    assert "cannot be resumed from: it lacks optimizer.pt" in decide(cfg, folder(), explicit=damaged)[1]


def test_a_dry_run_says_what_a_real_run_would_refuse(tmp_path, trainable_model_dir):
    from typer.testing import CliRunner

    from helpers import make_config
    from lora_cli.cli import train_app

    config = make_config(tmp_path, trainable_model_dir("llama"))
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)  # an interrupted run's (incomplete) checkpoint
    result = CliRunner().invoke(train_app, [str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note: a real run would stop here:" in text and "holds checkpoints of an interrupted run" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-3"]  # nothing written, no lock taken
    assert not list(tmp_path.glob(".out.*"))
