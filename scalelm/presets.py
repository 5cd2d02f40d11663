"""Named presets: partial configs merged over the defaults (``--preset NAME``).

Shapes follow the published models; the Llama, SmolLM, Qwen, Mistral, Phi-3, OLMo 2 and Gemma ones
are shape-only (no weights here) but hold the published weights exactly (``scalelm convert --from-hf``;
checked against their config.json in tests/model/test_hf_families.py, test_hf_mistral_phi3.py and
test_hf_olmo_gemma.py). ``block_size`` is a context to train at; an import
takes the published one (max_position_embeddings).
``baby`` carries nanoGPT's CPU Shakespeare training recipe as its training defaults.
"""

_GPT2 = dict(vocab_size=50257, block_size=1024, pos_embedding="learned", norm="layernorm",
             mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5)
_LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-5)
# Llama 3.1/3.2's RoPE: low frequencies stretched 32x (3.2) beyond the 8192-token pre-training context
_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling="llama3", rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_block_size=8192)
# Gemma 2/3: sandwich norms with Gemma's (1 + w) RMSNorm, GeGLU, embeddings scaled by sqrt(n_embd), tied
_GEMMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="geglu", bias=False, norm_eps=1e-6, norm_placement="sandwich",
              norm_unit_offset=True, tie_embeddings=True)
_QWEN = dict(_LLAMA, vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=True)
# encoders (masked LM, scalelm/model/encoder.py). BERT: post-LN, learned positions, token types, the exact
# GELU, biases, its 30522-token WordPiece vocabulary; holds BertForMaskedLM's weights exactly
_BERT = dict(arch="encoder", vocab_size=30522, block_size=512, pos_embedding="learned", norm="layernorm",
             norm_eps=1e-12, mlp="gelu", gelu="erf", bias=True, tie_embeddings=True, norm_placement="post_add",
             type_vocab_size=2)
# ModernBERT's block (pre-norm, RoPE, GeGLU with the exact GELU, no biases), global attention on every layer
_MODERN_ENCODER = dict(arch="encoder", pos_embedding="rope", rope_theta=160000.0, norm="layernorm", norm_eps=1e-5,
                       mlp="geglu", gelu="erf", bias=False, tie_embeddings=True, norm_placement="pre")

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
    # Mistral 7B v0.1: Llama-shaped with GQA 32/8 and a 4096-token sliding window on every layer
    "mistral-7b": {"model": dict(_LLAMA, vocab_size=32000, block_size=8192, n_layer=32, n_head=32, n_kv_head=8,
                                 n_embd=4096, intermediate_size=14336, rope_theta=10000.0, tie_embeddings=False,
                                 sliding_window=4096)},
    # Phi-3-mini-4k-instruct: Mistral's computation (stored with fused q/k/v and gate/up), MHA, window 2047
    "phi-3-mini": {"model": dict(_LLAMA, vocab_size=32064, block_size=4096, n_layer=32, n_head=32, n_kv_head=32,
                                 n_embd=3072, intermediate_size=8192, rope_theta=10000.0, tie_embeddings=False,
                                 sliding_window=2047)},
    # OLMo 2 1B (allenai/OLMo-2-0425-1B): norms on each sub-layer's output before the residual add, and
    # q/k norms over the whole projections; MHA, untied
    "olmo-2-1b": {"model": dict(_LLAMA, vocab_size=100352, block_size=4096, n_layer=16, n_head=16, n_kv_head=16,
                                n_embd=2048, intermediate_size=8192, norm_eps=1e-6, rope_theta=500000.0,
                                tie_embeddings=False, norm_placement="post", qk_norm=True, qk_norm_scope="all")},
    # Gemma 2 2B: norms before and after each sub-layer, attention and output soft-capped, local
    # (4096-token window) and global layers alternating; heads 256 wide (8 x 256 > 2304)
    "gemma-2-2b": {"model": dict(_GEMMA, vocab_size=256000, block_size=4096, n_layer=26, n_head=8, n_kv_head=4,
                                 n_embd=2304, head_size=256, intermediate_size=9216, embed_scale=2304 ** 0.5,
                                 rope_theta=10000.0, attn_softcap=50.0, logit_softcap=30.0, sliding_window=4096,
                                 sliding_window_pattern=2)},
    # Gemma 3 1B (google/gemma-3-1b-pt): Gemma 2's block with per-head q/k norms instead of soft-capping;
    # five local layers (512-token window, RoPE base 10k) to one global layer (RoPE base 1M)
    "gemma-3-1b": {"model": dict(_GEMMA, vocab_size=262144, block_size=4096, n_layer=26, n_head=4, n_kv_head=1,
                                 n_embd=1152, head_size=256, intermediate_size=6912, embed_scale=1152 ** 0.5,
                                 qk_norm=True, rope_theta=1000000.0, rope_local_theta=10000.0, sliding_window=512,
                                 sliding_window_pattern=6)},
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
    # BERT-base (uncased): 12 x 768, 12 heads, FFN 3072: 110M parameters with the MLM head
    "bert-base": {"model": dict(_BERT, n_layer=12, n_head=12, n_embd=768, intermediate_size=3072)},
    # Google's smaller BERTs ("Well-Read Students Learn Better", 2019): BERT-Small 4 x 512, BERT-Mini 4 x 256
    "bert-small": {"model": dict(_BERT, n_layer=4, n_head=8, n_embd=512, intermediate_size=2048)},
    "bert-mini": {"model": dict(_BERT, n_layer=4, n_head=4, n_embd=256, intermediate_size=1024)},
    # a masked-LM encoder that pretrains on 2 CPU cores (ModernBERT's block; the vocabulary follows the data)
    "encoder-cpu": {
        "model": dict(_MODERN_ENCODER, vocab_size=8192, block_size=128, n_layer=4, n_head=4, n_embd=256,
                      intermediate_size=512, dropout=0.0),
        "train": dict(micro_batch_size=16, max_steps=2000, eval_every=250, eval_iters=20),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.98, weight_decay=0.01, grad_clip=1.0),
    },
    # nanoGPT's shakespeare-char config
    "char-shakespeare": {
        "model": dict(_GPT2, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        "train": dict(micro_batch_size=64, max_steps=5000, eval_every=250, eval_iters=200),
        "optim": dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, beta2=0.99, weight_decay=0.1,
                      grad_clip=1.0, schedule="cosine"),
    },
}
