"""Classification pieces: readers (every format, every bad input), labels, pooling under padding,
batches, the model directory (head + labels saved), loading, and the Hugging Face export's parity."""

import json

import numpy as np
import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.model import GPT
from scalelm.tasks.classify.data import (
    ClassifyBatches,
    ClassifyDataError,
    TextEncoder,
    collate,
    label_ids,
    label_names,
    read_examples,
)
from scalelm.tasks.classify.files import ClassifierFiles, load_classifier
from scalelm.tasks.classify.model import Classifier

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GPT2_STYLE = dict(vocab_size=300, block_size=48, n_layer=2, n_head=2, n_embd=32)
LLAMA_STYLE = dict(GPT2_STYLE, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                   tie_embeddings=False, n_head=4, n_kv_head=2)
QWEN2_STYLE = dict(LLAMA_STYLE, qkv_bias=True)
QWEN3_STYLE = dict(LLAMA_STYLE, qk_norm=True, head_size=16)


@pytest.fixture(scope="session")
def bpe_json(shared_data) -> str:
    """A byte-level BPE with <|endoftext|> (0) and <|pad|> (1), trained on SST-2 train sentences."""
    from scalelm.data.tokenizer import train_bpe

    lines = (shared_data / "sst2" / "stsa.binary.train").read_text().splitlines()[:2000]
    return train_bpe(iter([s.split(" ", 1)[1] for s in lines]), vocab_size=300).to_str()


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- readers

def test_readers_of_every_format(tmp_path):
    sst = read_examples(write(tmp_path, "a.txt", "1 a fine film\n\n0 dull , dull\n"))
    assert [(e.text, e.label) for e in sst] == [("a fine film", "1"), ("dull , dull", "0")]
    assert sst[1].where.endswith("a.txt:3")
    tsv = read_examples(write(tmp_path, "a.tsv", 'sentence\tlabel\nhe said "wow\t1\nmeh\t0\n'), text_field="sentence")
    assert [(e.text, e.label) for e in tsv] == [('he said "wow', "1"), ("meh", "0")]  # TSV quotes nothing
    csv_ = read_examples(write(tmp_path, "a.csv", 'text,label\n"good, really",pos\nbad,neg\n'))
    assert [(e.text, e.label) for e in csv_] == [("good, really", "pos"), ("bad", "neg")]
    jl = read_examples(write(tmp_path, "a.jsonl", '{"text": "yes", "label": 2}\n\n{"text": "no", "label": 10}\n'))
    assert [(e.text, e.label) for e in jl] == [("yes", "2"), ("no", "10")]
    arr = read_examples(write(tmp_path, "a.json", json.dumps([{"t": "x", "y": "a"}, {"t": "z", "y": "b"}])),
                        text_field="t", label_field="y")
    assert [e.label for e in arr] == ["a", "b"]
    forced = read_examples(write(tmp_path, "b.tsv", "1 forced sst\n0 lines\n"), fmt="sst")
    assert [e.label for e in forced] == ["1", "0"]
    texts = read_examples(write(tmp_path, "in.txt", "first text\nsecond one\n"), label_field=None)
    assert [(e.text, e.label) for e in texts] == [("first text", None), ("second one", None)]


def test_label_names_sorted_and_ids():
    ex = lambda *labels: [type("E", (), {"label": lab, "where": f"f:{i}"})() for i, lab in enumerate(labels)]  # noqa: E731
    assert label_names(ex("10", "2", "2", "-1"), "f") == ["-1", "2", "10"]  # integers sort numerically
    assert label_names(ex("pos", "neg", "neutral"), "f") == ["neg", "neutral", "pos"]
    assert label_ids(ex("pos", "neg"), ["neg", "pos"]).tolist() == [1, 0]
    with pytest.raises(ClassifyDataError, match="only the label"):
        label_names(ex("a", "a"), "f")


