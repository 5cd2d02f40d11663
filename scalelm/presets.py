"""Named presets: partial configs merged over the defaults (``--preset NAME``).

Shapes follow the published models; the Llama, SmolLM and Qwen ones are shape-only (no weights
here) but hold the published weights exactly (``scalelm convert --from-hf``; checked against their
config.json in tests/model/test_hf_families.py). ``block_size`` is a context to train at; an import
takes the published one (max_position_embeddings).
``baby`` carries nanoGPT's CPU Shakespeare training recipe as its training defaults.
"""

_GPT2 = dict(vocab_size=50257, block_size=1024, pos_embedding="learned", norm="layernorm",
             mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5)
_LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-5)
# Llama 3.1/3.2's RoPE: low frequencies stretched 32x (3.2) beyond the 8192-token pre-training context
_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling="llama3", rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_block_size=8192)
_QWEN = dict(_LLAMA, vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True)

PRESETS: dict[str, dict] = {
    "gpt2-124m": {"model": dict(_GPT2, n_layer=12, n_head=12, n_embd=768)},
    "gpt2-350m": {"model": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024)},
    "gpt2-774m": {"model": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280)},
    "gpt2-1.5b": {"model": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600)},
    # GaLore/ReLoRA's small Llama used in optimizer papers
    "llama-60m": {"model": dict(_LLAMA, vocab_size=32000, block_size=1024, n_layer=8, n_head=8,
                                n_embd=512, intermediate_size=1376, tie_embeddings=False)},
    # Llama 3.2 1B shape
    "llama-1b": {"model": dict(_LLAMA, **_LLAMA3_ROPE, rope_factor=32.0, vocab_size=128256, block_size=2048,
                               n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
                               tie_embeddings=True)},
    # SmolLM2 135M (HuggingFaceTB): Llama-shaped, GQA 9/3, tied
    "smollm2-135m": {"model": dict(_LLAMA, vocab_size=49152, block_size=8192, n_layer=30, n_head=9,
                                   n_kv_head=3, n_embd=576, intermediate_size=1536, rope_theta=100000.0,
                                   tie_embeddings=True)},
    # Qwen2.5 0.5B: biases on q/k/v only
    "qwen2.5-0.5b": {"model": dict(_QWEN, qkv_bias=True, block_size=4096, n_layer=24, n_head=14,
                                   n_kv_head=2, n_embd=896, intermediate_size=4864)},
    # Qwen3 0.6B: an RMSNorm per head on q and k; heads 128 wide (16 x 128 > 1024)
    "qwen3-0.6b": {"model": dict(_QWEN, qk_norm=True, block_size=4096, n_layer=28, n_head=16, n_kv_head=8,
                                 n_embd=1024, head_size=128, intermediate_size=3072)},
    # Llama 3 8B shape
    "llama3-8b": {"model": dict(_LLAMA, vocab_size=128256, block_size=8192, n_layer=32, n_head=32,
                                n_kv_head=8, n_embd=4096, intermediate_size=14336, rope_theta=500000.0,
                                tie_embeddings=False)},
    # nanoGPT's CPU Shakespeare run (README "I only have a macbook"), with its training recipe
    "baby": {
        "model": dict(_GPT2, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        "train": dict(micro_batch_size=12, max_steps=2000, eval_every=250, eval_iters=20),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1,
                      grad_clip=1.0, schedule="cosine"),
    },
    # the best Tiny Shakespeare (characters) model that 3 minutes of wall time buys on 2 CPU cores: the
    # baby shape, trained for a time budget rather than a step count (the cosine schedule decays over the
    # minutes, so it ends at min_lr whatever the machine's speed); 2.75 min leaves room for start-up
    "shakespeare-3min": {
        "model": dict(_GPT2, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        "train": dict(micro_batch_size=12, max_steps=1_000_000, max_minutes=2.75, eval_every=250, eval_iters=20),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1,
                      grad_clip=1.0, schedule="cosine"),
    },
    # "Attention Is All You Need"'s base model: 6 + 6 layers, d 512, 8 heads, FFN 2048, dropout 0.1,
    # one shared source/target vocabulary (37k BPE there) tied to the output layer
    "transformer-base": {"model": dict(_GPT2, arch="encoder-decoder", vocab_size=37000, block_size=256,
                                       n_layer=6, n_encoder_layer=6, n_decoder_layer=6, n_head=8, n_embd=512,
                                       intermediate_size=2048, dropout=0.1)},
    # the same design at a size that trains on 2 CPU cores (Multi30k-sized data)
    "transformer-small": {"model": dict(_GPT2, arch="encoder-decoder", vocab_size=8192, block_size=128,
                                        n_layer=3, n_encoder_layer=3, n_decoder_layer=3, n_head=4, n_embd=256,
                                        intermediate_size=1024, dropout=0.1)},
    # nanoGPT's shakespeare-char config
    "char-shakespeare": {
        "model": dict(_GPT2, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        "train": dict(micro_batch_size=64, max_steps=5000, eval_every=250, eval_iters=200),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1,
                      grad_clip=1.0, schedule="cosine"),
    },
}
