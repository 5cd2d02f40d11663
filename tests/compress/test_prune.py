"""Pruning: each method's mask against its definition, SparseGPT against an explicit OBS computation,
N:M patterns, sequential calibration, structured pruning equal to zeroing the same units (GQA,
tied and untied embeddings, RMSNorm), and the CLI's output working with eval, generate and HF export."""

import copy
import json

import pytest
import torch
from train_helpers import cli, make_char_data

from scalelm.compress.sparsegpt import sparsegpt_prune
from scalelm.compress.structured import Plan, apply_plan, importance, make_plan, prune_structured
from scalelm.compress.unstructured import (
    InputStats,
    magnitude_mask,
    nm_mask,
    prune_layer,
    prune_unstructured,
    wanda_mask,
)
from scalelm.config import ModelConfig
from scalelm.errors import UserError
from scalelm.model.gpt import GPT
from scalelm.model.io import load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(600))


def correlated_inputs(n=256, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)


def gpt2_cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32), **kw})


def llama_cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                                 intermediate_size=48, pos_embedding="rope", norm="rmsnorm", mlp="swiglu",
                                 bias=False, tie_embeddings=False), **kw})


# ----------------------------------------------------------------------------- masks

def test_magnitude_mask_is_the_smallest_weights_of_the_layer():
    W = torch.randn(8, 16)
    mask = magnitude_mask(W, 0.3)
    k = int(W.numel() * 0.3)
    expected = torch.zeros(W.numel(), dtype=torch.bool)
    expected[W.abs().flatten().argsort()[:k]] = True
    assert torch.equal(mask, expected.reshape(W.shape))
    assert mask.sum() == k and not torch.equal(mask.sum(1), torch.full((8,), k // 8))  # per layer, not per row


def test_wanda_mask_is_weight_times_input_norm_per_output_row():
    W, X = torch.randn(6, 16, dtype=torch.float64), correlated_inputs()
    layer = torch.nn.Linear(16, 6, bias=False).double()
    layer.weight.data.copy_(W)
    stats = InputStats({"l": layer}, hessian=False)
    stats.add("l", X[:100])
    stats.add("l", X[100:])  # accumulated over calibration batches
    assert torch.allclose(stats.sums["l"].double().sqrt(), X.norm(dim=0), rtol=1e-5)
    score = W.abs() * X.norm(dim=0)[None]
    expected = torch.zeros_like(W, dtype=torch.bool)
    for r in range(6):
        expected[r, score[r].argsort()[:8]] = True
    assert torch.equal(wanda_mask(W, X.norm(dim=0), 0.5), expected)
    prune_layer(layer, "wanda", 0.5, None, stats.sums["l"].double())
    assert torch.equal(layer.weight == 0, expected)
    assert not torch.equal(expected, magnitude_mask(W, 0.5))  # the input norms change the choice


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_pattern_holds_and_keeps_the_best_scores(method):
    torch.manual_seed(0)
    X = correlated_inputs()
    layer = torch.nn.Linear(16, 8, bias=False).double()
    W = layer.weight.detach().clone()
    stats = InputStats({"l": layer}, hessian=method == "sparsegpt")
    stats.add("l", X)
    prune_layer(layer, method, 0.5, (2, 4), stats.sums["l"].double())
    groups = (layer.weight != 0).reshape(8, 4, 4).sum(-1)
    assert (groups <= 2).all() and (layer.weight == 0).float().mean() >= 0.5
    if method != "sparsegpt":  # SparseGPT chooses on updated weights; the others on the scores directly
        score = W.abs() * (X.norm(dim=0)[None] if method == "wanda" else 1)
        kept = score.reshape(8, 4, 4).topk(2, dim=-1).indices.sort(-1).values
        assert torch.equal((layer.weight != 0).reshape(8, 4, 4).nonzero()[:, 2].reshape(8, 4, 2), kept)
    assert torch.equal(nm_mask(torch.arange(8.0)[None], 1, 4), torch.tensor([[1, 1, 1, 0, 1, 1, 1, 0]]).bool())
    with pytest.raises(UserError, match="multiples of 4"):
        nm_mask(torch.randn(2, 6), 2, 4)


# ----------------------------------------------------------------------------- SparseGPT

def obs_reference(W, H, sparsity, blocksize, damp=0.01):
    """SparseGPT written out with explicit inverses: column q, with the columns q.. still free,
    is removed by the OBS update -(w_q / [H_F^-1]_qq) [H_F^-1]_{q,:}; masks chosen per block by
    w^2 / [H_F^-1]_qq on the block's updated weights."""
    W = W.clone().double()
    H = H.double() + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    rows, cols = W.shape
    inv = [torch.linalg.inv(H[q:, q:]) for q in range(cols)]
    mask = torch.zeros_like(W, dtype=torch.bool)
    for b in range(0, cols, blocksize):
        e = min(b + blocksize, cols)
        score = W[:, b:e].square() / torch.tensor([inv[q][0, 0] for q in range(b, e)], dtype=torch.float64)[None]
        k = int(round(score.numel() * sparsity))
        m = torch.zeros(score.numel(), dtype=torch.bool)
        m[score.flatten().argsort()[:k]] = True
        mask[:, b:e] = m.reshape(score.shape)
        for q in range(b, e):
            removed = torch.where(mask[:, q], W[:, q], torch.zeros_like(W[:, q]))
            W[:, q:] -= (removed / inv[q][0, 0])[:, None] * inv[q][0][None, :]
    return W, mask


@pytest.mark.parametrize("blocksize", [16, 4])
def test_sparsegpt_equals_the_explicit_obs_computation(blocksize):
    torch.manual_seed(0)
    X, W = correlated_inputs(), torch.randn(6, 16, dtype=torch.float64)
    H = X.T @ X
    got, mask = sparsegpt_prune(W, H, 0.5, blocksize=blocksize)
    ref, ref_mask = obs_reference(W, H, 0.5, blocksize)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(got, ref, atol=1e-9) and (got[mask] == 0).all()
    same, none = sparsegpt_prune(W, H, 0.0)
    assert not none.any() and torch.allclose(same, W)  # nothing removed: nothing changes


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_on_the_same_layer(nm):
    torch.manual_seed(0)
    X, W = correlated_inputs(512, 32), torch.randn(16, 32, dtype=torch.float64)
    wanda = W.masked_fill(wanda_mask(W, X.norm(dim=0), 0.5, nm), 0.0)
    sgpt, _ = sparsegpt_prune(W, X.T @ X, 0.5, nm, blocksize=8)
    err = {name: ((W - w) @ X.T).square().sum().item() for name, w in (("wanda", wanda), ("sparsegpt", sgpt))}
    assert (sgpt == 0).double().mean() >= 0.5
    assert err["sparsegpt"] < 0.8 * err["wanda"], err


def test_dead_inputs_and_a_singular_hessian_are_handled():
    X = correlated_inputs(4, 16)  # 4 tokens for 16 inputs: H has rank 4
    X[:, 3] = 0.0  # an input that is never nonzero
    W = torch.randn(4, 16, dtype=torch.float64)
    got, mask = sparsegpt_prune(W, X.T @ X, 0.5)
    assert torch.isfinite(got).all() and (got[:, 3] == 0).all() and mask.sum() == 32


# ----------------------------------------------------------------------------- the model-level driver

@pytest.mark.parametrize("cfg", [gpt2_cfg(), llama_cfg()], ids=["gpt2", "llama-gqa"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_block_linear_reaches_the_sparsity(cfg, method):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    windows = torch.randint(0, 64, (8, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_layer = prune_unstructured(model, method, 0.5, None, windows)
    assert len(per_layer) == cfg.n_layer * (7 if cfg.mlp == "swiglu" else 6)
    assert all(abs(s - 0.5) < 1e-9 for s in per_layer.values()), per_layer
    for k, v in model.state_dict().items():  # embeddings, norms, biases and the head are not pruned
        if not (k.endswith(".weight") and (".attn." in k or ".mlp." in k)):
            assert torch.equal(v, before[k]), k


def test_each_layer_is_pruned_on_the_outputs_of_the_pruned_layers_before_it():
    torch.manual_seed(0)
    model = GPT(gpt2_cfg(n_layer=2)).eval()
    windows = torch.randint(0, 64, (8, 16))
    seen = {"blocks.0.attn.o_proj": [], "blocks.1.attn.q_proj": []}
    for name in seen:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].clone()))
    prune_unstructured(model, "wanda", 0.5, None, windows, batch_size=8)
    final = {}
    for name in seen:
        model.get_submodule(name)._forward_pre_hooks.clear()
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: final.setdefault(n, a[0].clone()))
    model(windows)
    # o_proj's statistics came from the pass after q/k/v were pruned (its 2nd call), not the dense one
    assert torch.allclose(seen["blocks.0.attn.o_proj"][1], final["blocks.0.attn.o_proj"], atol=1e-6)
    assert not torch.allclose(seen["blocks.0.attn.o_proj"][0], final["blocks.0.attn.o_proj"], atol=1e-3)
    # block 1 saw what the pruned block 0 produces
    assert torch.allclose(seen["blocks.1.attn.q_proj"][0], final["blocks.1.attn.q_proj"], atol=1e-6)


# ----------------------------------------------------------------------------- structured

def zero_units(model: GPT, plan: Plan) -> GPT:
    """The original model with every unit the plan drops set to zero (by hand, independently)."""
    m = copy.deepcopy(model)
    cfg = m.cfg
    g, hd = cfg.n_head // cfg.kv_heads, cfg.head_dim
    drop_c = torch.ones(cfg.n_embd, dtype=torch.bool)
    drop_c[plan.channels] = False
    kept = dict(zip(plan.layers, zip(plan.groups, plan.neurons)))
    with torch.no_grad():
        m.tok_emb.weight[:, drop_c] = 0
        if m.pos_emb is not None:
            m.pos_emb.weight[:, drop_c] = 0
        for name, mod in m.named_modules():
            if name.endswith("norm") or name == "norm_f":
                mod.weight[drop_c] = 0
                if getattr(mod, "bias", None) is not None:
                    mod.bias[drop_c] = 0
        for i, b in enumerate(m.blocks.values()):
            outs = [b.attn.o_proj, b.mlp.down]
            if i not in kept:  # a dropped layer: the block adds nothing to the residual stream
                for lin in outs:
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
                continue
            groups, neurons = kept[i]
            for kv in range(cfg.kv_heads):
                if kv not in groups.tolist():
                    b.attn.o_proj.weight[:, kv * g * hd:(kv + 1) * g * hd] = 0
            drop_n = torch.ones(cfg.ffn_dim, dtype=torch.bool)
            drop_n[neurons] = False
            b.mlp.down.weight[:, drop_n] = 0
            for lin in outs:
                lin.weight[drop_c] = 0
                if lin.bias is not None:
                    lin.bias[drop_c] = 0
    return m


@pytest.mark.parametrize("cfg, targets", [
    (gpt2_cfg(), dict(heads=2, ffn_dim=80, n_layer=2)),
    (gpt2_cfg(tie_embeddings=False, bias=False), dict(heads=3, ffn_dim=100)),
    (llama_cfg(), dict(heads=2, ffn_dim=24, n_layer=2, embd=24)),  # GQA: one kv group of two goes
    (llama_cfg(n_kv_head=None, tie_embeddings=True), dict(heads=3, ffn_dim=40, embd=20)),  # tied, MHA
    (llama_cfg(n_kv_head=1), dict(n_layer=1, embd=16)),  # MQA
], ids=["gpt2", "gpt2-untied-nobias", "llama-gqa", "llama-tied", "llama-mqa"])
def test_structured_pruning_equals_the_original_with_those_units_zeroed(cfg, targets, tmp_path):
    torch.manual_seed(0)
    model = GPT(cfg).double().eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so slicing them is checked
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    windows = torch.randint(0, 64, (8, 16))
    small, plan = prune_structured(model, windows, **targets)
    s = small.cfg
    assert s.n_layer == targets.get("n_layer", cfg.n_layer) and s.n_head == targets.get("heads", cfg.n_head)
    assert s.ffn_dim == targets.get("ffn_dim", cfg.ffn_dim) and s.n_embd == targets.get("embd", cfg.n_embd)
    assert s.head_dim == cfg.head_dim and s.kv_heads == s.n_head // (cfg.n_head // cfg.kv_heads)
    assert small.num_params() < model.num_params()
    if cfg.tie_embeddings:
        assert small.lm_head.weight is small.tok_emb.weight
    x = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        got, want = small(x)[0], zero_units(model, plan)(x)[0]
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
    back = load_model_dir(save_model_dir(small, tmp_path / "small"), dtype=torch.float64)  # an ordinary model dir
    with torch.no_grad():
        assert back.cfg == s and torch.allclose(back(x)[0], got, atol=1e-5)


def test_structured_importance_finds_dead_units():
    torch.manual_seed(0)
    model = GPT(gpt2_cfg(n_head=4, n_layer=3)).eval()
    with torch.no_grad():
        model.blocks["1"].attn.v_proj.weight[16:24] = 0  # head 2 of layer 1 outputs nothing
        model.blocks["1"].attn.v_proj.bias[16:24] = 0
        model.blocks["0"].mlp.up.weight[5] = 0  # neuron 5 of layer 0: gelu(0) = 0
        model.blocks["0"].mlp.up.bias[5] = 0
        for lin in (model.blocks["2"].attn.o_proj, model.blocks["2"].mlp.down):  # layer 2 changes nothing
            lin.weight.zero_()
            lin.bias.zero_()
    imp = importance(model, torch.randint(0, 64, (8, 16)))
    assert imp.groups[1].argmin() == 2 and imp.groups[1, 2] == 0
    assert imp.neurons[0].argmin() == 5 and imp.neurons[0, 5] == 0
    assert imp.layers.argmin() == 2 and abs(imp.layers[2]) < 1e-6
    plan = make_plan(model, imp, heads=3, ffn_dim=127, n_layer=2)
    assert plan.layers == [0, 1] and 2 not in plan.groups[1].tolist() and 5 not in plan.neurons[0].tolist()


def test_gqa_heads_go_with_their_kv_group():
    model = GPT(llama_cfg(n_head=4, n_kv_head=2)).eval()
    with pytest.raises(UserError, match="multiple of 2"):
        prune_structured(model, torch.randint(0, 64, (4, 16)), heads=3)
    with pytest.raises(UserError, match="between 1 and"):
        prune_structured(model, torch.randint(0, 64, (4, 16)), n_layer=5)
    with pytest.raises(UserError, match="at least one target"):
        prune_structured(model, torch.randint(0, 64, (4, 16)))
    small, plan = prune_structured(model, torch.randint(0, 64, (4, 16)), heads=2)
    assert small.cfg.n_kv_head == 1 and small.cfg.head_size == 8 and len(plan.groups[0]) == 1
    assert apply_plan(model, plan).cfg == small.cfg


def test_structured_llama_exports_to_hf_with_its_head_width():
    from scalelm.model.hf import from_hf, to_hf

    torch.manual_seed(0)
    model = GPT(llama_cfg()).eval()
    small, _ = prune_structured(model, torch.randint(0, 64, (4, 16)), heads=2, embd=24)
    assert small.cfg.head_size == 8 and small.cfg.n_embd == 24
    hf = to_hf(small).eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (hf(x).logits - small(x)[0]).abs().max() < 1e-4
    back = from_hf(hf)
    assert back.cfg.head_size == 8 and torch.equal(back(x)[0], small(x)[0])


def test_gpt2_with_other_head_width_is_a_clear_export_error():
    from scalelm.model.hf import ConversionError, to_hf

    small, _ = prune_structured(GPT(gpt2_cfg()).eval(), torch.randint(0, 64, (4, 16)), heads=2)
    with pytest.raises(ConversionError, match="head_size"):
        to_hf(small)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    data = make_char_data(root / "data", TEXT)
    from scalelm.data.loader import TokenData

    d = TokenData(data)
    torch.manual_seed(0)
    for name, cfg in (("gpt2", gpt2_cfg(vocab_size=d.vocab_size, block_size=32)),
                      ("llama", llama_cfg(vocab_size=d.vocab_size, block_size=32))):
        save_model_dir(GPT(cfg), root / name, d.tokenizer_json)
    return root, data


@pytest.mark.parametrize("args", [
    ["--method", "magnitude", "--sparsity", "0.5"],
    ["--method", "wanda", "--sparsity", "0.6"],
    ["--method", "sparsegpt", "--pattern", "2:4"],
])
def test_prune_cli_output_works_with_eval_generate_and_hf_export(setup, args, tmp_path):
    root, data = setup
    out = tmp_path / "pruned"
    rc, so, se = cli("prune", root / "gpt2", *args, "--calib", data, "--calib-samples", 8, "--out", out)
    assert rc == 0, se
    res = json.loads(so)
    target = 0.5 if "2:4" in args else float(args[-1])
    assert abs(res["linear_sparsity"] - target) < 0.01 and res["nonzero_params"] < res["params"]  # rows round
    assert "blocks.2.mlp.down" in se and "sparsity" in se  # per-layer report
    meta = json.loads((out / "config.json").read_text())
    assert meta["pruning"]["method"] == args[1] and len(meta["pruning"]["layers"]) == 18
    assert meta["pruning"]["achieved"]["linear_sparsity"] == res["linear_sparsity"]
    rc, so, se = cli("eval", out, "--data", data, "--max-batches", "2")
    assert rc == 0 and json.loads(so)["loss"] > 0, se
    rc, so, se = cli("generate", out, "--prompt", "line", "--max-new-tokens", "5", "--temperature", "0")
    assert rc == 0, se
    rc, so, se = cli("convert", out, "--to-hf", tmp_path / "hf")
    assert rc == 0, se
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 30, (1, 12))
    with torch.no_grad():
        assert (hf(x).logits - load_model_dir(out)(x)[0]).abs().max() < 1e-4


def test_prune_cli_structured_on_gqa(setup, tmp_path):
    root, data = setup
    out = tmp_path / "small"
    rc, so, se = cli("prune", root / "llama", "--method", "structured", "--heads", "2", "--ffn-dim", "24",
                     "--n-layer", "2", "--embd", "16", "--calib", data, "--calib-samples", 8, "--out", out)
    assert rc == 0, se
    res = json.loads(so)
    assert res["params"] < res["params_before"] and 0 < res["fraction"] < 1
    cfg = load_model_dir(out).cfg
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.ffn_dim, cfg.n_embd, cfg.head_dim) == (2, 2, 1, 24, 16, 8)
    assert json.loads((out / "config.json").read_text())["pruning"]["kept"]["channels_kept"] == 16
    rc, so, se = cli("eval", out, "--data", data, "--max-batches", "2")
    assert rc == 0, se
    rc, _, se = cli("prune", root / "llama", "--method", "structured", "--heads", "2", "--calib", data, "--out", out)
    assert rc == 2 and "--overwrite" in se  # an earlier output is replaced only when asked


