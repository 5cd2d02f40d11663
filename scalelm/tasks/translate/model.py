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
from .data import cut_source
from .decoding import Translations, translate_rows

SEPARATOR = "=>"
TASK = "translate"
TASK_NAMES = (TASK, "summarize")  # config.json "task" names of the models of this recipe (one sequence-to-sequence kind)


class TranslationModel(Protocol):
    arch: str

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_length: int) -> tuple[list, object]:
        """Training examples of ``(source, target)`` pairs (and a report of what was cut or dropped)."""

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The mean loss of a batch (the Trainer's ``loss_fn``; ``model`` is the parallelised module)."""

    def reference_loss(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> tuple[float, int]:
        """(summed nats, tokens) of each target given its source, as training counts them."""

    def translate(self, sources: Sequence[str], beams: int = 1, batch_size: int = 32,
                  max_new_tokens: int | None = None, **controls) -> Translations:
        """One translation (or summary) per source, in order (greedy with ``beams=1``), each as it
        would be alone, with what the context limit cut (:class:`~.decoding.Translations`);
        ``controls``: :data:`~.decoding.CONTROLS`."""


class DecoderTranslator:
    """A GPT that continues ``"{source} =>"`` with ``" {target}<|endoftext|>"``."""

    arch = "decoder"

    def __init__(self, gpt: nn.Module, tokenizer, eot_id: int, separator: str = SEPARATOR,
                 max_source_length: int | None = None, budget: int | None = None):
        self.gpt, self.tokenizer, self.eot_id, self.separator = gpt, tokenizer, eot_id, separator
        self.max_source_length = max_source_length  # sources are cut to this many tokens (training and inference)
        self.budget = budget  # new tokens when the caller gives none (a summarizer's; else 2x the source + 16)
        self._gen = None
        self.sources_truncated = 0  # by max_source_length, in the last encode_pairs

    # ------------------------------------------------------------------ text
    def prompt(self, source: str) -> str:
        return f"{source.strip()} {self.separator}"

    def reply(self, target: str) -> str:
        return f" {target.strip()}{self.tokenizer.id_to_token(self.eot_id)}"

    def encode_pairs(self, pairs, max_length: int):
        from ..sft.encode import Encoder

        enc = Encoder(self.tokenizer, None, max_length)
        cut = [cut_source(self.tokenizer, s, self.max_source_length) for _, (s, _) in pairs]
        self.sources_truncated = sum(c for _, c in cut)
        return enc.encode_all([(w, [(self.prompt(c), False), (self.reply(t), True)])
                               for (w, (_, t)), (c, _) in zip(pairs, cut)], segments=True)

    # ------------------------------------------------------------------ training
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        from ..sft.objective import sft_loss

        return sft_loss(model, batch)

    def reference_loss(self, pairs, batch_size: int = 32) -> tuple[float, int]:
        """(summed nats, tokens) of each target, end-of-text included, given its source: the training loss."""
        from ...train.validation import loss_sums
        from ..sft.batches import eval_batches

        examples, _, _ = self.encode_pairs(list(enumerate(pairs)), self.gpt.cfg.block_size)
        return loss_sums(self.gpt, eval_batches(examples, batch_size), next(self.gpt.parameters()).device)

    # ------------------------------------------------------------------ inference
    def generator(self):
        if self._gen is None:
            from ...generate.generator import Generator

            self._gen = Generator(self.gpt, self.tokenizer, [self.eot_id], self.eot_id)
        return self._gen

    def translate(self, sources: Sequence[str], beams: int = 1, batch_size: int = 32,
                  max_new_tokens: int | None = None, **controls) -> Translations:
        """One line per source, in order; an empty source gives ''. Each source is translated as it
        would be alone (see :mod:`.decoding`), first cut to ``max_source_length`` tokens as in
        training. A source whose prompt still fills the context is cut to its first tokens, half
        the context (the other half is the translation's), and reported."""
        if beams < 1 or batch_size < 1:
            raise UserError("--beams and --batch-size must be at least 1")
        gen = self.generator()
        T = self.gpt.cfg.block_size
        sep = self.tokenizer.encode(f" {self.separator}", add_special_tokens=False).ids
        kept = max(1, (T - len(sep)) // 2)
        rows, cut = [], []
        for i, s in enumerate(sources):
            s = cut_source(self.tokenizer, s.strip(), self.max_source_length)[0]
            ids = self.tokenizer.encode(self.prompt(s), add_special_tokens=False).ids if s.strip() else None
            if ids is not None and len(ids) >= T:  # no room left for a translation
                ids = self.tokenizer.encode(s.strip(), add_special_tokens=False).ids[:kept] + sep
                cut.append(i)
            rows.append(ids)
        return translate_rows(gen, self.tokenizer, rows, beams, batch_size, max_new_tokens, cut, kept,
                              self.budget, **controls)


def load_decoder(model_dir: Path, device="cpu", verify: bool = True) -> DecoderTranslator:
    from tokenizers import Tokenizer

    from ...data.tokenizer import special_ids
    from ...model.io import load_model_dir
    from ...runs import TOKENIZER

    task = read_task(model_dir)
    gpt = load_model_dir(model_dir, device=device, verify=verify).eval()
    tok = Tokenizer.from_file(str(Path(model_dir) / TOKENIZER))
    eot = task.get("eot_id", special_ids(tok)[0])
    return DecoderTranslator(gpt, tok, eot, task.get("separator", SEPARATOR), task.get("max_source_length"),
                             task.get("max_new_tokens"))


def load_encdec(model_dir: Path, device="cpu", verify: bool = True) -> TranslationModel:
    from tokenizers import Tokenizer

    from ...data.tokenizer import special_ids
    from ...model.io import load_model_dir
    from ...runs import TOKENIZER
    from .encdec import EncDecTranslator

    task = read_task(model_dir)
    model = load_model_dir(model_dir, device=device, verify=verify).eval()
    tok = Tokenizer.from_file(str(Path(model_dir) / TOKENIZER))
    return EncDecTranslator(model, tok, task.get("eot_id", special_ids(tok)[0]),
                            max_source_length=task.get("max_source_length"), budget=task.get("max_new_tokens"))


# arch -> loader(model_dir, device, verify) of a model directory written by `scalelm finetune translate`
ARCHS: dict[str, Callable[..., TranslationModel]] = {"decoder": load_decoder, "encoder-decoder": load_encdec}


def read_task(model_dir: Path) -> dict:
    import json

    from ...checkpoint.names import CONFIG
    from ...errors import CheckpointError

    p = Path(model_dir) / CONFIG
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is missing or corrupt ({e})") from None
    task = meta.get("task") if isinstance(meta, dict) else None
    if not isinstance(task, dict) or task.get("name") not in TASK_NAMES:
        raise CheckpointError(f"{model_dir} is not a translation or summarization model (its config.json has no "
                              f"translate or summarize task): train one with `scalelm finetune translate|summarize`")
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
