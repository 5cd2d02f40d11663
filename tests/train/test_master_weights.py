import pytest
import torch
from train_helpers import one_thread  # noqa: F401 (fixture)

from scalelm.config import ModelConfig
from scalelm.model import GPT
from scalelm.train.master_weights import MasterWeights

CFG = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


def _train(model, params, steps, before=None, after=None, autocast=False):
    torch.manual_seed(1)
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    x = torch.randint(0, 97, (4, 16))  # one batch, memorised
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, x.roll(-1, 1))[1]
        loss.backward()
        if before:
            before()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after:
            after()
        losses.append(loss.item())
    return losses


def test_bf16_weights_fp32_masters_track_fp32_training():
    torch.manual_seed(0)
    ref = GPT(CFG)
    model = GPT(CFG)
    model.load_state_dict(ref.state_dict())
    mw = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in mw.params)
    assert len(mw.params) == len({id(p) for p in ref.parameters()})  # the tied head counted once
    assert model.lm_head.weight is model.tok_emb.weight
    fp32 = _train(ref, ref.parameters(), 30)
    low = _train(model, mw.params, 30, mw.grads_to_master, mw.master_to_model)
    assert low[-1] < low[0] - 0.5  # it learns
    assert abs(low[-1] - fp32[-1]) < 0.1  # and like fp32 does
    for m, p in zip(mw.params, model.parameters()):  # the model holds the rounded masters
        torch.testing.assert_close(p, m.to(torch.bfloat16), rtol=0, atol=0)


def test_grads_accumulate_in_fp32():
    model = GPT(CFG)
    mw = MasterWeights(model)
    x = torch.randint(0, 97, (2, 8))
    for _ in range(2):
        model(x, x)[1].backward()
        mw.grads_to_master()
    assert all(p.grad is None for p in model.parameters())
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in mw.params)


# ----------------------------------------------------------------------------- in the trainer

