"""Context parallelism (``scalelm.distributed.context_parallel``): the zigzag split, the block
kernels and their log-sum-exp merge in one process; the ring on 2 processes against one process
for both GPT styles (learned positions, RoPE with grouped-query attention); the layouts it refuses;
what ``plan`` makes of it."""

import math

import pytest
import torch
import torch.nn.functional as F
from dist_launch import torchrun

from scalelm.config import ModelConfig, ParallelConfig
from scalelm.distributed import LayoutError, resolve_layout
from scalelm.distributed.context_parallel import (
    _pairs,
    block_backward,
    block_forward,
    cp_chunks,
    cp_positions,
    math_block_backward,
    math_block_forward,
)


def test_the_zigzag_split_covers_each_position_once_with_equal_causal_work():
    for cp in (1, 2, 4):
        parts = [cp_positions(32, cp, r) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(32))
        assert all(p.tolist() == sorted(p.tolist()) for p in parts)  # local order = position order
        # query-key pairs under the causal mask, per rank: the same on every rank
        work = {sum(int((q >= torch.cat(parts)).sum()) for q in p) for p in parts}
        assert len(work) == 1
    assert cp_chunks(4, 1) == (1, 6)
    assert list(_pairs((1, 6), (0, 7))) == [(0, 0, False), (1, 0, False)]  # chunk 7 is in both chunks' future
    with pytest.raises(LayoutError, match="2 x cp = 4 chunks"):
        cp_positions(30, 2, 0)


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_merged_by_logsumexp_are_full_attention_and_its_gradient(kernel, dtype):
    """Keys in 2 blocks (the earlier one whole, the own one causal): merged forward outputs and
    the blocks' backward with the *global* out/lse give SDPA's output and gradients."""
    fwd, bwd = (block_forward, block_backward) if kernel == "cpu_flash" else (math_block_forward, math_block_backward)
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 8, 16
    q, k, v = (torch.randn(B, H, 2 * T, D, generator=g, dtype=dtype) for _ in range(3))
    dout = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    scale = 1 / math.sqrt(D)
    # the query chunk is the second half: it sees keys 0..T-1 whole and T..2T-1 causally
    qc, (k0, k1), (v0, v1) = q[:, :, T:].contiguous(), k.chunk(2, 2), v.chunk(2, 2)
    blocks = [(k0.contiguous(), v0.contiguous(), False), (k1.contiguous(), v1.contiguous(), True)]
    outs = [fwd(qc, kb, vb, c, scale) for kb, vb, c in blocks]
    lse = torch.logaddexp(outs[0][1], outs[1][1])
    out = sum(o * torch.exp(l - lse)[..., None] for o, l in outs)

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)[:, :, T:]
    ref.backward(dout)
    tol = dict(atol=1e-12, rtol=0) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref.detach(), **tol)
    grads = [bwd(dout, qc, kb, vb, out, lse, c, scale) for kb, vb, c in blocks]
    torch.testing.assert_close(sum(gr[0] for gr in grads).to(dtype), qr.grad[:, :, T:], **tol)
    torch.testing.assert_close(torch.cat([gr[1].to(dtype) for gr in grads], 2), kr.grad, **tol)
    torch.testing.assert_close(torch.cat([gr[2].to(dtype) for gr in grads], 2), vr.grad, **tol)


@pytest.mark.parametrize("pc, model, needle", [
    (dict(cp=2, pp=2), {}, "does not run inside a pipeline"),
    (dict(cp=2, tp=2, sequence_parallel=True), {}, "both split the sequence"),
    (dict(cp=4), dict(block_size=12), "block_size=12 is not divisible by 8"),
    (dict(cp=2), dict(dropout=0.1), "--model.dropout=0"),
    (dict(cp=2), dict(arch="encoder-decoder"), "decoder-only GPT"),
    (dict(cp=3), {}, "not divisible by dp_replicate x tp x pp x cp"),
])
def test_layouts_context_parallelism_cannot_run_are_refused(pc, model, needle):
    mc = ModelConfig(**{**dict(n_layer=4, n_head=4, n_embd=32, block_size=16), **model})
    with pytest.raises(LayoutError, match=needle):
        resolve_layout(ParallelConfig(**pc), mc, 4)


def test_cp_fills_the_mesh_and_shards_with_data_parallelism():
    mc = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16)
    l = resolve_layout(ParallelConfig(cp=2), mc, 8)
    assert (l.dp_shard, l.cp, l.world_size, l.fsdp) == (4, 2, 8, True)
    assert resolve_layout(ParallelConfig(cp=2), mc, 2).fsdp  # FSDP2 over the cp ranks alone
    assert "cp=2" in l.describe()


def test_plan_divides_activation_memory_by_cp_and_times_the_ring():
    from scalelm.analysis.memory import Layout, estimate_memory
    from scalelm.analysis.planner import Setup, evaluate
    from scalelm.hardware import device_spec

    cfg = ModelConfig(n_layer=4, n_head=8, n_kv_head=2, n_embd=256, block_size=8192, vocab_size=1000,
                      pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    for cp in (2, 4):  # against FSDP2 over as many ranks: the same sharding, whole sequences
        fsdp = estimate_memory(cfg, Layout(dp_shard=cp), 1, 8192, "bf16")
        m = estimate_memory(cfg, Layout(cp=cp), 1, 8192, "bf16")
        assert m.activations == pytest.approx(fsdp.activations / cp, rel=1e-9)
        assert m.params == fsdp.params and m.optimizer == fsdp.optimizer
    spec = device_spec("h100")
    setup = Setup(cfg=cfg, devices=4, device=spec, memory=spec.memory, per_node=8, seq_len=8192, micro_batch=1,
                  global_batch=1, precision="bf16", efficiency=0.5)
    cp4 = evaluate(setup, Layout(cp=4))
    assert cp4.comm_bytes["cp"] > 0 and cp4.times["cp"] >= 0 and cp4.name == "CP"
    assert cp4.device_flops_per_step == pytest.approx(evaluate(setup, Layout()).device_flops_per_step / 4)


CHECKS = [
    "cp_gpt2:gpt2:fp64:cp=2,dp_shard=1",  # learned positions
    "cp_llama:llama:fp64:cp=2,dp_shard=1",  # RoPE, 4 query heads over 2 key/value heads
    "cp_llama_fp32:llama:fp32:cp=2,dp_shard=1",
    "cp_ac:gpt2:fp64:cp=2,dp_shard=1,train.activation_checkpointing=true",  # the ring recomputed in the backward
]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_of_context_parallelism_match_one():
    """3 AdamW steps with accumulation and clipping, each sequence split over 2 ranks: every
    parameter as one process's (the equivalence tests' tolerances)."""
    rows = torchrun(2, "equivalence.py", *CHECKS)
    assert [r["check"] for r in rows] == [c.split(":")[0] for c in CHECKS]
    for r in rows:
        assert "cp=2" in r["layout"]
        if r["dtype"] == "fp64":
            assert r["param_diff"] < 1e-10 and r["loss_diff"] < 1e-10, r
        else:
            assert r["loss_diff"] < 1e-5 and r["param_diff"] < 1e-4, r
