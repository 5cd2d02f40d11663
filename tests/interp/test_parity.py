"""Parity with TransformerLens: a GPT-2-shaped model with random weights, loaded into both (scalelm's
weights exported to transformers' GPT2LMHeadModel, booted offline into TransformerLens' bridge), gives
the same residual streams, attention patterns, head outputs and logit lens within 1e-5.

TransformerLens is the `interp` extra (`pip install 'scalelm[interp]'`); without it the test skips.
Importing it takes ~15 s (it imports transformers, wandb and more): hence `slow`, and the imports
inside the test, so that collecting this file costs nothing.
"""

import pytest
import torch

from scalelm import capture
from scalelm.config import ModelConfig
from scalelm.interp.inspect import logit_lens
from scalelm.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# scalelm name -> TransformerLens name, per layer
PAIRS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
         "attn.pattern": "attn.hook_pattern", "attn.z": "attn.hook_z", "attn_out": "hook_attn_out",
         "mlp_out": "hook_mlp_out"}


def boot_bridge(hf_model, tmp_path):
    """TransformerLens' bridge around a local model: it reads the config and a tokenizer from a folder."""
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (registers boot_transformers)
    from transformer_lens.model_bridge import TransformerBridge
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(hf_model.config.vocab_size)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t0", bos_token="t0", pad_token="t0")
    hf_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return TransformerBridge.boot_transformers(str(tmp_path), hf_model=hf_model, device="cpu")


@pytest.mark.slow
def test_transformer_lens_run_with_cache_agrees(tmp_path, monkeypatch):
    pytest.importorskip("transformer_lens.model_bridge")
    from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens

    from scalelm.model.hf import to_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, block_size=32, n_layer=3, n_head=4, n_embd=64, init_std=0.1)
    model = GPT(cfg).eval()
    bridge = boot_bridge(to_hf(model).eval(), tmp_path)
    idx = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        tl_logits, tl = bridge.run_with_cache(idx)
        with capture(model) as ours:
            logits, _ = model(idx)
        lens = logit_lens(model, ours)  # (layers + 1, B, T, V): each layer's stream through the final norm and head
        tl_lens = tl_logit_lens(bridge, cache=tl, positions=None).values  # TransformerLens' own logit lens
    torch.testing.assert_close(logits, tl_logits, atol=1e-5, rtol=0)
    for L in range(cfg.n_layer):
        for mine, theirs in PAIRS.items():
            torch.testing.assert_close(ours[f"blocks.{L}.{mine}"], tl[f"blocks.{L}.{theirs}"], atol=1e-5, rtol=0,
                                       msg=lambda m: f"blocks.{L}.{mine}: {m}")
    torch.testing.assert_close(ours["final_norm"], tl["ln_final.hook_out"], atol=1e-5, rtol=0)
    assert tl_lens.shape == lens.shape == (cfg.n_layer + 1, 2, 11, 300)
    torch.testing.assert_close(lens, tl_lens, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens[-1], logits, atol=1e-5, rtol=0)  # the last row is the model's output
