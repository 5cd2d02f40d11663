"""Every command against every kind of model: it works (exit 0), or it refuses in exactly one line
that names the kinds it works with (exit 2); never a traceback.

One tiny model of each kind is written directly with the save functions (no training): a GPT, a
Llama-style GPT, a LoRA run, a classifier, a LoRA classifier, a quantized model, a structurally
pruned model, a decoder-only translation model, an encoder-decoder translation model and a masked-LM
encoder (BERT / ModernBERT: it never generates). The
kind checks themselves (:mod:`scalelm.checkpoint.kinds`) are tested first.
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pytest
from train_helpers import char_tokenizer, make_char_data

pytestmark = pytest.mark.usefixtures("torch_one_thread")

WORDS = "the a king queen good bad film plot man woman house dog cat runs sees loves hates".split()
KINDS = ["gpt", "llama", "lora", "clf", "lora-clf", "quant", "pruned", "mt", "ed", "enc"]
MODEL = {"lora": "lora", "ed": "ed/best"}  # the path of a kind under the root (default: its name)
LM = {"gpt", "llama", "lora", "clf", "lora-clf", "quant", "pruned", "mt"}  # decoder-only language models
FLOAT = LM - {"quant"}
CLASSIFY_TASK = {"labels": ["neg", "pos"], "append_eos": True, "eos_id": 0, "pad_id": 1, "max_length": 32}


def _text(n: int = 4000, seed: int = 0) -> str:
    r = random.Random(seed)
    lines: list[str] = []
    while sum(map(len, lines)) < n:
        lines.append(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 8))) + ".")
    return "\n".join(lines) + "\n"


def run(*args, stdin: str | None = None) -> tuple[int, str, str]:
    """``scalelm ARGS`` in this process: (exit code, stdout, stderr). Any exception but argparse's
    exit propagates: a traceback fails the test."""
    import contextlib

    from scalelm.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin
    sys.stdin = io.StringIO(stdin) if stdin is not None else old
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
    finally:
        sys.stdin = old
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Every kind of model directory, the data they read, and inputs for every command."""
    import torch

    from scalelm.checkpoint.rundir import set_latest
    from scalelm.config import LoRAConfig, ModelConfig
    from scalelm.lora import LoRAFiles, apply_lora
    from scalelm.model.build import build_model
    from scalelm.model.gpt import GPT
    from scalelm.model.io import load_model_dir, save_model_dir
    from scalelm.tasks.classify.files import ClassifierFiles
    from scalelm.tasks.classify.model import Classifier
    from scalelm.train.model_io import GPTFiles

    d = tmp_path_factory.mktemp("kinds")
    text = _text()
    tok = char_tokenizer(text).to_str()  # the same tokenizer as the data's
    data = make_char_data(d / "data", text)
    (d / "text.txt").write_text(text)
    torch.manual_seed(0)
    small = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    llama = dict(small, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1)
    save_model_dir(GPT(ModelConfig(**small)), d / "gpt", tok)
    save_model_dir(GPT(ModelConfig(**llama)), d / "llama", tok)
    save_model_dir(GPT(ModelConfig(**small)), d / "mt", tok, extra={"task": {
        "name": "translate", "arch": "decoder", "eot_id": 0, "separator": "=>", "max_length": 32}})
    # a LoRA run: adapters on gpt/, a checkpoint that `latest` names
    m = load_model_dir(d / "gpt")
    apply_lora(m, LoRAConfig(r=2, alpha=4.0, targets="q,v"))
    files = LoRAFiles(GPTFiles(), m, d / "gpt")
    files.save(m, m.state_dict(), d / "lora" / "ckpt-00000002", tok, {"step": 2})
    set_latest(d / "lora", "ckpt-00000002")
    clf = Classifier(GPT(ModelConfig(**small)), 2)
    ClassifierFiles(CLASSIFY_TASK).save(clf, clf.state_dict(), d / "clf", tok, {"step": 1})
    # a LoRA classifier: adapters on gpt/ and the head, in adapter.safetensors
    lclf = Classifier(load_model_dir(d / "gpt"), 2)
    apply_lora(lclf.gpt, LoRAConfig(r=2, alpha=4.0, targets="q,v"))
    for name, p in lclf.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("head."))
    LoRAFiles(ClassifierFiles(CLASSIFY_TASK), lclf, d / "gpt").save(lclf, lclf.state_dict(), d / "lora-clf", tok,
                                                                   {"step": 1})
    ed = build_model(ModelConfig(**dict(small, n_layer=1), arch="encoder-decoder", n_encoder_layer=1,
                                 n_decoder_layer=1))
    save_model_dir(ed, d / "ed" / "best", tok, extra={"task": {
        "name": "translate", "arch": "encoder-decoder", "eot_id": 0, "max_length": 32, "label_smoothing": 0.1}})
    # a masked-LM encoder of ModernBERT's shape (so that it exports to Hugging Face)
    enc = build_model(ModelConfig(**small, arch="encoder", pos_embedding="rope", mlp="geglu", gelu="erf", bias=False))
    save_model_dir(enc, d / "enc", tok)
    rc, _, se = run("quantize", d / "gpt", "--scheme", "int8", "--out", d / "quant")
    assert rc == 0, se
    rc, _, se = run("prune", d / "llama", "--method", "structured", "--ffn-dim", "32", "--calib", data,
                    "--calib-samples", "4", "--out", d / "pruned")
    assert rc == 0, se
    # inputs of the commands
    (d / "labelled.txt").write_text("pos the good film.\nneg the bad plot.\npos a good king.\nneg a bad dog.\n")
    (d / "src.txt").write_text("the king sees a dog.\nthe cat runs.\n")
    (d / "ref.txt").write_text("a queen loves the house.\nthe dog runs.\n")
    (d / "qa.jsonl").write_text("".join(json.dumps({"question": "the king?", "answer": "the #### 4"}) + "\n"
                                        for _ in range(3)))
    (d / "sft.jsonl").write_text("".join(json.dumps({"instruction": "the king", "output": "the dog runs."}) + "\n"
                                         for _ in range(4)))
    return d


