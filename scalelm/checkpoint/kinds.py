"""What kind of model a directory holds, from its files alone, and one way for a command to refuse one.

Every command that takes a model calls :func:`require_kind` first (before loading or writing
anything), so a model it cannot handle is one line naming the kinds it can, never a traceback
from deep in a loader. The kind is read from ``config.json`` and the file names (no
weights read)::

    facet              how it is recognised
    gpt                model.arch "gpt" (the default): GPT, Llama-style, pruned, sft, decoder-only translation
    encoder-decoder    model.arch "encoder-decoder"
    encoder            model.arch "encoder" (BERT / ModernBERT: a masked LM, it does not generate)
    lora               adapter.safetensors (or a sharded checkpoint) + a "lora" entry
    quantized          a "quantization" entry
    classifier         a "task" entry named "classify" (head.safetensors, or head.* in the adapters)
    translation        a "task" entry named "translate" (not a facet: a task a command may need)

A model has one architecture facet and any of the others (a LoRA classifier is ``gpt`` +
``lora`` + ``classifier``); a command supports it when it supports every facet it has, and, if
the command ``needs`` one (``merge`` needs ``lora``, ``classify`` needs ``classifier``), that
one is among them. :func:`model_kind` names the one most specific kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..errors import UserError
from .model_dir import read_config
from .names import ADAPTER, DCP_METADATA
from .rundir import resolve_checkpoint

GPT, ENCDEC, ENCODER, LORA, QUANTIZED, CLASSIFIER, TRANSLATION = (
    "gpt", "encoder-decoder", "encoder", "lora", "quantized", "classifier", "translation")
ARCHS = (GPT, ENCDEC, ENCODER)  # model.arch: one of these facets per model
FACETS = (GPT, ENCDEC, ENCODER, LORA, QUANTIZED, CLASSIFIER)  # what decides whether a command can load and write it
KINDS = (GPT, LORA, CLASSIFIER, QUANTIZED, ENCDEC, ENCODER)  # model_kind's answers
# config.json "task" name -> kind (a summarizer is a sequence-to-sequence model as a translator is)
TASKS = {"classify": CLASSIFIER, "translate": TRANSLATION, "summarize": TRANSLATION}

# the kinds a command typically takes (commands pass their own tuple; these name the common ones)
LANGUAGE_MODELS = (GPT, LORA, QUANTIZED, CLASSIFIER)  # read as a decoder-only LM (a classifier's GPT is one)
FLOAT_LANGUAGE_MODELS = (GPT, LORA, CLASSIFIER)  # the same, where float weights are needed (training from it)

# what to do instead, by the facet that made a command refuse (when the caller gives no hint)
DEFAULT_HINTS = {
    ENCDEC: "use it with `scalelm translate` or `scalelm eval --task translate`",
    ENCODER: "an encoder predicts masked tokens and does not generate: score it with `scalelm eval --data DATA_DIR`, "
             "convert it (`scalelm convert --to-hf`) or fine-tune it (`scalelm finetune classify|tokens`)",
    QUANTIZED: "use the float model it was made from",
    CLASSIFIER: "use it with `scalelm classify` or `scalelm eval --task classify`",
    LORA: "fold the adapters into a model directory first (`scalelm merge RUN --out MODEL_DIR`)",
}
# ... and by the kind a command needs that the model is not
NEEDS_WORDS = {CLASSIFIER: "a classifier", TRANSLATION: "a translation model", LORA: "a LoRA checkpoint"}
NEEDS_HINTS = {
    CLASSIFIER: "train one with `scalelm finetune classify`",
    TRANSLATION: "train one with `scalelm finetune translate`",
    LORA: "it holds no LoRA adapters",
}


@dataclass(frozen=True)
class ModelKind:
    """What a model directory holds (see the module docstring)."""

    path: Path  # the resolved directory (a RUN_DIR's latest checkpoint)
    arch: str  # "gpt" | "encoder-decoder" | "encoder"
    lora: bool = False
    quantization: Optional[str] = None  # "int8" | "int4" ("" when damaged; None: float weights)
    task: Optional[str] = None  # config.json's "task" name: "classify", "translate", "sft", ...
    labels: int = 0  # a classifier's number of labels
    llama: bool = False  # RoPE + SwiGLU (Llama-style)
    pruned: bool = False

    @property
    def facets(self) -> frozenset:
        f = {self.arch if self.arch in ARCHS else GPT}
        if self.lora:
            f.add(LORA)
        if self.quantization is not None:
            f.add(QUANTIZED)
        if self.task == "classify":
            f.add(CLASSIFIER)
        return frozenset(f)

    @property
    def tags(self) -> frozenset:
        """The facets and the task's kind (``translation``), for a command's ``needs``."""
        return self.facets | ({TASKS[self.task]} if self.task in TASKS else set())

    @property
    def kind(self) -> str:
        """The one most specific kind: encoder-decoder, classifier, encoder, lora, quantized or gpt."""
        for k in (ENCDEC, CLASSIFIER, ENCODER, LORA, QUANTIZED):
            if k in self.facets:
                return k
        return GPT

    def describe(self) -> str:
        """``an encoder-decoder model (translation)``, ``a LoRA classifier (2 labels)``, ..."""
        words, notes = [], []
        if self.quantization is not None:
            words.append(f"{self.quantization}-quantized" if self.quantization else "quantized")
        if self.pruned:
            words.append("pruned")
        shape = "Llama-style" if self.llama else "GPT"
        if self.arch == ENCDEC:
            words += ["LoRA"] * self.lora + ["encoder-decoder model"]
        elif self.task == "classify":
            words += ["LoRA"] * self.lora + ["classifier"]
            if self.arch == ENCODER:
                notes.append("on an encoder")
        elif self.arch == ENCODER:
            words += ["LoRA"] * self.lora + ["masked-LM encoder"]
        elif self.lora:
            words.append("LoRA checkpoint")
            notes.append(f"adapters on a {shape} model")
        else:
            words.append(f"{shape} language model")
        notes.append({"classify": f"{self.labels} labels" if self.labels else "", "translate": "translation",
                      "summarize": "summarization", "sft": "instruction-tuned"}.get(self.task or "", self.task or ""))
        text = " ".join(words)
        article = "an" if text[0] in "aeiouAEIO" or text.startswith("int") else "a"
        notes = [n for n in notes if n]
        return f"{article} {text}" + (f" ({', '.join(notes)})" if notes else "")


def read_kind(path: Union[str, Path]) -> ModelKind:
    """The kind of a model directory, or of a RUN_DIR's latest checkpoint (``config.json`` and file
    names only; a missing or damaged ``config.json`` is the loaders' ``CheckpointError``)."""
    d = resolve_checkpoint(path)
    meta = read_config(d)
    model = meta["model"]
    task = meta.get("task")
    task_name = task.get("name") if isinstance(task, dict) else (task if isinstance(task, str) else None)
    labels = task.get("labels") if isinstance(task, dict) else None
    quant = meta.get("quantization")
    scheme = quant.get("scheme") if isinstance(quant, dict) else None  # a damaged entry: the loader says so
    return ModelKind(
        path=d,
        arch=model.get("arch") if model.get("arch") in ARCHS else GPT,
        lora=isinstance(meta.get("lora"), dict) and ((d / ADAPTER).is_file() or (d / DCP_METADATA).is_file()),
        quantization=None if quant is None else str(scheme or ""),
        task=task_name if isinstance(task_name, str) else None,
        labels=len(labels) if isinstance(labels, list) else 0,
        llama=model.get("pos_embedding") == "rope" and model.get("mlp") in ("swiglu", "geglu"),
        pruned="pruning" in meta,
    )


