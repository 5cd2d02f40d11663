"""The training step as a piece of its own (``scalelm.train.step``): the probes take the Trainer's
step bit for bit; and the typed protocols the Trainer reads its arguments through."""

import json

import pytest
import torch
import torch.nn as nn
from train_helpers import TINY, one_thread, shakespeare_data  # noqa: F401 (fixture)

from scalelm.config import resolve
from scalelm.data.loader import TokenData
from scalelm.model import GPT
from scalelm.train.model_io import ModelIO
from scalelm.train.probe import probe_step, time_steps
from scalelm.train.protocols import CountedBatches, DataDir, backbone, wraps_gpt
from scalelm.train.step import TrainStep
from scalelm.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    return TokenData(shakespeare_data(shared_data, tmp_path_factory.mktemp("step") / "data", chars=20_000))


def _cfg(data, *overrides):
    return resolve(overrides=[*TINY, f"--model.vocab_size={data.vocab_size}", "--train.device=cpu",
                              "--train.eval_every=0", "--train.grad_accum_steps=2", *overrides])


@pytest.mark.parametrize("precision,master", [("fp32", False), ("bf16", True)])
def test_the_probe_step_is_the_trainers_step_bit_for_bit(tmp_path, data, one_thread, precision, master):
    """Same model, batches and config: the probe's step and the Trainer's give identical losses,
    gradient norms and weights (fp32, and bf16 weights with fp32 masters, the default there)."""
    cfg = _cfg(data, f"--train.precision={precision}")
    trainer = Trainer(cfg, data, tmp_path / "run")
    assert (trainer.master is not None) is master and trainer.accum == 2
    torch.manual_seed(cfg.train.seed)  # the Trainer's initial weights
    probe = probe_step(cfg, GPT(cfg.model))
    assert (probe.master is not None) is master and probe.precision == trainer.precision
    start = [p.detach().clone() for p in probe.raw_model.parameters()]
    for step in range(3):
        state = trainer.batches.state_dict()
        micro_batches = [trainer.batches.next_batch() for _ in range(trainer.accum)]
        trainer.batches.load_state_dict(state)  # the trainer reads the same batches again
        loss, norm = trainer.train_step()
        p_loss, p_norm = probe(micro_batches)
        assert torch.equal(loss, p_loss) and torch.equal(norm, p_norm), step
    for (name, a), b in zip(trainer.raw_model.named_parameters(), probe.raw_model.parameters()):
        assert a.dtype == b.dtype == (torch.bfloat16 if master else torch.float32)
        assert torch.equal(a, b), name
    assert any(not torch.equal(b, b0) for b, b0 in zip(probe.raw_model.parameters(), start))  # it trained
    if master:
        for a, b in zip(trainer.master.params, probe.master.params):
            assert torch.equal(a, b)


def test_time_steps_times_the_configs_step(data, one_thread, monkeypatch):
    """The timer builds the step of its config (here: accumulation, master weights) and leaves the
    caller's random state alone."""
    calls = []
    real = TrainStep.__call__

    def spy(self, micro_batches):
        calls.append((len(micro_batches), self.master is not None))
        return real(self, micro_batches)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    cfg = _cfg(data, "--train.precision=bf16")
    before = torch.random.get_rng_state()
    assert time_steps(cfg, micro_batch=2, accum=3, repeats=2) > 0
    assert calls == [(3, True)] * 3  # a warm-up and two timed steps
    assert torch.equal(torch.random.get_rng_state(), before)


# ----------------------------------------------------------------------------- the protocols

class Windows:
    """LM windows that do not count tokens: a plain ``Batches``."""

    def __init__(self, data, B, T):
        self.x = torch.as_tensor(data.tokens("train")[: B * (T + 1)].astype("int64")).view(B, T + 1)
        self.step = 0

    def next_batch(self):
        self.step += 1
        return self.x[:, :-1], self.x[:, 1:]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


class CountedWindows(Windows):
    """The same windows, counting what they served (as padded batches do)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.tokens = self.supervised_tokens = 0

    def next_batch(self):
        x, y = super().next_batch()
        self.tokens += x.numel()
        self.supervised_tokens += x.numel() // 2
        return x, y


@pytest.mark.parametrize("counted", [False, True])
def test_batches_with_and_without_token_counts(tmp_path, data, one_thread, counted):
    cfg = _cfg(data, "--train.max_steps=2", "--train.precision=fp32")
    batches = (CountedWindows if counted else Windows)(data, 4, 32)
    assert isinstance(batches, CountedBatches) is counted
    assert not isinstance(batches.x, CountedBatches)
    trainer = Trainer(cfg, data, tmp_path / "run", batches=batches)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 2
    if counted:  # 2 steps x 2 micro-batches x 4 x 32 tokens, half of them supervised
        assert train[-1]["real_tokens"] == 512 and train[-1]["supervised_tokens"] == 256
        assert train[-1]["real_tokens_per_s"] > 0
    else:
        assert all("real_tokens" not in r and "supervised_tokens" not in r for r in train)


class Head(nn.Module):
    """A task model around a GPT (as a classifier or a distillation student)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.head = gpt, nn.Linear(gpt.cfg.n_embd, 3)

    def forward(self, idx, targets=None):
        return self.gpt(idx, targets)


def test_a_model_wrapping_a_gpt_is_recognised(tmp_path, data, one_thread):
    cfg = _cfg(data, "--train.precision=fp32")
    gpt = GPT(cfg.model)
    wrapped = Head(gpt)
    assert wraps_gpt(wrapped) and backbone(wrapped) is gpt
    assert not wraps_gpt(gpt) and backbone(gpt) is gpt
    assert not wraps_gpt(nn.Sequential(nn.Linear(2, 2)))
    from scalelm.tasks.classify.model import Classifier

    assert backbone(Classifier(gpt, 2, "last")) is gpt
    trainer = Trainer(cfg, data, tmp_path / "run", model=wrapped)
    assert trainer.gpt is gpt and trainer.raw_model is wrapped
    # the head trains with the GPT: AdamW holds both
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in wrapped.parameters()} <= held


def test_data_dir_and_plain_model_files():
    class TokenizerOnly:
        tokenizer_json, vocab_size = "{}", 10

    assert not isinstance(TokenizerOnly(), DataDir)

    class Files(ModelIO):
        pass

    class PlainToo(ModelIO):
        plain_lm = True

    assert ModelIO().plain_lm and not Files().plain_lm and PlainToo().plain_lm


def test_a_data_dir_is_recognised(data):
    assert isinstance(data, DataDir)


def test_the_progress_line_shows_the_metrics_asked_for(tmp_path, data, one_thread, capsys):
    cfg = _cfg(data, "--train.precision=fp32", "--train.max_steps=1", "--train.eval_every=1")
    Trainer(cfg, data, tmp_path / "a").fit()
    assert "step 0: loss" in capsys.readouterr().err  # the default: loss and bits per byte
    Trainer(cfg, data, tmp_path / "b", show_metrics=("val_bits_per_byte",)).fit()
    err = capsys.readouterr().err
    assert "step 0: bits per byte" in err and "step 0: loss" not in err