@pytest.mark.parametrize("name, text, kw, message", [
    ("e.txt", "\n  \n", {}, "e.txt is empty"),
    ("e.jsonl", "", {}, "is empty"),
    ("h.csv", "text,label\n", {}, "holds no examples"),
    ("n.txt", "1 good film\nthis line has no label\n0 bad\n", {}, r"n.txt:2: no label"),
    ("s.txt", "1 good film\n  indented line\n", {}, r"s.txt:2: no label"),
    ("w.txt", "1 good film\n0\n", {}, r"w.txt:2: '0' is a label without text"),
    ("c.csv", "text,label\ngood,1\nbad,\n", {}, r"c.csv:3: no label"),
    ("t.csv", "txt,label\ngood,1\n", {}, r"t.csv:1: no column 'text'.*did you mean --text-field 'txt'"),
    ("j.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n', {},
     r"j.jsonl:2: no field 'text'.*did you mean --text-field 'txt'"),
    ("k.jsonl", '{"text": "a", "lable": 1}\n', {}, r"k.jsonl:1: no field 'label'.*'lable'"),
    ("l.jsonl", '{"text": "a", "label": null}\n', {}, r"l.jsonl:1: no label"),
    ("m.jsonl", '{"text": "a", "label": 1}\n{oops\n', {}, r"m.jsonl:2: not valid JSON"),
    ("o.jsonl", '{"text": "a", "label": [1]}\n', {}, r"o.jsonl:1: the label \[1\] is not"),
    ("p.jsonl", '{"text": "", "label": 1}\n', {}, r"p.jsonl:1: no text"),
])
def test_bad_input_names_file_and_line(tmp_path, name, text, kw, message):
    with pytest.raises(ClassifyDataError, match=message):
        read_examples(write(tmp_path, name, text), **kw)


def test_unknown_label_names_line_and_known_labels(tmp_path):
    val = read_examples(write(tmp_path, "v.txt", "pos fine\nneutral hmm\n"))
    with pytest.raises(ClassifyDataError, match=r"v.txt:2: unknown label 'neutral'.*\['neg', 'pos'\]"):
        label_ids(val, ["neg", "pos"])