def model_kind(path: Union[str, Path]) -> str:
    """One of :data:`KINDS`: ``"encoder-decoder"``, ``"classifier"`` (a LoRA one too), ``"lora"``,
    ``"quantized"`` or ``"gpt"`` (GPT, Llama-style, pruned, instruction-tuned, decoder-only translation)."""
    return read_kind(path).kind


# ----------------------------------------------------------------------------- refusing

_FACET_WORDS = {GPT: "GPT, Llama-style, pruned", QUANTIZED: "quantized", LORA: "LoRA", CLASSIFIER: "classifiers",
                ENCDEC: "encoder-decoder", ENCODER: "encoders"}


def _join(words: list[str], last: str = " or ") -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + last + words[-1]


def supported_phrase(supported: tuple, needs: Optional[str] = None) -> str:
    """The kinds a command works with, in words: ``decoder-only language models (GPT, Llama-style,
    pruned, quantized, LoRA)``, ``classifiers (full or LoRA)``, ``LoRA runs (...)`` ..."""
    s = set(supported)
    if needs == CLASSIFIER:
        how = [w for w in ("full" if GPT in s else "", "LoRA" if LORA in s else "",
                           "quantized" if QUANTIZED in s else "") if w]
        return "classifiers of `scalelm finetune classify` (" + _join(how) + ")"
    if needs == LORA:
        of = [w for w in ("GPT or Llama-style models" if GPT in s else "", "classifiers" if CLASSIFIER in s else "",
                          "encoder-decoder models" if ENCDEC in s else "") if w]
        return "LoRA runs (adapters on " + _join(of, " and ") + ")"
    if needs == TRANSLATION:
        archs = [w for w in ("decoder-only" if GPT in s else "", "encoder-decoder" if ENCDEC in s else "") if w]
        more = [w for w in ("LoRA" if LORA in s else "", "quantized" if QUANTIZED in s else "") if w]
        return "translation models of `scalelm finetune translate` (" + ", ".join([_join(archs)] + more) + ")"
    words = [_FACET_WORDS[f] for f in (GPT, QUANTIZED, LORA, CLASSIFIER) if f in s]
    if ENCODER in s and ENCDEC not in s:
        enc = "encoders (BERT-style masked LMs)"
        return enc if GPT not in s else "decoder-only language models (" + ", ".join(words) + ") and " + enc
    if ENCDEC in s:
        return _join(words + ["encoder-decoder models"], " and ") if words else "encoder-decoder models"
    return "decoder-only language models (" + ", ".join(words) + ")"