# ----------------------------------------------------------------------------- the kind checks

def test_each_directory_is_recognised(root):
    from scalelm.checkpoint.kinds import model_kind, read_kind

    want = {"gpt": "gpt", "llama": "gpt", "lora": "lora", "clf": "classifier", "lora-clf": "classifier",
            "quant": "quantized", "pruned": "gpt", "mt": "gpt", "ed": "encoder-decoder", "enc": "encoder"}
    assert {k: model_kind(root / MODEL.get(k, k)) for k in KINDS} == want
    lclf = read_kind(root / "lora-clf")
    assert lclf.facets == {"gpt", "lora", "classifier"} and lclf.describe() == "a LoRA classifier (2 labels)"
    run_dir = read_kind(root / "lora")  # a RUN_DIR is its latest checkpoint
    assert run_dir.path == root / "lora" / "ckpt-00000002" and run_dir.describe().startswith("a LoRA checkpoint")
    assert read_kind(root / "pruned").describe() == "a pruned Llama-style language model"
    assert read_kind(root / "quant").describe() == "an int8-quantized GPT language model"
    assert read_kind(root / "mt").tags == {"gpt", "translation"}
    assert read_kind(root / "ed" / "best").describe() == "an encoder-decoder model (translation)"
    assert read_kind(root / "enc").describe() == "a masked-LM encoder" and read_kind(root / "enc").facets == {"encoder"}


def test_require_kind_names_what_the_command_works_with(root):
    from scalelm.checkpoint.kinds import CLASSIFIER, ENCDEC, GPT, LANGUAGE_MODELS, LORA, QUANTIZED, require_kind
    from scalelm.errors import CheckpointError, UserError

    assert require_kind(root / "quant", "scalelm generate", LANGUAGE_MODELS).kind == QUANTIZED
    with pytest.raises(UserError) as e:
        require_kind(root / "ed" / "best", "scalelm eval --harness", LANGUAGE_MODELS,
                     hint="score it with `scalelm eval --task translate`")
    assert str(e.value) == (
        f"`scalelm eval --harness` works with decoder-only language models (GPT, Llama-style, pruned, quantized, "
        f"LoRA, classifiers); {root / 'ed' / 'best'} is an encoder-decoder model (translation): score it with "
        f"`scalelm eval --task translate`")
    # every facet must be supported: a LoRA classifier is not a plain LoRA run
    with pytest.raises(UserError, match="LoRA classifier.*head"):
        require_kind(root / "lora-clf", "scalelm quantize", (GPT, LORA), hint={CLASSIFIER: "it would lose its head"})
    # a kind the command needs: the default hint says how to get one
    with pytest.raises(UserError, match=r"classifiers of `scalelm finetune classify` \(full or LoRA\); .* is a GPT "
                                        r"language model, not a classifier: train one with"):
        require_kind(root / "gpt", "scalelm classify", (GPT, LORA, CLASSIFIER), needs=CLASSIFIER)
    with pytest.raises(UserError, match="GPT, Llama-style, pruned, LoRA and encoder-decoder models"):
        require_kind(root / "quant", "scalelm export", (GPT, LORA, ENCDEC))
    with pytest.raises(CheckpointError, match="not found"):
        require_kind(root / "nothing", "scalelm generate", LANGUAGE_MODELS)


