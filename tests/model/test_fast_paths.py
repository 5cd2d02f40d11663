"""The model's fast paths compute what the plain paths compute."""

import pytest
import torch

import scalelm.model.gpt as M
from scalelm.config import ModelConfig

LLAMA = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                    pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def _loss_and_grads(model, idx, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_upcast_path(dtype, monkeypatch):
    torch.manual_seed(0)
    norm = M.RMSNorm(48)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(48))
    x = (3 * torch.randn(4, 7, 48)).to(dtype).requires_grad_()
    g = torch.randn(4, 7, 48).to(dtype)
    fast = norm(x)
    fast.backward(g)
    gx, gw = x.grad, norm.weight.grad
    x.grad = norm.weight.grad = None
    monkeypatch.setattr(M, "_FUSED_RMS", None)
    ref = norm(x)
    ref.backward(g)
    assert fast.dtype == ref.dtype == dtype
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, norm.weight.grad)


def _rel_errors(grads, ref):
    return [((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref)]


def test_model_fast_paths_match_plain_paths(monkeypatch):
    torch.manual_seed(0)
    model = M.GPT(LLAMA)
    idx = torch.randint(0, 97, (3, 16))
    fp32 = _loss_and_grads(model, idx, False)
    fast_bf16 = _loss_and_grads(model, idx, True)
    monkeypatch.setattr(M, "_FUSED_RMS", None)
    monkeypatch.setattr(M, "_autocast_once", lambda h: h)  # each linear casts for itself
    plain = _loss_and_grads(model, idx, False)
    plain_bf16 = _loss_and_grads(model, idx, True)
    for a, b in zip(fp32, plain):  # fp32: the same numbers
        torch.testing.assert_close(a, b)
    # bf16 forward: bit-identical (casting once or per linear gives the same bf16 values)
    torch.testing.assert_close(fast_bf16[0], plain_bf16[0], rtol=0, atol=0)
    torch.testing.assert_close(fast_bf16[1], plain_bf16[1], rtol=0, atol=0)
    # bf16 backward: the q/k/v (gate/up) input gradients are summed in bf16 before the upcast;
    # that is another rounding, no further from the fp32 gradients than autocast's own
    fast_err, plain_err = max(_rel_errors(fast_bf16[2], fp32[2])), max(_rel_errors(plain_bf16[2], fp32[2]))
    assert fast_err < 2e-2 and fast_err < 1.5 * plain_err, (fast_err, plain_err)