def require_kind(path_or_kind: Union[str, Path, ModelKind], command: str, supported: tuple,
                 hint: Union[str, dict] = "", needs: Optional[str] = None) -> ModelKind:
    """Refuse a model ``command`` cannot handle, with one line naming what it works with::

        `scalelm eval --harness` works with decoder-only language models (GPT, Llama-style, pruned,
        quantized, LoRA, classifiers); runs/ed/best is an encoder-decoder model (translation): score
        it with `scalelm eval --task translate`

    ``supported``: the facets (:data:`FACETS`) the command handles; the model must have only those.
    ``needs``: a kind the model must also be (``lora``, ``classifier``, ``translation``). ``hint``:
    what to do instead, or ``{kind: hint}`` by the facet that refused (or the kind needed); by
    default :data:`DEFAULT_HINTS` / :data:`NEEDS_HINTS`. Returns the
    model's :class:`ModelKind`. Raises ``UserError`` (or the loaders' ``CheckpointError`` for a
    path that holds no model)."""
    kind = path_or_kind if isinstance(path_or_kind, ModelKind) else read_kind(path_or_kind)
    command = command if command.startswith("`") else f"`{command}`"
    unsupported = [f for f in (ENCDEC, ENCODER, QUANTIZED, CLASSIFIER, LORA, GPT)
                   if f in kind.facets and f not in supported]
    missing = needs is not None and needs not in kind.tags
    if not unsupported and not missing:
        return kind
    why_kind = needs if missing else unsupported[0]
    hints = {**(NEEDS_HINTS if missing else DEFAULT_HINTS), **(hint if isinstance(hint, dict) else {})}
    why = hint if isinstance(hint, str) and hint else hints.get(why_kind, "")
    what = kind.describe() + (f", not {NEEDS_WORDS.get(needs, needs)}" if missing else "")
    raise UserError(f"{command} works with {supported_phrase(tuple(supported), needs)}; {kind.path} is {what}"
                    + (f": {why}" if why else ""))
