"""Distillation: the divergences against their definitions, zero loss for a student equal to its
teacher, the teacher outside the student's state, tokenizer mismatches refused before training,
the CLI end to end (a pruned student too), exact resume after SIGKILL and a time budget, and
DDP/FSDP2 under torchrun equal to one process."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from safetensors.torch import load_file
from train_helpers import ONE_THREAD, cli, make_char_data, one_thread, read_metrics  # noqa: F401

from scalelm.compress import distill as kd_mod
from scalelm.compress.distill import DistillLoss, KDStudent, divergence, kd_loss
from scalelm.config import KDConfig, ModelConfig
from scalelm.model.gpt import GPT
from scalelm.model.io import load_model_dir, save_model_dir
from scalelm.model.loss import IGNORE_INDEX, cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(800))
TINY = ["--train.micro_batch_size=4", "--train.eval_iters=2", "--train.log_every=1", "--optim.warmup_steps=2",
        "--log.progress=false", "--train.precision=fp32"]
LOSSES = ["forward_kl", "reverse_kl", "jsd"]


def teacher_cfg(vocab, **kw):
    return ModelConfig(**{**dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32), **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = make_char_data(root / "data", TEXT)
    from scalelm.data.loader import TokenData

    d = TokenData(data)
    torch.manual_seed(0)
    save_model_dir(GPT(teacher_cfg(d.vocab_size)), root / "teacher", d.tokenizer_json)
    return root, data


# ----------------------------------------------------------------------------- the losses

def test_divergences_match_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(10, 7, dtype=torch.float64), torch.randn(10, 7, dtype=torch.float64)
    for T in (1.0, 2.5):
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        fwd = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(t || s)
        rev = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)  # KL(s || t)
        m = (ls.exp() + lt.exp()).log() - torch.log(torch.tensor(2.0, dtype=torch.float64))
        jsd = 0.5 * F.kl_div(m, lt, log_target=True, reduction="none").sum(-1) + \
            0.5 * F.kl_div(m, ls, log_target=True, reduction="none").sum(-1)
        for kind, want in (("forward_kl", fwd), ("reverse_kl", rev), ("jsd", jsd)):
            assert torch.allclose(divergence(s, t, kind, T).double(), want, atol=1e-6), kind
    assert (divergence(s, t, "jsd") <= torch.log(torch.tensor(2.0)) + 1e-6).all()  # bounded by ln 2


@pytest.mark.parametrize("kind", LOSSES)
def test_chunked_kd_loss_equals_one_pass_with_its_gradient(kind, monkeypatch):
    torch.manual_seed(0)
    s = torch.randn(3, 5, 11, requires_grad=True)
    t = torch.randn(3, 5, 11)
    y = torch.randint(0, 11, (3, 5))
    y[0, :2] = IGNORE_INDEX  # ignored targets do not count
    valid = (y != IGNORE_INDEX).reshape(-1)
    want = divergence(s.reshape(-1, 11)[valid], t.reshape(-1, 11)[valid], kind, 2.0).mean()
    (g_want,) = torch.autograd.grad(want, s)
    monkeypatch.setitem(kd_mod.CHUNK_BYTES, "cpu", 4 * 11 * 4)  # 4 rows a chunk: 4 chunks, recomputed
    got = kd_loss(s, t, y, kind, 2.0)
    (g_got,) = torch.autograd.grad(got, s)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(g_got, g_want, atol=1e-6)


def test_loss_is_alpha_kd_times_t_squared_plus_the_rest_ce():
    torch.manual_seed(0)
    student, teacher = GPT(teacher_cfg(40, n_layer=1)), GPT(teacher_cfg(40))
    x, y = torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16))
    kd = KDConfig(loss="reverse_kl", temperature=2.0, alpha=0.3)
    got = DistillLoss(teacher, kd)(student, (x, y))
    s = student(x)[0]
    with torch.no_grad():
        t = teacher(x)[0]
    want = 0.3 * 4.0 * kd_loss(s, t, y, "reverse_kl", 2.0) + 0.7 * cross_entropy(s, y)
    assert torch.allclose(got, want, atol=1e-6)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    only_ce = DistillLoss(teacher, KDConfig(alpha=0.0))(student, (x, y))
    assert torch.allclose(only_ce, cross_entropy(s, y))


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("hidden", [0.0, 1.0])
def test_the_distillation_loss_is_zero_when_the_student_is_the_teacher(kind, hidden):
    torch.manual_seed(0)
    teacher = GPT(teacher_cfg(40))
    student = copy.deepcopy(teacher).train()
    if hidden:
        student = KDStudent(student, teacher.cfg.n_embd)  # identity projection: widths match
    x = torch.randint(0, 40, (2, 16))
    loss = DistillLoss(teacher, KDConfig(loss=kind, temperature=2.0, alpha=1.0, hidden=hidden))(student, (x, x))
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-5
    other = GPT(teacher_cfg(40, n_layer=1))
    assert DistillLoss(teacher, KDConfig(loss=kind, alpha=1.0))(other, (x, x)).item() > 1e-3


def test_hidden_term_is_the_mse_of_the_projected_student_states():
    torch.manual_seed(0)
    teacher, gpt = GPT(teacher_cfg(40)), GPT(teacher_cfg(40, n_embd=16, n_layer=1))
    student = KDStudent(gpt, 32)
    x, y = torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16))
    got = DistillLoss(teacher, KDConfig(alpha=0.0, hidden=0.5))(student, (x, y))
    with torch.no_grad():
        t_h = teacher.hidden_states(x)
    want = cross_entropy(gpt(x)[0], y) + 0.5 * F.mse_loss(student.proj(gpt.hidden_states(x)), t_h)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(student(x, y)[1], gpt(x, y)[1])  # validation sees the plain student


# ----------------------------------------------------------------------------- CLI

def distill(setup, out, *extra):
    root, data = setup
    return cli("distill", "--teacher", root / "teacher", "--data", data, "--out", out, *TINY, *extra)


def test_distill_cli_end_to_end(setup, tmp_path):
    root, data = setup
    out = tmp_path / "run"
    rc, so, se = distill(setup, out, "--model.n_layer=1", "--train.max_steps=6", "--train.eval_every=3",
                         "--kd.loss=jsd", "--kd.temperature=2", "--kd.alpha=0.7")
    assert rc == 0, se
    res = json.loads(so)
    assert res["step"] == 6 and res["teacher"].endswith("teacher") and res["best_val_loss"] is not None
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kd"] == {"loss": "jsd", "temperature": 2.0, "alpha": 0.7, "hidden": 0.0}
    assert cfg["model"]["n_layer"] == 1 and cfg["model"]["n_embd"] == 32  # the teacher's shape, overridden
    assert json.loads((out / "distill.json").read_text())["teacher"] == str((root / "teacher").resolve())
    # the teacher is in no checkpoint: weights and optimizer moments are the student's alone
    student = GPT(load_model_dir(out / "ckpt-00000006").cfg)
    ck = out / "ckpt-00000006"
    assert set(load_file(ck / "model.safetensors")) == set(student.state_dict()) - {"lm_head.weight"}
    moments = {k.rsplit("/", 1)[0] for k in load_file(ck / "optimizer.safetensors")}
    assert moments == {n for n, _ in student.named_parameters()}
    rc, so, se = cli("eval", out / "best", "--data", data, "--max-batches", "2")
    assert rc == 0, se
    # resuming needs no --teacher (the run records it) and continues the run
    rc, so, se = cli("distill", "--out", out, "--train.max_steps=8")
    assert rc == 0, se
    assert json.loads(so)["step"] == 8


def test_prune_then_distill_into_the_pruned_student(setup, tmp_path):
    root, data = setup
    rc, _, se = cli("prune", root / "teacher", "--method", "structured", "--n-layer", "1", "--ffn-dim", "64",
                    "--calib", data, "--calib-samples", "8", "--out", tmp_path / "small")
    assert rc == 0, se
    before = json.loads(cli("eval", tmp_path / "small", "--data", data, "--max-batches", "2")[1])["loss"]
    rc, so, se = distill(setup, tmp_path / "run", "--student", tmp_path / "small", "--train.max_steps=8",
                         "--train.eval_every=0", "--optim.lr=3e-3")
    assert rc == 0, se
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["intermediate_size"] == 64
    start = [r for r in read_metrics(tmp_path / "run") if "loss" in r][0]
    assert start["step"] == 1
    after = json.loads(cli("eval", tmp_path / "run", "--data", data, "--max-batches", "2")[1])["loss"]
    assert after < before  # training went somewhere from the pruned weights


def test_kd_hidden_trains_and_checkpoints_the_projection(setup, tmp_path):
    out = tmp_path / "run"
    rc, so, se = distill(setup, out, "--model.n_embd=16", "--model.n_layer=1", "--kd.hidden=1.0",
                         "--train.max_steps=4", "--train.save_every=2", "--train.eval_every=2")
    assert rc == 0, se
    ck = out / "ckpt-00000004"
    proj = load_file(ck / "kd_projection.safetensors")
    assert set(proj) == {"proj.weight"} and proj["proj.weight"].shape == (32, 16)
    first = load_file(out / "ckpt-00000002" / "kd_projection.safetensors")["proj.weight"]
    assert not torch.equal(first, proj["proj.weight"])  # it trains
    assert not (out / "best" / "kd_projection.safetensors").exists()  # best/ is the plain student
    assert {k.rsplit("/", 1)[0] for k in load_file(ck / "optimizer.safetensors")} >= {"proj.weight"}
    assert load_model_dir(ck).cfg.n_embd == 16


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]


@pytest.mark.parametrize("extra", [[], ["--kd.hidden=0.5", "--model.n_embd=16"]], ids=["logits", "hidden"])
def test_a_time_budget_stops_and_the_run_resumes_exactly(setup, tmp_path, extra):
    common = ["--model.n_layer=1", "--model.dropout=0.1", "--train.max_steps=5", "--train.eval_every=0",
              "--kd.temperature=2", *extra]
    rc, _, se = distill(setup, tmp_path / "ref", *common)
    assert rc == 0, se
    rc, so, se = distill(setup, tmp_path / "cut", *common, "--train.max_minutes=1e-9")
    assert rc == 0 and json.loads(so)["stopped"] == "time_budget" and json.loads(so)["step"] < 5, se
    rc, so, se = distill(setup, tmp_path / "cut", *common, "--train.max_minutes=1000")
    assert rc == 0 and json.loads(so)["step"] == 5, se
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "ref")  # bitwise


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_loss_curve(setup, tmp_path):
    root, data = setup
    steps = 40
    args = ["distill", "--teacher", root / "teacher", "--data", data, *TINY, "--model.n_layer=1",
            "--model.dropout=0.1", f"--train.max_steps={steps}", "--train.save_every=5", "--train.eval_every=10",
            "--kd.loss=reverse_kl", "--kd.alpha=0.8"]
    run_cli(*args, "--out", tmp_path / "ref", env=ONE_THREAD)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "scalelm", *map(str, args), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    t0 = time.time()
    while time.time() - t0 < 240:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        latest = out / "latest"
        if latest.is_file() and int(latest.read_text().split("-")[1]) >= 10:
            logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
                      if x.endswith("}") and '"loss"' in x]
            if logged and logged[-1] >= 12:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_cli(*args, "--out", out, env=ONE_THREAD)
    assert _losses(out) == _losses(tmp_path / "ref") and len(_losses(out)) == steps
    vals = [(r["step"], r["val_loss"]) for r in read_metrics(out) if "val_loss" in r]
    assert vals == [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "ref") if "val_loss" in r]


# ----------------------------------------------------------------------------- refusals

def test_a_tokenizer_mismatch_is_refused_before_training(setup, tmp_path):
    root, data = setup
    other = make_char_data(tmp_path / "other", "ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\n" * 100)
    from scalelm.data.loader import TokenData

    od = TokenData(other)
    save_model_dir(GPT(teacher_cfg(od.vocab_size, n_layer=1)), tmp_path / "student", od.tokenizer_json)
    rc, _, se = distill(setup, tmp_path / "run", "--student", tmp_path / "student")
    assert rc == 2 and "do not share a tokenizer" in se, se
    assert str(root / "teacher") in se and str(tmp_path / "student") in se  # both named
    assert f"{TokenData(data).vocab_size} tokens" in se and f"{od.vocab_size} tokens" in se
    assert not (tmp_path / "run").exists()  # nothing started
    # a new student on data of another tokenizer: the same refusal, naming the data
    rc, _, se = cli("distill", "--teacher", root / "teacher", "--data", other, "--out", tmp_path / "run2", *TINY)
    assert rc == 2 and "do not share a tokenizer" in se and str(other) in se, se
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model.vocab_size=100"], "do not share a tokenizer"),
    (["--kd.temperature=0"], "kd.temperature must be positive"),
    (["--kd.alpha=1.5"], "kd.alpha must be in [0, 1]"),
    (["--model.block_size=64"], "exceeds the teacher's"),
    (["--kd.loss=cosine"], "kd.loss"),
    (["--lora.r=4"], "--lora.r is not supported"),
])
def test_bad_settings_are_clear_errors(setup, tmp_path, extra, message):
    rc, _, se = distill(setup, tmp_path / "run", *extra)
    assert rc == 2 and message in se, se


def test_student_and_preset_together_and_no_teacher(setup, tmp_path):
    root, data = setup
    rc, _, se = distill(setup, tmp_path / "run", "--student", root / "teacher", "--preset", "baby")
    assert rc == 2 and "give one" in se
    rc, _, se = cli("distill", "--data", data, "--out", tmp_path / "run")
    assert rc == 2 and "--teacher" in se


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--parallel.dp_shard=2"], ["--parallel.dp_replicate=2", "--parallel.dp_shard=1",
                                                                 "--kd.hidden=0.5", "--model.n_embd=16"]],
                         ids=["fsdp2", "ddp-hidden"])
def test_torchrun_distillation_equals_one_process(setup, tmp_path, layout):
    from dist_launch import ROOT, torchrun_cmd, worker_env

    root, data = setup
    common = ["distill", "--teacher", root / "teacher", "--data", data, *TINY, "--model.n_layer=1",
              "--train.micro_batch_size=2", "--train.global_batch_size=8", "--train.max_steps=4",
              "--train.eval_every=2", "--train.save_every=2", "--optim.schedule=constant", *layout[1:]]
    run_cli(*common, "--out", tmp_path / "one", env=ONE_THREAD)
    p = subprocess.run(torchrun_cmd(2, "-m", "scalelm", *common, layout[0], "--out", tmp_path / "two"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
    assert p.returncode == 0, p.stderr[-6000:]
    one, two = dict(_losses(tmp_path / "one")), dict(_losses(tmp_path / "two"))
    assert sorted(two) == [1, 2, 3, 4] and all(abs(one[k] - two[k]) < 1e-5 for k in one), (one, two)
    # the sharded checkpoint is a model (eval consolidates it, the hidden-state projection left out); so is best/
    for target in (tmp_path / "two", tmp_path / "two" / "best"):
        rc, so, se = cli("eval", target, "--data", data, "--max-batches", "2")
        assert rc == 0, se
