"""The KV cache protocols (scalelm/model/kv_cache.py) and the five caches that implement them.

One conformance test runs every cache through its decoder: a prefill and decode steps give the
logits of a forward without a cache, and a cache with a capacity refuses the token past it. The
caches the Generator drives also restart with left padding and reorder rows as beam search
does. ``BatchCache`` (the server's continuous batching) gets tests of its own: rows of different
lengths, rows moved, its limits. The conformance test runs again with a sliding window shorter
than the sequence, on a local and a global layer (every cache masks the slots out of the window).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scalelm.compress.onnx_export import ConcatCache, DecodeGraph
from scalelm.config import ModelConfig
from scalelm.generate.onnx_backend import OUTPUTS, OrtCache, OrtModel
from scalelm.model import GPT
from scalelm.model.build import build_model
from scalelm.model.kv_cache import GeneratorKVCache, KVCache, LayerKVCache, PreallocatedKVCache
from scalelm.serve.engine import BatchCache

pytestmark = pytest.mark.usefixtures("torch_one_thread")
V, CAP, B, T0 = 61, 12, 2, 5  # vocabulary, cache capacity, rows, prompt length
LLAMA = ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, init_std=0.2,
                    pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
# layer 0 attends within 3 slots, layer 1 to everything (pattern 2): both kinds in one cache
WINDOWED = dataclasses.replace(LLAMA, sliding_window=3, sliding_window_pattern=2)
ENCDEC = ModelConfig(arch="encoder-decoder", vocab_size=V, block_size=16, n_layer=2, n_encoder_layer=2,
                     n_decoder_layer=3, n_head=4, n_embd=32, init_std=0.2)


def gpt(cfg: ModelConfig = LLAMA) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg).eval()


class TorchSession:
    """onnxruntime's session API over the graph it would run (DecodeGraph), run by PyTorch:
    OrtModel and OrtCache do their own bookkeeping around it (test_onnx.py checks the real
    export against this same graph)."""

    def __init__(self, model: GPT):
        self.graph = DecodeGraph(model)

    def run(self, names, feeds):
        assert list(names) == list(OUTPUTS)
        args = [torch.from_numpy(np.asarray(feeds[n])) for n in
                ("input_ids", "position_ids", "attention_mask", "past_key", "past_value", "logit_positions")]
        with torch.no_grad():
            return [t.numpy() for t in self.graph(*args)]


def ort_model(model: GPT) -> OrtModel:
    m = object.__new__(OrtModel)  # no onnxruntime session: its stand-in above
    m.session, m.cfg, m.n_params = TorchSession(model), model.cfg, 0
    return m


# ----------------------------------------------------------------------------- one driver per cache
class Driver:
    """A cache and the decoder that uses it: ``step(ids)`` feeds new tokens (B, T) and returns the
    last position's logits; ``ref(seq)`` is the same without a cache."""

    capacity = True  # prepare() refuses tokens past max_len

    def __init__(self, model):
        self.model = model

    def ref(self, seq: torch.Tensor) -> torch.Tensor:
        return self.model(seq)[0][:, -1]


class Preallocated(Driver):
    def __init__(self, cfg=LLAMA):
        super().__init__(gpt(cfg))
        self.cache = PreallocatedKVCache(cfg, B, max_len=CAP)

    def step(self, ids):
        return self.model(ids, kv_cache=self.cache, last_only=True)[0][:, -1]


class Seq2Seq(Driver):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(build_model(ENCDEC).eval())
        self.src = torch.randint(0, V, (B, 7))
        self.valid = torch.ones(B, 7, dtype=torch.bool)
        self.valid[1, 5:] = False  # row 1's source is right-padded
        self.cache = self.model.start(self.src, self.valid, CAP)

    def step(self, ids):
        return self.model.step(ids, self.cache)[:, -1]

    def ref(self, seq):
        return self.model(self.src, seq, src_valid=self.valid)[0][:, -1]


