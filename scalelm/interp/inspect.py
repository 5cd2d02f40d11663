"""What a language model does with one text: each token's loss and surprisal, its top predictions,
the logit lens, and every layer's attention (``scalelm inspect``; the report is in report_html.py,
the pictures in figures.py).

    ins = inspect_text(model, tokenizer, "To be, or not to be")
    ins.rows()          # per token: text, loss (nats), surprisal (bits), the top-k next tokens
    ins.lens_top        # per layer, per position: what the stream after that many layers decodes to

The logit lens (nostalgebraist, 2020) reads the residual stream after each layer through the model's
own final norm and LM head: row 0 is the embeddings, row L the stream after L layers (the last row
is the model's output). The same numbers as TransformerLens' ``logit_lens`` (tests/interp/test_parity.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .hooks import HookError, capture, is_encdec, target_module

LN2 = math.log(2.0)


def lens_streams(model, cache) -> list[torch.Tensor]:
    """The residual streams the logit lens reads: the input of each layer, then the last one's output."""
    m = target_module(model)
    pre = "decoder.blocks" if is_encdec(m) else "blocks"
    layers = sorted({int(k.split(".")[-2]) for k in cache if k.startswith(pre) and k.endswith(".resid_pre")})
    if not layers:
        raise HookError(f"the logit lens reads {pre}.*.resid_pre and the last resid_post: capture them first")
    return [cache[f"{pre}.{L}.resid_pre"] for L in layers] + [cache[f"{pre}.{layers[-1]}.resid_post"]]


@torch.no_grad()
def logit_lens(model, cache) -> torch.Tensor:
    """``(n_layer + 1, B, T, vocab)`` logits: each stream of :func:`lens_streams` through the final norm
    and LM head. Call it outside a ``capture`` of ``final_norm``/``logits`` (it runs those modules)."""
    m = target_module(model)
    head = m.head_logits if hasattr(type(m), "head_logits") else m.lm_head  # with the model's logit soft-cap
    return torch.stack([head(m.norm_f(s)) for s in lens_streams(m, cache)])


@dataclass
class Inspection:
    """Everything ``scalelm inspect`` shows, as plain lists (JSON-ready) plus the attention tensor."""
    ids: list[int]
    pieces: list[str]  # each token's text
    loss: list[Optional[float]]  # nats; None for the first token (nothing predicts it)
    top: list[list[tuple[int, str, float]]]  # per position: the k likeliest next tokens (id, text, prob)
    lens_labels: list[str]
    lens_top: list[list[list[tuple[int, str, float]]]]  # [layer row][position] -> top tokens
    attention: torch.Tensor  # (n_layer, n_head, T, T), fp32
    meta: dict = field(default_factory=dict)

    @property
    def surprisal(self) -> list[Optional[float]]:
        return [None if x is None else x / LN2 for x in self.loss]

    @property
    def mean_loss(self) -> Optional[float]:
        xs = [x for x in self.loss if x is not None]
        return sum(xs) / len(xs) if xs else None

    def to_json(self, attention: bool = True) -> dict:
        def tops(ts):
            return [{"id": i, "text": t, "prob": round(p, 6)} for i, t, p in ts]

        out = {**self.meta, "tokens": [
            {"pos": i, "id": t, "text": s, "loss": None if lo is None else round(lo, 6),
             "surprisal_bits": None if lo is None else round(lo / LN2, 6), "top": tops(self.top[i])}
            for i, (t, s, lo) in enumerate(zip(self.ids, self.pieces, self.loss))]}
        mean = self.mean_loss
        out["mean_loss"] = None if mean is None else round(mean, 6)
        out["perplexity"] = None if mean is None else round(math.exp(mean), 4)
        out["logit_lens"] = {"labels": self.lens_labels,
                             "top": [[tops(cell) for cell in row] for row in self.lens_top]}
        if attention:
            out["attention"] = {"shape": list(self.attention.shape),
                                "weights": self.attention.mul(1e4).round().div(1e4).tolist()}
        return out


def token_text(tokenizer, i: int) -> str:
    return tokenizer.decode([i], skip_special_tokens=False) if tokenizer is not None else f"<{i}>"


