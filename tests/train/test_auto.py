"""``--preset auto``: the data-constrained law, the choice in both regimes, the CLI end to end."""

import json

import pytest
import torch

from conftest import run_cli
from scalelm.config import ConfigError, resolve
from scalelm.train import auto


def test_effective_tokens_is_muennighoff_decay():
    U = 1e6
    assert auto.effective_tokens(5e5, U) == 5e5  # within one epoch: every token counts
    worth = [auto.effective_tokens(e * U, U) for e in (1, 2, 4, 16, 64, 1000)]
    assert worth == sorted(worth) and worth[0] == U
    assert worth[1] == pytest.approx(2 * U, rel=0.04)  # a second epoch is worth almost a fresh one
    assert worth[-1] <= U * (1 + auto.R_STAR)  # repeats saturate
    assert auto.effective_tokens(1000 * U, U) < 1.02 * auto.effective_tokens(64 * U, U)


def test_dropout_rises_with_the_epochs():
    assert auto.dropout_for(1.0) == 0.0 and auto.dropout_for(1.5) == 0.0
    assert 0 < auto.dropout_for(3) < auto.dropout_for(8) < auto.dropout_for(16) <= 0.2
    assert auto.dropout_for(1e6) == 0.2


class FakeData:
    """TokenData's face: ``tokens(split)``, ``splits``."""

    def __init__(self, train: int, val: int = 100_000):
        import numpy as np

        self._n = {"train": train, "val": val}
        self.np = np

    @property
    def splits(self):
        return list(self._n)

    def tokens(self, split):
        return self.np.zeros(self._n[split], dtype=self.np.uint16)


def flop_timer(cfg, model_cfg, micro_batch):
    """A machine that runs 20 GFLOP/s exactly (no timing in tests)."""
    from scalelm.model.gpt import flops_per_token

    return micro_batch * model_cfg.block_size * flops_per_token(model_cfg) / 20e9


def chosen(train_tokens: int, minutes: float = 10, extra=()):
    ov = [f"--train.max_minutes={minutes}", "--model.vocab_size=4096", *extra]
    cfg = resolve(overrides=ov)
    return auto.choose(cfg, FakeData(train_tokens), ov, log=lambda s: None, timer=flop_timer)


def test_choice_in_both_regimes():
    big_cfg, big = chosen(10**9)  # far more data than 10 minutes can read
    small_cfg, small = chosen(200_000)  # a small corpus read many times
    assert big["regime"] == "compute-constrained" and small["regime"] == "data-constrained"
    assert big_cfg.model.dropout == 0.0 and small_cfg.model.dropout > 0.0
    assert small_cfg.model.n_embd <= big_cfg.model.n_embd  # the data-constrained model is no bigger
    for cfg in (big_cfg, small_cfg):
        assert cfg.train.early_stop_patience == auto.PATIENCE and cfg.optim.schedule == "cosine"
        assert cfg.train.max_minutes <= 10 and cfg.model.n_embd % auto.HEAD_DIM == 0
    # the chosen one is the lowest prediction of the survey, and the survey went past it
    losses = {c["shape"]: c["loss"] for c in small["candidates"]}
    assert small["chosen"] == min(losses, key=losses.get) and list(losses)[-1] != small["chosen"]


def test_more_minutes_buy_a_bigger_model():
    short, _ = chosen(10**9, minutes=1)
    long, _ = chosen(10**9, minutes=100)
    assert long.model.n_embd > short.model.n_embd


def test_the_users_keys_win():
    cfg, rec = chosen(200_000, extra=["--optim.lr=3e-4", "--model.dropout=0.0", "--train.global_batch_size=32"])
    assert cfg.optim.lr == 3e-4 and cfg.model.dropout == 0.0 and cfg.train.global_batch_size == 32
    assert "optim.lr" in rec["kept_from_command_line"]


def test_a_budget_is_required():
    cfg = resolve(overrides=["--model.vocab_size=4096"])
    with pytest.raises(ConfigError, match="max_minutes"):
        auto.choose(cfg, FakeData(10_000), [], log=lambda s: None, timer=flop_timer)


@pytest.mark.slow
def test_cli_trains_records_and_resumes(shared_data, tmp_path):
    from scalelm.data.prepare import prepare

    data = tmp_path / "data"
    prepare(str(shared_data / "tinyshakespeare" / "input.txt"), str(data), tokenizer="char", progress=False)
    out = tmp_path / "run"
    p = run_cli("train", "--preset", "auto", "--data", data, "--out", out, "--train.max_minutes=0.15",
                env={"OMP_NUM_THREADS": "1"})
    rec = json.loads((out / "auto.json").read_text())
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["n_layer"] == rec["config"]["model"]["n_layer"] and "auto: chose" in p.stderr
    assert summary["best_val_loss"] is not None and summary["best_val_loss"] < summary["initial_val_loss"]
    # again into the same run: no new survey, the recorded recipe
    p2 = run_cli("train", "--preset", "auto", "--data", data, "--out", out, "--train.max_minutes=0.2",
                 env={"OMP_NUM_THREADS": "1"})
    assert "recorded" in p2.stderr and "timing candidates" not in p2.stderr
    bad = run_cli("train", "--preset", "auto", "--data", data, "--out", tmp_path / "r2", check=False)
    assert bad.returncode == 2 and "--train.max_minutes" in bad.stderr


@pytest.mark.parametrize("precision,master,expect", [("bf16", None, True), ("bf16", False, False),
                                                     ("fp32", None, False)])
def test_the_probe_times_the_weights_the_trainer_will_use(monkeypatch, precision, master, expect):
    """bf16 weights with fp32 masters are the default on a bf16 CPU: the probe must time those."""
    from scalelm.train import master_weights

    built = []

    class Spy(master_weights.MasterWeights):
        def __init__(self, model, *a, **k):
            built.append(model)
            super().__init__(model, *a, **k)

    monkeypatch.setattr(master_weights, "MasterWeights", Spy)
    cfg = resolve(overrides=[f"--train.precision={precision}", "--train.device=cpu", "--model.vocab_size=64",
                             "--model.block_size=16"] + ([f"--train.master_weights={str(master).lower()}"]
                                                         if master is not None else []))
    seconds = auto.time_step(cfg, auto.shape_config(cfg.model, 64), micro_batch=2)
    assert seconds > 0 and bool(built) == expect
    if expect:
        assert next(built[0].parameters()).dtype == torch.bfloat16