def test_trainer_master_weights_learn_resume_exactly_and_save_fp32(tmp_path, shared_data, one_thread):
    """`--train.master_weights=true`: learns like bf16 autocast, a resumed run continues bit for bit,
    and checkpoints hold the fp32 masters (not the bf16 weights the model computes with)."""
    from safetensors.torch import load_file
    from train_helpers import TINY, cli, read_metrics, shakespeare_data

    data = shakespeare_data(shared_data, tmp_path / "data", chars=30_000)
    args = [*TINY, "--train.max_steps=8", "--train.save_every=4", "--train.eval_every=4", "--train.precision=bf16",
            "--train.grad_accum_steps=2", "--optim.lr=3e-3"]
    a, b, ref = tmp_path / "a", tmp_path / "b", tmp_path / "autocast"
    rc, _, se = cli("train", "--data", data, "--out", a, *args, "--train.master_weights=true")
    assert rc == 0, se
    rc, _, se = cli("train", "--data", data, "--out", b, *args, "--train.master_weights=true",
                    "--resume", a / "ckpt-00000004")
    assert rc == 0, se
    la = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(a) if "loss" in r]
    lb = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(b) if "loss" in r]
    assert lb == la[4:]
    assert cli("train", "--data", data, "--out", ref, *args, "--train.master_weights=false")[0] == 0  # autocast
    va = [r["val_loss"] for r in read_metrics(a) if "val_loss" in r]
    vr = [r["val_loss"] for r in read_metrics(ref) if "val_loss" in r]
    assert va[-1] < va[0] - 0.3 and abs(va[-1] - vr[-1]) < 0.05, (va, vr)  # it learns, as autocast does
    w = load_file(str(a / "ckpt-00000008" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in w.values())
    emb = w["tok_emb.weight"]
    assert not torch.equal(emb, emb.to(torch.bfloat16).float())  # full-precision masters were saved
    # the wrong precision, or a distributed layout, is refused before any work
    rc, _, se = cli("train", "--data", data, "--out", tmp_path / "c", *args, "--train.master_weights=true",
                    "--train.precision=fp32")
    assert rc == 2 and "needs --train.precision=bf16" in se and "Traceback" not in se


# ----------------------------------------------------------------------------- on by default where it applies

@pytest.fixture(scope="module")
def tiny_data(shared_data, tmp_path_factory):
    from train_helpers import shakespeare_data

    return shakespeare_data(shared_data, tmp_path_factory.mktemp("mw") / "data", chars=20_000)


def _trainer(tmp_path, data, *overrides, base_dir=None):
    """A Trainer on a tiny GPT (built, not run): the CPU, whatever the machine has."""
    from train_helpers import TINY

    from scalelm.config import resolve
    from scalelm.data.loader import TokenData
    from scalelm.train.trainer import Trainer

    d = TokenData(data)
    cfg = resolve(overrides=[*TINY, f"--model.vocab_size={d.vocab_size}", "--train.device=cpu", *overrides])
    return Trainer(cfg, d, tmp_path / "run", base_dir=base_dir)


def _optimizer_dtypes(trainer):
    return {p.dtype for g in trainer.optimizer.param_groups for p in g["params"]}


def test_default_is_auto_and_parses_from_the_command_line_and_toml(tmp_path):
    from scalelm.config import Config, config_from_dict, load_toml, resolve

    assert Config().train.master_weights is None
    for word, want in (("true", True), ("false", False), ("True", True), ("False", False), ("auto", None)):
        assert resolve(overrides=[f"--train.master_weights={word}"]).train.master_weights is want
        assert resolve(overrides=["--train.master_weights", word]).train.master_weights is want
    for value, want in ((False, False), (True, True), (None, None), ("auto", None)):  # saved JSON, TOML
        assert config_from_dict({"train": {"master_weights": value}}).train.master_weights is want
    (tmp_path / "c.toml").write_text("[train]\nmaster_weights = false\n")
    assert load_toml(tmp_path / "c.toml").train.master_weights is False


def test_auto_on_for_bf16_on_a_cpu(tmp_path, tiny_data, one_thread):
    tr = _trainer(tmp_path, tiny_data, "--train.precision=bf16")
    assert tr.master is not None
    assert {p.dtype for p in tr.raw_model.parameters()} == {torch.bfloat16}  # the model computes in bf16
    assert _optimizer_dtypes(tr) == {torch.float32}  # AdamW updates the fp32 masters
    assert tr.autocast().__class__ is not torch.autocast  # nothing to cast


def test_false_keeps_fp32_weights_with_autocast(tmp_path, tiny_data, one_thread):
    tr = _trainer(tmp_path, tiny_data, "--train.precision=bf16", "--train.master_weights=false")
    assert tr.master is None
    assert {p.dtype for p in tr.raw_model.parameters()} == {torch.float32}
    assert _optimizer_dtypes(tr) == {torch.float32}
    with tr.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_auto_off_for_fp32_and_for_lora(tmp_path, tiny_data, one_thread):
    tr = _trainer(tmp_path / "fp32", tiny_data, "--train.precision=fp32")
    assert tr.master is None and {p.dtype for p in tr.raw_model.parameters()} == {torch.float32}
    base = tmp_path / "base"  # a model directory for the adapters to adapt
    tr.model_io.save(tr.raw_model, tr.raw_model.state_dict(), base, tr.data.tokenizer_json, {})
    tr = _trainer(tmp_path / "lora", tiny_data, "--train.precision=bf16", "--lora.r=2", base_dir=base)
    assert tr.master is None and {p.dtype for p in tr.raw_model.parameters()} == {torch.float32}
    with tr.autocast():
        assert torch.is_autocast_enabled("cpu")
    tr = _trainer(tmp_path / "lora-on", tiny_data, "--train.precision=bf16", "--lora.r=2", "--train.master_weights=true",
                  base_dir=base)
    assert tr.master is not None  # asked for: LoRA trains with it (tests/lora/test_lora.py)


def test_the_summary_says_which_and_a_saved_choice_resumes(tmp_path, tiny_data, one_thread):
    """The run's summary records the decision; a run saved with `false` (as every run before the
    default changed) resumes with it off, and an auto run's saved null resumes on again."""
    import json

    from train_helpers import TINY, cli

    args = [*TINY, "--train.max_steps=2", "--train.eval_every=0", "--train.precision=bf16", "--train.device=cpu"]

    def run(out, *extra):
        rc, so, se = cli("train", "--data", tiny_data, "--out", out, *args, *extra)
        assert rc == 0, se
        return json.loads(so.strip().splitlines()[-1]), se

    auto, off = tmp_path / "auto", tmp_path / "off"
    summary, se = run(auto)
    assert summary["master_weights"] is True and "bf16 weights, fp32 masters" in se
    assert json.loads((auto / "config.json").read_text())["train"]["master_weights"] is None
    summary, se = run(off, "--train.master_weights=false")
    assert summary["master_weights"] is False and "bf16 autocast" in se
    assert json.loads((off / "config.json").read_text())["train"]["master_weights"] is False
    for out, want in ((auto, True), (off, False)):  # resumed with the saved config only
        summary, se = run(out, "--train.max_steps=3")
        assert summary["step"] == 3 and summary["master_weights"] is want


@pytest.mark.distributed
def test_a_torchrun_bf16_checkpoint_resumes_in_one_process_into_the_masters(tmp_path, tiny_data, one_thread):
    """FSDP2's sharded checkpoint of a bf16 run, resumed by one process (auto: master weights on):
    DCP fills the fp32 masters and their AdamW state, and the bf16 weights are those rounded."""
    import subprocess

    from dist_launch import ROOT, torchrun_cmd, worker_env
    from train_helpers import TINY, cli

    from scalelm.model.io import load_model_dir
    from scalelm.train.trainer import Trainer

    args = [*TINY, "--train.precision=bf16", "--train.device=cpu", "--train.eval_every=0",
            "--train.global_batch_size=8"]
    run = tmp_path / "run"
    p = subprocess.run(torchrun_cmd(2, "-m", "scalelm", "train", "--data", tiny_data, "--out", run, *args,
                                    "--train.max_steps=2"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
    assert p.returncode == 0, p.stderr[-4000:]
    ckpt = run / "ckpt-00000002"
    saved = load_model_dir(ckpt).state_dict()  # consolidated from the shards, fp32

    tr = _trainer(tmp_path / "one", tiny_data, *args, "--train.max_steps=3")
    tr.load_checkpoint(ckpt)
    assert tr.master is not None and tr.step == 2
    with tr._full_precision():
        for name, w in tr.raw_model.state_dict().items():
            assert w.dtype == torch.float32 and torch.equal(w, saved[name]), name
    for name, w in tr.raw_model.state_dict().items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, saved[name].to(torch.bfloat16)), name
    assert all(tr.optimizer.state[m]["exp_avg"].abs().sum() > 0 for m in tr.master.params)
    rc, so, se = cli("train", "--data", tiny_data, "--out", run, *args, "--train.max_steps=3")
    assert rc == 0 and '"master_weights": true' in so, se