# ----------------------------------------------------------------------------- the matrix

def _commands(d, m, out) -> dict[str, list]:
    """command name -> argv with model ``m``, writing under ``out``."""
    train = ["--train.max_steps=1", "--train.eval_every=1", "--train.micro_batch_size=2", "--log.progress=false"]
    return {
        "eval --data": ["eval", m, "--data", d / "data", "--max-batches", "1", "--batch-size", "2"],
        "eval --text": ["eval", m, "--text", d / "text.txt", "--batch-size", "2"],
        "eval --harness": ["eval", m, "--harness", "scalelm_text_ppl", "--harness-data", d / "text.txt", "--limit", "1"],
        "eval --task classify": ["eval", m, "--task", "classify", "--data", d / "labelled.txt"],
        "eval --task translate": ["eval", m, "--task", "translate", "--source", d / "src.txt", "--reference",
                                  d / "ref.txt"],
        "eval --task qa": ["eval", m, "--task", "qa", "--data", d / "qa.jsonl", "--max-new-tokens", "3"],
        "generate": ["generate", m, "--prompt", "the", "--max-new-tokens", "3"],
        "chat": ["chat", m, "--max-new-tokens", "3"],
        "classify": ["classify", m, "--text", "the good film"],
        "translate": ["translate", m, "--input", d / "src.txt", "--max-new-tokens", "4"],
        "convert --to-hf": ["convert", m, "--to-hf", out / "hf"],
        "convert --to-peft": ["convert", m, "--to-peft", out / "peft"],
        "push --dry-run": ["push", m, "me/model", "--dry-run", out / "staged"],
        "merge": ["merge", m, "--out", out / "merged"],
        "export": ["export", m, "--out", out / "exported"],
        "export --format onnx": ["export", m, "--format", "onnx", "--out", out / "onnx"],
        "prune": ["prune", m, "--method", "magnitude", "--sparsity", "0.5", "--out", out / "pruned"],
        "quantize": ["quantize", m, "--scheme", "int8", "--out", out / "q"],
        "distill --teacher": ["distill", "--teacher", m, "--data", d / "data", "--out", out / "run",
                              "--train.eval_iters=1", *train],
        "distill --student": ["distill", "--teacher", d / "gpt", "--student", m, "--data", d / "data", "--out",
                              out / "run", "--train.eval_iters=1", *train],
        "finetune classify --base": ["finetune", "classify", "--base", m, "--train", d / "labelled.txt", "--val",
                                     d / "labelled.txt", "--out", out / "run", *train],
        "finetune sft --base": ["finetune", "sft", "--base", m, "--data", d / "sft.jsonl", "--val", d / "sft.jsonl",
                                "--out", out / "run", *train],
        "finetune translate --base": ["finetune", "translate", "--base", m, "--source", d / "src.txt", "--target",
                                      d / "ref.txt", "--val-source", d / "src.txt", "--val-target", d / "ref.txt",
                                      "--out", out / "run", *train],
        "train --init-from": ["train", "--init-from", m, "--data", d / "data", "--out", out / "run",
                              "--train.eval_iters=1", *train],
    }


# command -> the kinds it works with (every other kind is refused)
WORKS_WITH = {
    "eval --data": LM | {"enc"}, "eval --text": LM, "eval --harness": LM, "eval --task qa": LM,
    "eval --task classify": {"clf", "lora-clf"}, "eval --task translate": {"mt", "ed"},
    "generate": LM, "chat": LM, "classify": {"clf", "lora-clf"}, "translate": {"mt", "ed"},
    "convert --to-hf": FLOAT | {"enc"}, "push --dry-run": FLOAT | {"enc"}, "convert --to-peft": {"lora"}, "merge": {"lora", "lora-clf"},
    "export": {"gpt", "llama", "lora", "pruned", "mt", "ed"},
    "export --format onnx": {"gpt", "llama", "lora", "pruned", "mt"},
    "prune": {"gpt", "llama", "lora", "pruned", "mt"}, "quantize": {"gpt", "llama", "lora", "pruned", "mt"},
    "distill --teacher": LM, "distill --student": FLOAT,
    "finetune classify --base": FLOAT | {"enc"}, "finetune sft --base": FLOAT, "finetune translate --base": FLOAT | {"ed"},
    "train --init-from": FLOAT | {"enc"},  # an encoder continues as a masked LM
}
SLOW = {"export --format onnx", "eval --harness"}  # ~20 s per ONNX export; lm-eval's start-up