@pytest.mark.parametrize("args, message", [
    (["--method", "wanda", "--sparsity", "0.5"], "needs calibration data"),
    (["--method", "magnitude"], "needs --sparsity"),
    (["--method", "magnitude", "--sparsity", "0.3", "--pattern", "2:4"], "means a sparsity of 0.5"),
    (["--method", "magnitude", "--pattern", "4:2"], "0 < N < M"),
    (["--method", "magnitude", "--sparsity", "1.5"], "in [0, 1)"),
    (["--method", "structured", "--calib", "DATA"], "at least one target"),
    (["--method", "structured", "--sparsity", "0.5", "--calib", "DATA"], "removes whole units"),
    (["--method", "wanda", "--heads", "2", "--calib", "DATA"], "belong to --method structured"),
])
def test_prune_cli_errors(setup, tmp_path, args, message):
    root, data = setup
    args = [str(data) if a == "DATA" else a for a in args]
    rc, _, se = cli("prune", root / "gpt2", *args, "--out", tmp_path / "x")
    assert rc == 2 and message in se, se
    assert not (tmp_path / "x").exists()


def test_prune_cli_refuses_calibration_data_of_another_tokenizer(setup, tmp_path):
    root, _ = setup
    other = make_char_data(tmp_path / "other", "completely different characters: QXZ!?\n" * 200)
    rc, _, se = cli("prune", root / "gpt2", "--method", "wanda", "--sparsity", "0.5", "--calib", other,
                    "--out", tmp_path / "x")
    assert rc == 2 and "different tokenizer" in se, se