def test_not_utf8_and_missing(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"1 caf\xe9\n")
    with pytest.raises(ClassifyDataError, match="not UTF-8"):
        read_examples(tmp_path / "b.txt")
    with pytest.raises(ClassifyDataError, match="not found"):
        read_examples(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- encoding, batches

def test_encoder_truncates_and_ends_with_eos(bpe_json):
    enc = TextEncoder(bpe_json, max_length=6)
    assert (enc.eos_id, enc.pad_id) == (0, 1)
    ids = enc.encode(["a very long sentence that is truncated here", "ok"])
    assert len(ids[0]) == 6 and ids[0][-1] == 0 and ids[1][-1] == 0
    no_eos = TextEncoder(bpe_json, max_length=6, append_eos=False).encode(["ok"])
    assert no_eos[0] == ids[1][:-1]


def test_batches_are_deterministic_resumable_and_shard_the_step():
    ids = [[5] * (1 + i % 7) for i in range(23)]
    y = np.arange(23)  # the "label" names the example

    def take(loader, n):
        return [tuple(t.tolist() for t in loader.next_batch()) for _ in range(n)]

    a = ClassifyBatches(ids, y, 4, grad_accum_steps=2, seed=3)
    first = take(a, 6)
    b = ClassifyBatches(ids, y, 4, grad_accum_steps=2, seed=3)
    take(b, 3)
    c = ClassifyBatches(ids, y, 4, grad_accum_steps=2, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert take(c, 3) == first[3:]
    # two data-parallel ranks of micro-batch 4, no accumulation: the same examples per step
    r0, r1 = (ClassifyBatches(ids, y, 4, 1, dp_rank=r, dp_world=2, seed=3) for r in (0, 1))
    for step in range(3):
        both = sorted(sum((r.next_batch()[2].tolist() for r in (r0, r1)), []))
        one = sorted(first[2 * step][2] + first[2 * step + 1][2])
        assert both == one
    with pytest.raises(ClassifyDataError, match="global_batch"):
        ClassifyBatches(ids, y, 16, seed=3).load_state_dict(b.state_dict())


# ----------------------------------------------------------------------------- the model

def _perturbed(cfg: dict) -> GPT:
    torch.manual_seed(0)
    g = GPT(ModelConfig(**cfg))
    with torch.no_grad():
        for n, p in g.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return g


@pytest.mark.parametrize("shape", [GPT2_STYLE, LLAMA_STYLE], ids=["gpt2", "llama"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_gives_the_same_logits_under_left_and_right_padding(shape, pooling):
    m = Classifier(_perturbed(shape), 3, pooling).eval()
    seqs = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    with torch.no_grad():
        alone = torch.cat([m(torch.tensor([s])) for s in seqs])
        for left in (False, True):
            idx, valid = collate(seqs, fill=1, left=left)
            assert (m(idx, valid) - alone).abs().max().item() < 1e-5
    if pooling == "last":  # the head reads the last token: a longer text changes the logits
        assert not torch.allclose(alone[0], m(torch.tensor([seqs[0][:-1]]))[0])


def test_untied_lm_head_is_frozen_tied_one_trains():
    assert not Classifier(GPT(ModelConfig(**LLAMA_STYLE)), 2).gpt.lm_head.weight.requires_grad
    assert Classifier(GPT(ModelConfig(**GPT2_STYLE)), 2).gpt.lm_head.weight.requires_grad  # = tok_emb


def _saved_classifier(tmp_path, shape, bpe_json, labels=("neg", "pos"), pooling="last", lowercase=False):
    m = Classifier(_perturbed(shape), len(labels), pooling)
    with torch.no_grad():
        m.head.weight.normal_(0, 1)
    task = {"labels": list(labels), "append_eos": True, "eos_id": 0, "pad_id": 1, "max_length": shape["block_size"],
            "lowercase": lowercase}
    ClassifierFiles(task).save(m, m.state_dict(), tmp_path / "clf", bpe_json, {"step": 3})
    return m.eval(), tmp_path / "clf"


def test_model_dir_saves_gpt_head_and_label_names(tmp_path, bpe_json):
    m, d = _saved_classifier(tmp_path, GPT2_STYLE, bpe_json, labels=("bad", "good", "meh"))
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "head.safetensors", "manifest.json",
                                                  "model.safetensors", "tokenizer.json"]
    meta = json.loads((d / "config.json").read_text())
    assert meta["task"]["name"] == "classify" and meta["task"]["labels"] == ["bad", "good", "meh"]
    assert meta["task"]["pooling"] == "last" and meta["step"] == 3
    # the GPT is still a plain LM directory
    from scalelm.model.io import load_model_dir

    lm = load_model_dir(d)
    assert torch.equal(lm.tok_emb.weight, m.gpt.tok_emb.weight)
    back, task, _ = load_classifier(d)
    x = torch.randint(2, 300, (2, 9))
    assert torch.equal(back(x), m(x)) and task["labels"] == ["bad", "good", "meh"]
    # ClassifierFiles.weights gives the training state dict's keys (the tied head included)
    w = ClassifierFiles({}).weights(d)
    assert set(w) == set(m.state_dict()) and torch.equal(w["head.weight"], m.head.weight)
    # a damaged head is refused by the manifest check
    (d / "head.safetensors").write_bytes((d / "head.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    from scalelm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="head.safetensors"):
        load_classifier(d)


def test_a_plain_model_is_not_a_classifier(tmp_path, bpe_json):
    from scalelm.errors import CheckpointError
    from scalelm.model.io import save_model_dir

    save_model_dir(GPT(ModelConfig(**GPT2_STYLE)), tmp_path / "lm", tokenizer_json=bpe_json)
    with pytest.raises(CheckpointError, match="not a classifier"):
        load_classifier(tmp_path / "lm")


# ----------------------------------------------------------------------------- Hugging Face

TEXTS = ["a gripping , funny film", "dull", "the plot is a mess but the actors are superb and it moves"]


@pytest.mark.parametrize("shape,lowercase,arch", [
    (GPT2_STYLE, False, "GPT2"), (LLAMA_STYLE, False, "Llama"), (GPT2_STYLE, True, "GPT2"),
    (QWEN2_STYLE, False, "Qwen2"), (QWEN3_STYLE, False, "Qwen3")],
    ids=["gpt2", "llama", "gpt2-lowercase", "qwen2", "qwen3"])
def test_hf_export_matches_logits_on_the_same_raw_text(tmp_path, shape, lowercase, arch, bpe_json):
    pytest.importorskip("transformers")
    from train_helpers import cli
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [t.title() for t in TEXTS] if lowercase else TEXTS  # cased text for a lowercasing classifier
    m, d = _saved_classifier(tmp_path, shape, bpe_json, lowercase=lowercase)
    rc, out, err = cli("convert", d, "--to-hf", tmp_path / "hf")
    assert rc == 0, err
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == f"{arch}ForSequenceClassification"
    assert hf.config.id2label == {0: "neg", 1: "pos"} and hf.config.pad_token_id == 1
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = TextEncoder(bpe_json, shape["block_size"], lowercase=lowercase)
    ours_ids = enc.encode(texts)
    if lowercase:
        assert ours_ids == TextEncoder(bpe_json, shape["block_size"]).encode([t.lower() for t in texts])
    batch = tok(texts, padding=True, return_tensors="pt")
    for row, ids in zip(batch["input_ids"].tolist(), ours_ids):
        assert row[:len(ids)] == ids and set(row[len(ids):]) <= {1}  # same ids, <|endoftext|> appended
    with torch.no_grad():
        theirs = hf(**batch).logits
        ours = torch.cat([m(torch.tensor([ids])) for ids in ours_ids])
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_mean_pooling_cannot_be_exported(tmp_path, bpe_json):
    pytest.importorskip("transformers")
    from train_helpers import cli

    _, d = _saved_classifier(tmp_path, GPT2_STYLE, bpe_json, pooling="mean")
    rc, _, err = cli("convert", d, "--to-hf", tmp_path / "hf")
    assert rc == 2 and "--pooling mean" in err and not (tmp_path / "hf").exists()
