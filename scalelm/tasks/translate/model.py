"""Translation models behind one small interface, so the commands do not care which kind it is.

A :class:`TranslationModel` says how a sentence pair becomes a training example, what the loss
of a batch is, and how sources are translated (greedy, or beam search). ``DecoderTranslator`` is a
decoder-only GPT reading ``"source => target"``: the source and the separator are the prompt, the
target (ended by end-of-text) is the reply, the only tokens in the loss. Another kind (an
encoder-decoder) registers its loader in :data:`ARCHS` under the ``"arch"`` its model directory's
``config.json`` ``"task"`` entry names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ...errors import UserError

SEPARATOR = "=>"
TASK = "translate"


class TranslationModel(Protocol):
    arch: str

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int) -> tuple[list, object]:
        """Training examples of ``(source, target)`` pairs (and a report of what was cut or dropped)."""

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The mean loss of a batch (the Trainer's ``loss_fn``; ``model`` is the parallelised module)."""

    def translate(self, sources: Sequence[str], beams: int = 1, batch_size: int = 32,
                  max_new_tokens: int | None = None) -> list[str]:
        """One translation per source, in order (greedy with ``beams=1``)."""


class DecoderTranslator:
    """A GPT that continues ``"{source} =>"`` with ``" {target}<|endoftext|>"``."""

    arch = "decoder"

    def __init__(self, gpt: nn.Module, tokenizer, eot_id: int, separator: str = SEPARATOR):
        self.gpt, self.tokenizer, self.eot_id, self.separator = gpt, tokenizer, eot_id, separator
        self._gen = None

    # ------------------------------------------------------------------ text
    def prompt(self, source: str) -> str:
        return f"{source.strip()} {self.separator}"

    def reply(self, target: str) -> str:
        return f" {target.strip()}{self.tokenizer.id_to_token(self.eot_id)}"

    def encode_pairs(self, pairs, max_length: int):
        from ..sft.encode import Encoder

        enc = Encoder(self.tokenizer, None, max_length)
        return enc.encode_all([(w, [(self.prompt(s), False), (self.reply(t), True)]) for w, (s, t) in pairs],
                              segments=True)

    # ------------------------------------------------------------------ training
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        from ..sft.objective import sft_loss

        return sft_loss(model, batch)

    # ------------------------------------------------------------------ inference
    def generator(self):
        if self._gen is None:
            from ...generate.generator import Generator

            self._gen = Generator(self.gpt, self.tokenizer, [self.eot_id], self.eot_id)
        return self._gen

    def translate(self, sources: Sequence[str], beams: int = 1, batch_size: int = 32,
                  max_new_tokens: int | None = None) -> list[str]:
        """Batched by length (least padding), answered in input order; an empty source gives ''."""
        from ...generate.sampling import SamplingParams

        GREEDY = SamplingParams(temperature=0.0)
        gen = self.generator()
        if beams < 1 or batch_size < 1:
            raise UserError("--beams and --batch-size must be at least 1")
        if beams > 1 and not hasattr(gen, "beam_search"):
            raise UserError("beam search is not available in this scalelm: use --beams 1 (greedy)")
        T = self.gpt.cfg.block_size
        prompts = [self.tokenizer.encode(self.prompt(s), add_special_tokens=False).ids for s in sources]
        out = [""] * len(sources)
        todo = sorted((i for i, s in enumerate(sources) if s.strip()), key=lambda i: len(prompts[i]))
        for lo in range(0, len(todo), batch_size):
            idx = todo[lo:lo + batch_size]
            rows = [prompts[i][-(T - 1):] for i in idx]  # a source longer than the context keeps its end
            longest = max(map(len, rows))
            n = max_new_tokens or 2 * longest + 16  # targets are about as long as sources
            n = max(1, min(n, T - longest))
            if beams > 1:
                comps = gen.beam_search(rows, num_beams=beams, max_new_tokens=n)
            else:
                comps = gen.generate(rows, max_new_tokens=n, sampling=GREEDY)
            for i, c in zip(idx, comps):
                out[i] = " ".join(self.tokenizer.decode(c.tokens).split())  # one line per input line
        return out


def load_decoder(model_dir: Path, device="cpu", verify: bool = True) -> DecoderTranslator:
    from tokenizers import Tokenizer

    from ...data.tokenizer import special_ids
    from ...model.io import load_model_dir
    from ...runs import TOKENIZER

    task = read_task(model_dir)
    gpt = load_model_dir(model_dir, device=device, verify=verify).eval()
    tok = Tokenizer.from_file(str(Path(model_dir) / TOKENIZER))
    eot = task.get("eot_id", special_ids(tok)[0])
    return DecoderTranslator(gpt, tok, eot, task.get("separator", SEPARATOR))


def load_encdec(model_dir: Path, device="cpu", verify: bool = True) -> TranslationModel:
    from tokenizers import Tokenizer

    from ...data.tokenizer import special_ids
    from ...model.io import load_model_dir
    from ...runs import TOKENIZER
    from .encdec import EncDecTranslator

    task = read_task(model_dir)
    model = load_model_dir(model_dir, device=device, verify=verify).eval()
    tok = Tokenizer.from_file(str(Path(model_dir) / TOKENIZER))
    return EncDecTranslator(model, tok, task.get("eot_id", special_ids(tok)[0]))


# arch -> loader(model_dir, device, verify) of a model directory written by `scalelm finetune translate`
ARCHS: dict[str, Callable[..., TranslationModel]] = {"decoder": load_decoder, "encoder-decoder": load_encdec}


def read_task(model_dir: Path) -> dict:
    import json

    from ...errors import CheckpointError

    p = Path(model_dir) / "config.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is missing or corrupt ({e})") from None
    task = meta.get("task") if isinstance(meta, dict) else None
    if not isinstance(task, dict) or task.get("name") != TASK:
        raise CheckpointError(f"{model_dir} is not a translation model (its config.json has no translate task): "
                              f"train one with `scalelm finetune translate`")
    return task


def load_translator(path: str | Path, device="cpu", verify: bool = True) -> TranslationModel:
    """The translation model of a model directory or a RUN_DIR (its latest checkpoint)."""
    from ...runs import resolve_checkpoint

    d = resolve_checkpoint(path)
    arch = read_task(d).get("arch", "decoder")
    if arch not in ARCHS:
        raise UserError(f"{d} holds a translation model of kind {arch!r}, which this scalelm cannot load "
                        f"(known: {', '.join(ARCHS)})")
    return ARCHS[arch](d, device=device, verify=verify)
