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
    assert cli("train", "--data", data, "--out", ref, *args)[0] == 0
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
