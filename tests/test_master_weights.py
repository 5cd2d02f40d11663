import torch

from scalelm.config import ModelConfig
from scalelm.master_weights import MasterWeights
from scalelm.model import GPT

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