def _cases():
    for command, works in WORKS_WITH.items():
        for kind in KINDS:
            marks = [pytest.mark.slow] if command in SLOW and kind in works else []
            yield pytest.param(command, kind, id=f"{command}-{kind}", marks=marks)


@pytest.mark.parametrize("command,kind", _cases())
def test_every_command_works_with_or_refuses_every_kind(root, tmp_path, monkeypatch, command, kind):
    monkeypatch.setenv("SCALELM_PEAK_TFLOPS", "1")  # training commands: no CPU peak measurement
    argv = _commands(root, root / MODEL.get(kind, kind), tmp_path)[command]
    rc, _, err = run(*argv, stdin="the king\n" if command == "chat" else None)
    assert "Traceback" not in err
    if kind in WORKS_WITH[command]:
        assert rc == 0, err[-3000:]
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and " works with " in lines[0], lines[0]


@pytest.mark.parametrize("kind", KINDS)
def test_serve_refuses_before_taking_the_port(root, monkeypatch, kind):
    """The refusal comes before ``bind``: a kind serve takes reaches it (and stops there)."""
    import scalelm.serve.cli as serve_cli

    class Bound(Exception):
        pass

    def bind(host, port):
        raise Bound

    monkeypatch.setattr(serve_cli, "bind", bind)
    if kind in LM:
        with pytest.raises(Bound):
            run("serve", root / MODEL.get(kind, kind), "--port", "0")
        return
    rc, _, err = run("serve", root / MODEL.get(kind, kind), "--port", "0")
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and " works with " in lines[0], err


def test_export_keeps_what_a_translation_model_needs(root, tmp_path):
    """`export` of a translation model gives one `translate` reads (its task entry goes along)."""
    rc, _, err = run("export", root / "ed" / "best", "--out", tmp_path / "ed")
    assert rc == 0, err
    assert json.loads((tmp_path / "ed" / "config.json").read_text())["task"]["arch"] == "encoder-decoder"
    rc, out, err = run("translate", tmp_path / "ed", "--input", root / "src.txt", "--max-new-tokens", "3")
    assert rc == 0 and len(out.split("\n")) == 3, err


# ----------------------------------------------------------------------------- outputs never replace inputs

def _tree(p):
    import hashlib

    p = Path(p)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return hashlib.sha256(b"".join(str(q).encode() + q.read_bytes() for q in files)).hexdigest()


def test_an_output_file_is_never_an_input_or_inside_a_model(root, tmp_path):
    """Issue 28 A.2: checked before any work, nothing written, one line."""
    before = {k: _tree(root / k) for k in ("src.txt", "ref.txt", "mt", "gpt")}
    cases = [
        (("translate", root / "mt", "--input", root / "src.txt", "--out", root / "src.txt"), "is the input"),
        (("translate", root / "mt", "--input", root / "src.txt", "--out", root / "mt" / "config.json"),
         "inside the model"),
        (("translate", root / "mt", "--input", root / "src.txt", "--out", tmp_path), "is a directory"),
        (("eval", root / "mt", "--task", "translate", "--source", root / "src.txt", "--reference",
          root / "ref.txt", "--save-hypotheses", root / "ref.txt"), "is the input"),
        # A.3: merge may not replace the base its LoRA run was trained on, even with --overwrite
        (("merge", root / "lora", "--out", root / "gpt", "--overwrite"), "base model"),
    ]
    for args, words in cases:
        rc, _, se = run(*args)
        assert rc == 2 and words in se and "Traceback" not in se, (args, se)
        assert len([ln for ln in se.splitlines() if ln.strip()]) == 1, se
    assert {k: _tree(root / k) for k in before} == before
    rc, _, se = run("translate", root / "mt", "--input", root / "src.txt", "--out", tmp_path / "hyp.txt")
    assert rc == 0 and len((tmp_path / "hyp.txt").read_text().splitlines()) == 2, se