class Batch(Driver):
    """As the server's engine: each prompt prefilled alone and copied into its row, then one-token
    steps over all rows."""

    def __init__(self, cfg=LLAMA):
        super().__init__(gpt(dataclasses.replace(cfg, block_size=CAP)))
        self.cache = BatchCache(self.model.cfg, rows=B + 1)

    def step(self, ids):
        if ids.shape[1] > 1:  # prefill
            out = []
            for b in range(ids.shape[0]):
                tmp = PreallocatedKVCache(self.model.cfg, 1, max_len=ids.shape[1])
                out.append(self.model(ids[b:b + 1], kv_cache=tmp, last_only=True)[0][:, -1])
                self.cache.put(b, tmp, ids.shape[1])
            return torch.cat(out)
        self.cache.begin(ids.shape[0])
        return self.model(ids, kv_cache=self.cache, last_only=True)[0][:, -1]


class Concat(Driver):
    """The exported graph's cache: past keys/values in, present out, one ConcatCache per forward."""

    capacity = False

    def __init__(self, cfg=LLAMA):
        super().__init__(gpt(cfg))
        self.graph = DecodeGraph(self.model)
        shape = (LLAMA.n_layer, B, LLAMA.kv_heads, 0, LLAMA.head_dim)
        self.past = torch.zeros(shape), torch.zeros(shape)
        self.cache = ConcatCache(*self.past, torch.ones(B, 0, dtype=torch.long), torch.zeros(B, 0, dtype=torch.long))

    def step(self, ids):
        P, T = self.past[0].shape[3], ids.shape[1]
        pos = torch.arange(P, P + T)[None].repeat(B, 1)
        logits, k, v = self.graph(ids, pos, torch.ones(B, P + T, dtype=torch.long), *self.past, torch.tensor([T - 1]))
        self.past = k, v
        return logits[:, -1]


class Ort(Driver):
    def __init__(self, cfg=LLAMA):
        super().__init__(gpt(cfg))
        self.ort = ort_model(self.model)
        self.cache = OrtCache(LLAMA, B, CAP)

    def step(self, ids):
        return self.ort(ids, kv_cache=self.cache, last_only=True)[0][:, -1]


DRIVERS = {"preallocated": Preallocated, "seq2seq": Seq2Seq, "batch": Batch, "concat": Concat, "ort": Ort}
LAYER = {"preallocated", "seq2seq", "batch", "concat"}  # written by a PyTorch model's attention layers
GENERATOR = {"preallocated", "seq2seq", "ort"}  # what Generator and beam search drive


@pytest.mark.parametrize("kind, window", [(k, False) for k in DRIVERS] + [(k, True) for k in DRIVERS
                                                                         if k != "seq2seq"])
@torch.no_grad()
def test_every_cache_decodes_as_a_forward_without_one(kind, window):
    d = DRIVERS[kind](WINDOWED) if window else DRIVERS[kind]()
    assert isinstance(d.cache, KVCache)
    assert isinstance(d.cache, LayerKVCache) == (kind in LAYER)
    assert isinstance(d.cache, GeneratorKVCache) == (kind in GENERATOR)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, V, (B, T0), generator=g)
    logits = d.step(seq)
    torch.testing.assert_close(logits, d.ref(seq), rtol=1e-4, atol=1e-4)
    while seq.shape[1] < CAP:
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
        logits = d.step(tok)
        torch.testing.assert_close(logits, d.ref(seq), rtol=1e-4, atol=1e-4)
    if window:  # the window changed the logits: the caches did not just attend to everything
        full = gpt(dataclasses.replace(d.model.cfg, sliding_window=None))
        assert (full(seq)[0][:, -1] - d.ref(seq)).abs().max() > 1e-3
    if d.capacity:  # full: the next token is refused, not written past the end
        with pytest.raises(ValueError, match="full"):
            d.step(logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("kind, window",
                         [(k, False) for k in sorted(GENERATOR)] + [("ort", True), ("preallocated", True)])
@torch.no_grad()
def test_generator_caches_restart_with_left_padding_and_reorder_rows(kind, window):
    """What Generator._left_padded and beam search do: rows of different lengths left-padded
    (reset(start)), then rows repeated and swapped (index_rows); each row decodes as it would alone
    (with a window: the band counts slots from each row's own tokens, not from the padding)."""
    d = DRIVERS[kind](WINDOWED) if window else DRIVERS[kind]()
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (5, 3)]
    padded = torch.zeros(B, 5, dtype=torch.long)
    padded[0], padded[1, 2:] = rows[0], rows[1]
    d.cache.reset(torch.tensor([0, 2]))
    assert d.cache.pos == 0 and d.cache.max_len == CAP
    logits = d.step(padded)
    assert d.cache.pos == 5
    order = torch.tensor([1, 0, 1])
    d.cache.index_rows(order)
    seqs = [rows[i] for i in order.tolist()]
    tok = torch.tensor([[7], [8], [9]])
    out = d.step(tok)
    for b, s in enumerate(seqs):
        alone = torch.cat([s, tok[b]])[None]
        if kind == "seq2seq":  # the source rows follow the decoder rows
            src, valid = d.src[order[b]][None], d.valid[order[b]][None]
            ref = d.model(src, alone, src_valid=valid)[0][:, -1]
        else:
            ref = d.model(alone)[0][:, -1]
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-4, atol=1e-4)
    assert logits.shape[0] == B and d.cache.pos == 6