def _tops(probs: torch.Tensor, k: int, tokenizer) -> list[list[tuple[int, str, float]]]:
    """(T, V) probabilities -> per row the k likeliest (id, text, prob)."""
    p, i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[(int(a), token_text(tokenizer, int(a)), float(b)) for a, b in zip(ir, pr)]
            for ir, pr in zip(i.tolist(), p.tolist())]


@torch.no_grad()
def inspect_ids(model, ids: list[int], tokenizer=None, top_k: int = 5, lens_k: int = 3) -> Inspection:
    """Inspect a decoder-only model on token ids (one forward with every hook the report reads)."""
    m = target_module(model)
    if is_encdec(m):
        raise HookError("inspect reads decoder-only language models; for the encoder-decoder use capture() with "
                        "encoder.* / decoder.* names")
    if not ids:
        raise HookError("nothing to inspect: the text has no tokens")
    if len(ids) > m.cfg.block_size:
        raise HookError(f"the text has {len(ids)} tokens but the model's context is {m.cfg.block_size}: shorten it")
    dev = next(m.parameters()).device
    idx = torch.tensor([ids], device=dev)
    with capture(m, ["blocks.*.resid_pre", "blocks.*.resid_post", "blocks.*.attn.pattern"]) as cache:
        logits = m(idx)[0][0].float()
    logp = logits.log_softmax(-1)
    nxt = torch.tensor(ids[1:], device=dev)
    loss = [None] + (-logp[:-1].gather(1, nxt[:, None])[:, 0]).tolist()
    lens = logit_lens(m, cache)[:, 0].float().softmax(-1)  # (rows, T, V)
    layers = [int(k.split(".")[1]) for k in cache if k.endswith("attn.pattern")]
    attention = torch.stack([cache[f"blocks.{L}.attn.pattern"][0] for L in sorted(layers)]).cpu()
    return Inspection(
        ids=list(ids), pieces=[token_text(tokenizer, i) for i in ids], loss=loss,
        top=_tops(logp.exp(), top_k, tokenizer),
        lens_labels=["embed"] + [f"layer {L}" for L in range(1, len(lens))],
        lens_top=[_tops(row, lens_k, tokenizer) for row in lens], attention=attention)


def inspect_text(model, tokenizer, text: str, top_k: int = 5, lens_k: int = 3, bos_id: Optional[int] = None
                 ) -> Inspection:
    """:func:`inspect_ids` on ``text`` (with ``bos_id`` first, if given: then the first token is scored too)."""
    ids = tokenizer.encode(text).ids
    return inspect_ids(model, ([bos_id] if bos_id is not None else []) + ids, tokenizer, top_k, lens_k)


def show(s: str, width: int = 12) -> str:
    """A token's text for a terminal table: escapes visible, spaces as ␣, long ones cut."""
    r = repr(s)[1:-1].replace(" ", "\u2423")
    return r if len(r) <= width else r[:width - 1] + "…"


def format_table(ins: Inspection) -> str:
    """The per-token table and the logit-lens table, as ``scalelm inspect`` prints them."""
    lines = [f"{'pos':>4}  {'token':<14}{'loss':>8}{'bits':>8}  top next tokens"]
    for i, (piece, lo) in enumerate(zip(ins.pieces, ins.loss)):
        tops = "  ".join(f"{show(t, 10)!s} {p:.2f}" for _, t, p in ins.top[i])
        lo_s, bits = ("-", "-") if lo is None else (f"{lo:.3f}", f"{lo / LN2:.2f}")
        lines.append(f"{i:>4}  {show(piece):<14}{lo_s:>8}{bits:>8}  {tops}")
    mean = ins.mean_loss
    if mean is not None:
        lines.append(f"mean loss {mean:.4f} nats ({mean / LN2:.3f} bits), perplexity {math.exp(mean):.2f}")
    lines += ["", "logit lens: the top token each position's stream decodes to after each layer"]
    heads = [lab.replace("layer ", "L") for lab in ins.lens_labels]
    lines.append(f"{'pos':>4}  {'token':<12}" + "".join(f"{h:<11}" for h in heads))
    for i, piece in enumerate(ins.pieces):
        cells = "".join(f"{show(row[i][0][1], 10):<11}" for row in ins.lens_top)
        lines.append(f"{i:>4}  {show(piece, 11):<12}{cells}")
    return "\n".join(lines)
