"""The recipe runner (scalelm/train/recipe.py): a new recipe is a declaration, the runner owns the rest.

A run is continued only by the command that made it, a new run that fails before training leaves
nothing behind, and `train --init-from` takes the checkpoint's shape when no preset is asked for."""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
from train_helpers import TINY, cli, one_thread, shakespeare_data  # noqa: F401 (fixture)

from scalelm.errors import UserError
from scalelm.train.recipe import Recipe, run_command, run_recipe
from scalelm.train.run import PretrainRecipe


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    return shakespeare_data(shared_data, tmp_path_factory.mktemp("data") / "d", chars=20_000)


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(d).rglob("*")):
        h.update(str(p.relative_to(d)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def train_args(data, out, *extra) -> argparse.Namespace:
    return argparse.Namespace(out=str(out), data=str(data), preset=None, config=None, resume=None, init_from=None,
                              overrides=[*TINY, "--train.precision=fp32", *extra])


class CountingRecipe(PretrainRecipe):
    """A new recipe in a few lines: the LM objective with a loss that counts its calls, another
    metric shown, and a summary field. The runner is not touched."""

    command = "count"
    show_metrics = ("val_loss", "val_perplexity")

    def loss_fn(self, plan):
        from scalelm.train.trainer import default_loss

        self.calls = 0

        def loss(model, batch):
            self.calls += 1
            return default_loss(model, batch)

        return loss

    def summary(self, plan, trainer, batches, summary):
        return {"loss_calls": self.calls}


def test_a_new_recipe_is_a_declaration(tmp_path, data, one_thread, capsys):
    recipe = CountingRecipe()
    out = tmp_path / "run"
    assert run_recipe(recipe, train_args(data, out, "--train.max_steps=3", "--train.eval_every=3")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["loss_calls"] == 3 and summary["step"] == 3
    assert run_command(out) == "count"  # recorded in run.json
    assert (out / "config.json").is_file() and (out / "best").is_dir()


def test_a_run_is_continued_only_by_its_own_command(tmp_path, data, one_thread):
    out = tmp_path / "base"
    rc, _, se = cli("train", "--data", data, "--out", out, *TINY, "--train.max_steps=2", "--train.eval_every=0")
    assert rc == 0, se
    before = tree_hash(out)
    # distill --out of a pretraining run used to resume it, mixing two losses in one metrics file
    rc, so, se = cli("distill", "--teacher", out, "--data", data, "--out", out, "--train.max_steps=4")
    assert rc == 2 and "holds a run of `scalelm train`, not of `scalelm distill`" in se, se
    assert "Traceback" not in se and tree_hash(out) == before
    rc, _, se = cli("train", "--data", data, "--out", out, *TINY, "--train.max_steps=3", "--train.eval_every=0")
    assert rc == 0, se  # its own command continues it


def test_a_new_run_that_fails_before_training_leaves_nothing(tmp_path, data, one_thread):
    class Broken(PretrainRecipe):
        def build_model(self, plan, ctx, resume_from):
            raise UserError("no model today")

    out = tmp_path / "run"
    with pytest.raises(UserError, match="no model today"):
        run_recipe(Broken(), train_args(data, out, "--train.max_steps=2"))
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
    # so the same --out with corrected settings is a new run, not a half-made one to "resume"
    assert run_recipe(PretrainRecipe(), train_args(data, out, "--train.max_steps=1", "--model.n_layer=1")) == 0


def test_init_from_takes_the_checkpoint_shape(tmp_path, data, one_thread):
    a = tmp_path / "a"
    rc, _, se = cli("train", "--data", data, "--out", a, *TINY, "--train.max_steps=2", "--train.eval_every=2",
                    "--train.precision=fp32")
    assert rc == 0, se
    # the README's LoRA command: no preset and no --model.* settings, the shape comes from the checkpoint
    rc, so, se = cli("train", "--data", data, "--out", tmp_path / "lora", "--init-from", a / "best", "--lora.r=2",
                     "--train.max_steps=2", "--train.eval_every=0", "--log.progress=false")
    assert rc == 0, se
    assert json.loads(so)["trainable_params"] < json.loads(so)["params"]
    # a preset of another shape: the error is about --init-from, not about resuming
    rc, _, se = cli("train", "--data", data, "--out", tmp_path / "b", "--init-from", a / "best", "--preset", "baby",
                    "--train.max_steps=1")
    assert rc == 2 and "--init-from" in se and "shape" in se and "Traceback" not in se
    # only dropout may differ from the checkpoint's shape
    rc, _, se = cli("train", "--data", data, "--out", tmp_path / "c", "--init-from", a / "best",
                    "--model.n_layer=5", "--train.max_steps=1")
    assert rc == 2 and "fixes the model's shape" in se


def test_the_recipe_interface_defaults_are_the_language_model():
    r = Recipe()
    assert r.metric == "val_loss" and not r.higher_is_better
    assert r.batches(None, None, 1, 1) is None and r.evaluate_fn(None, 1) is None and r.model_io(None) is None
    with pytest.raises(NotImplementedError):
        r.prepare(None, None, None)


def test_train_refuses_an_encoder_decoder_before_touching_out(tmp_path, data):
    out = tmp_path / "ed"
    rc, _, se = cli("train", "--preset", "transformer-small", "--data", data, "--out", out, "--train.max_steps=1")
    assert rc == 2 and "finetune translate" in se and "Traceback" not in se
    assert len([ln for ln in se.splitlines() if ln.strip()]) == 1
    assert not out.exists()


def test_a_time_budget_without_max_steps_is_governed_by_the_clock(tmp_path, data, one_thread):
    """Warmup (100) and the evaluation interval (250) are scaled to the projected step count, the
    run is not cut at the default max_steps, and progress shows a time-based ETA."""
    out = tmp_path / "run"
    rc, so, se = cli("train", "--data", data, "--out", out, *[a for a in TINY if "warmup" not in a and "progress" not in a],
                     "--train.max_minutes=0.06", "--train.precision=fp32", "--log.progress=true")
    assert rc == 0, se
    s = json.loads(so)
    assert s["stopped"] == "time_budget" and "minutes" in se and "ETA" in se
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "val_loss" in r]
    peak = max(r["lr"] for r in rows if "lr" in r)
    assert len(evals) >= 5, evals  # 250-step intervals would have given one (step 0) or two
    assert peak == pytest.approx(6e-4, rel=0.05)  # the default lr, reached despite warmup_steps=100
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] >= 10**9
    # an explicit step limit still stops the run
    rc, so, se = cli("train", "--data", data, "--out", tmp_path / "b", *TINY, "--train.max_minutes=5",
                     "--train.max_steps=3", "--train.eval_every=0")
    assert rc == 0 and json.loads(so)["stopped"] == "max_steps" and json.loads(so)["step"] == 3


def test_best_dir_exists_even_when_no_evaluation_beats_step_0(tmp_path, data, one_thread):
    out = tmp_path / "run"
    # a learning rate far too high: every step makes the untrained model worse than at step 0
    rc, so, se = cli("train", "--data", data, "--out", out, *[a for a in TINY if "warmup" not in a],
                     "--train.max_steps=2", "--train.eval_every=1", "--optim.lr=3", "--optim.min_lr=3",
                     "--optim.warmup_steps=0", "--optim.schedule=constant", "--train.precision=fp32")
    assert rc == 0, se
    s = json.loads(so)
    assert s["best_step"] == 0 and (out / "best" / "config.json").is_file()
    assert s["best_value"] == s["best_val_loss"]
    rc, _, se = cli("eval", out / "best", "--data", data, "--max-batches", "1")
    assert rc == 0, se