# ----------------------------------------------------------------------------- BatchCache
def prefilled(model, rows: list[torch.Tensor], n_rows: int = 4) -> BatchCache:
    bc = BatchCache(model.cfg, rows=n_rows)
    for r, ids in enumerate(rows):
        tmp = PreallocatedKVCache(model.cfg, 1, max_len=len(ids))
        model(ids[None], kv_cache=tmp)
        bc.put(r, tmp, len(ids))
    return bc


@torch.no_grad()
def test_batch_cache_rows_of_different_lengths_decode_as_each_alone():
    m = gpt()
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, V, (n,), generator=g) for n in (3, 7, 5)]
    bc = prefilled(m, rows)
    assert bc.lens == [3, 7, 5, 0]
    for step in range(3):
        bc.begin(3)
        assert bc._mask is not None  # different lengths: each row masks the slots past its own end
        tok = torch.tensor([[11 + step], [12 + step], [13 + step]])
        out = m(tok, kv_cache=bc, last_only=True)[0][:, -1]
        rows = [torch.cat([r, t]) for r, t in zip(rows, tok)]
        for b, r in enumerate(rows):
            torch.testing.assert_close(out[b:b + 1], m(r[None])[0][:, -1], rtol=1e-4, atol=1e-4)
    assert bc.lens == [6, 10, 8, 0]


@torch.no_grad()
def test_batch_cache_equal_lengths_need_no_mask_and_rows_move():
    m = gpt()
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, V, (4,), generator=g) for _ in range(3)]
    bc = prefilled(m, rows)
    bc.begin(3)
    assert bc._mask is None  # one length: plain attention over every slot
    bc.move(2, 0)  # row 0 finished: the last row takes its place (rows stay dense)
    assert bc.lens == [4, 4, 0, 0]
    bc.begin(2)
    tok = torch.tensor([[5], [6]])
    out = m(tok, kv_cache=bc, last_only=True)[0][:, -1]
    for b, r in enumerate([rows[2], rows[1]]):
        torch.testing.assert_close(out[b:b + 1], m(torch.cat([r, tok[b]])[None])[0][:, -1], rtol=1e-4, atol=1e-4)


def test_batch_cache_limits_and_dtype():
    cfg = dataclasses.replace(LLAMA, block_size=4)
    bc = BatchCache(cfg, rows=2, dtype=torch.bfloat16)
    bc.lens = [2, 4]
    with pytest.raises(ValueError, match="full"):  # row 1 has no slot left for another token
        bc.begin(2)
    bc.begin(1)
    with pytest.raises(ValueError, match="one-token"):
        bc.prepare(2)
    assert bc.prepare(1).tolist() == [[2]]  # a row's position is its length
    k = torch.randn(1, cfg.kv_heads, 1, cfg.head_dim)  # fp32 from the model: stored as the cache's bf16
    keys, values, mask = bc.update(0, k, k)
    assert keys.dtype == torch.bfloat16 and keys.shape == (1, cfg.kv_heads, 3, cfg.head_dim) and mask is None
    torch.testing.assert_close(keys[:, :, 2].float(), k[:, :, 0], rtol=1e-2, atol=1e-2)
    bc.advance(1)
    assert bc.lens == [3, 4]


def test_onnx_cache_positions_and_mask_follow_left_padding():
    c = OrtCache(LLAMA, 2, 8)
    c.reset(torch.tensor([0, 2]))
    assert c.prepare(4).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert c.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    c.advance(4)
    assert c.prepare(1).tolist() == [[4], [2]] and c.mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="KV cache full: 4 \\+ 5 tokens exceed its 8 slots"):
        c.prepare(5)
