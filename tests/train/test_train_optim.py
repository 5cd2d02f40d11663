"""Optimizer groups, LR schedules, batch geometry and gradient-accumulation equivalence."""

import math

import pytest
import torch
from train_helpers import one_thread, shakespeare_data  # noqa: F401 (fixture)

from scalelm.config import Config, ConfigError, ModelConfig, OptimConfig
from scalelm.data.loader import TokenData
from scalelm.model import GPT
from scalelm.precision import resolve_precision
from scalelm.train.optim import build_optimizer, lr_at, param_groups
from scalelm.train.trainer import Trainer, batch_geometry


def test_param_groups_decay_only_linear_weights():
    m = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert decay and all(n.endswith("proj.weight") or n.endswith(("up.weight", "down.weight")) for n in decay)
    assert {"tok_emb.weight", "pos_emb.weight"} <= no_decay  # embeddings (and the tied head)
    assert all(("norm" in n or n.endswith("bias") or "emb" in n) for n in no_decay)
    assert len(decay) + len(no_decay) == len(list(m.parameters()))  # the tied head counted once


def test_param_groups_untied_head_is_decayed_and_wrappers_do_not_matter():
    m = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False,
                        bias=False, norm="rmsnorm"))
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    m.blocks["0"] = checkpoint_wrapper(m.blocks["0"])
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    assert any(p is m.lm_head.weight for p in groups["decay"]["params"])
    assert any(p is m.tok_emb.weight for p in groups["no_decay"]["params"])
    opt = build_optimizer(m, OptimConfig())
    assert opt.defaults["fused"] or opt.defaults["foreach"]


def test_schedules():
    c = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(s, c, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warmup
    w = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    wl = [lr_at(s, w, 100) for s in range(100)]
    assert wl[5] == wl[79] == 1.0 and wl[80] == 1.0 and wl[90] == pytest.approx(0.5) and wl[99] < 0.06
    k = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, k, 10) for s in range(20)} == {0.5}


def test_batch_geometry():
    cfg = Config()
    cfg.model.block_size = 64
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = 4, 3
    assert batch_geometry(cfg, 1) == (4, 3)
    cfg.train.global_batch_size = 32
    assert batch_geometry(cfg, 1) == (4, 8) and batch_geometry(cfg, 2) == (4, 4)
    cfg.train.global_batch_size, cfg.train.global_batch_tokens = None, 64 * 16
    assert batch_geometry(cfg, 4) == (4, 1)
    cfg.train.global_batch_tokens = 1000
    with pytest.raises(ConfigError, match="multiple of block_size"):
        batch_geometry(cfg, 1)
    cfg.train.global_batch_tokens, cfg.train.global_batch_size = None, 30
    with pytest.raises(ConfigError, match="use 28 or 32"):
        batch_geometry(cfg, 1)


def test_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
    with pytest.raises(ConfigError, match="bf16"):
        resolve_precision("fp16", cpu)


def _trainer(tmp_path, data, micro, accum, **train):
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=data.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.precision = micro, accum, "fp32"
    cfg.train.device, cfg.train.eval_every, cfg.log.progress = "cpu", 0, False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return Trainer(cfg, data, tmp_path / f"run{micro}x{accum}")


def test_accumulation_equals_one_big_batch(tmp_path, shared_data, one_thread):
    data = TokenData(shakespeare_data(shared_data, tmp_path / "d", chars=20_000))
    big = _trainer(tmp_path, data, 8, 1)
    acc = _trainer(tmp_path, data, 2, 4)
    glob = _trainer(tmp_path, data, 2, 1, global_batch_size=8)
    assert glob.accum == 4
    # the same windows make up each global batch
    xb = big.batches.next_batch()[0]
    xa = torch.cat([acc.batches.next_batch()[0] for _ in range(4)])
    assert torch.equal(xb, xa)
    big.batches.load_state_dict({**big.batches.state_dict(), "step": 0, "micro": 0})
    acc.batches.load_state_dict({**acc.batches.state_dict(), "step": 0, "micro": 0})
    # one step: equal gradients
    lb = big.forward_backward([big.batches.next_batch()])
    la = acc.forward_backward([acc.batches.next_batch() for _ in range(4)])
    assert float(lb) == pytest.approx(float(la), abs=1e-6)
    for (n, pb), pa in zip(big.raw_model.named_parameters(), acc.raw_model.parameters()):
        assert torch.allclose(pb.grad, pa.grad, atol=1e-6, rtol=1e-4), n
    # whole optimizer steps through the real loop: equal loss curves
    for t in (big, acc, glob):
        t.optimizer.zero_grad(set_to_none=True)
        t.batches.load_state_dict({**t.batches.state_dict(), "step": 0, "micro": 0})
    curves = [[float(t.train_step()[0]) for _ in range(4)] for t in (big, acc, glob)]
    assert curves[0] == pytest.approx(curves[1], abs=1e-5) and curves[1] == curves[2]
    assert not math.isclose(curves[0][0], curves[0][-1])  # it did train


def test_boolean_overrides_accept_lowercase():
    from scalelm.config import resolve

    c = resolve(overrides=["--log.progress=false", "--train.compile", "true", "--train.activation_checkpointing=True"])
    assert (c.log.progress, c.train.compile, c.train.activation_checkpointing) == (False, True, True)
    with pytest.raises(ConfigError):
        resolve(overrides=["--log.progress=maybe"])
