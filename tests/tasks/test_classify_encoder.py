"""Sequence classification on an encoder base: first-token pooling through BERT's pooler, mean pooling,
padding invariance, ``BertForSequenceClassification`` parity (in memory and through `convert --to-hf`),
a tiny `finetune classify` on an encoder that learns, and the refusals (GPT + --pooling first, exports
HF cannot hold)."""

import json

import pytest
import torch
import torch.nn as nn
from train_helpers import cli, one_thread  # noqa: F401

from scalelm.config import ModelConfig
from scalelm.model.build import build_model
from scalelm.tasks.classify.model import Classifier, PoolerHead, TransformHead

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SHAPE = dict(vocab_size=300, block_size=48, n_layer=2, n_head=2, n_embd=32)
BERT_STYLE = dict(SHAPE, arch="encoder", pos_embedding="learned", norm="layernorm", norm_eps=1e-12, mlp="gelu",
                  gelu="erf", bias=True, tie_embeddings=True, norm_placement="post_add", type_vocab_size=2)
MODERN_STYLE = dict(SHAPE, arch="encoder", pos_embedding="rope", norm="layernorm", mlp="geglu", gelu="erf",
                    bias=False, tie_embeddings=True, norm_placement="pre")


def _batch():
    a, b = torch.randint(0, 300, (1, 5)), torch.randint(0, 300, (1, 9))
    idx = torch.zeros(2, 9, dtype=torch.long)
    idx[0, :5], idx[1] = a, b
    valid = torch.zeros(2, 9, dtype=torch.bool)
    valid[0, :5], valid[1] = True, True
    return a, b, idx, valid


@pytest.mark.parametrize("shape, pooling, head", [(BERT_STYLE, "first", PoolerHead), (BERT_STYLE, "mean", nn.Linear),
                                                  (MODERN_STYLE, "first", TransformHead),
                                                  (MODERN_STYLE, "mean", TransformHead)],
                         ids=["bert-first", "bert-mean", "modernbert-first", "modernbert-mean"])
def test_encoder_pooling_ignores_padding(shape, pooling, head):
    torch.manual_seed(0)
    model = Classifier(build_model(ModelConfig(**shape)), 3, pooling).eval()
    assert type(model.head) is head
    a, b, idx, valid = _batch()
    with torch.no_grad():
        both = model(idx, valid)
        torch.testing.assert_close(both[0], model(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1], model(b)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape, pooling, arch", [
    (BERT_STYLE, "first", "BertForSequenceClassification"),
    (MODERN_STYLE, "first", "ModernBertForSequenceClassification"),
    (MODERN_STYLE, "mean", "ModernBertForSequenceClassification")], ids=["bert", "modernbert-cls", "modernbert-mean"])
def test_encoder_sequence_classification_parity(shape, pooling, arch):
    pytest.importorskip("transformers")
    from scalelm.tasks.classify.hf import to_hf_classifier

    torch.manual_seed(0)
    model = Classifier(build_model(ModelConfig(**shape)), 3, pooling).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            if p.dim() == 1:
                p.normal_()  # biases (and a norm's weight) that matter
    hf = to_hf_classifier(model, {"labels": ["a", "b", "c"]})
    assert type(hf).__name__ == arch
    _, _, idx, valid = _batch()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx, attention_mask=valid.long()).logits, model(idx, valid),
                                   atol=1e-4, rtol=0)


def test_encoder_exports_hf_cannot_hold_are_refused():
    pytest.importorskip("transformers")
    from scalelm.model.hf import ConversionError
    from scalelm.tasks.classify.hf import to_hf_classifier

    for shape, pooling in ((BERT_STYLE, "mean"), (MODERN_STYLE, "last")):
        with pytest.raises(ConversionError, match=f"with --pooling {pooling}"):
            to_hf_classifier(Classifier(build_model(ModelConfig(**shape)), 3, pooling), {"labels": ["a", "b", "c"]})


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data):
    """A random-init BERT-style encoder with a WordPiece tokenizer ([CLS] ... [SEP]) and SST-style files."""
    import random

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    from scalelm.model.io import save_model_dir

    d = tmp_path_factory.mktemp("enc_cls")
    lines = (shared_data / "sst2" / "stsa.binary.train").read_text().splitlines()[:2000]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([s.split(" ", 1)[1] for s in lines], trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    torch.manual_seed(0)
    save_model_dir(build_model(ModelConfig(**dict(BERT_STYLE, block_size=64, n_embd=64))), d / "base",
                   tokenizer_json=tok.to_str())
    rng = random.Random(0)
    words = "the a movie film story plot actors was is and but with of very".split()

    def synth(n):
        rows = []
        for _ in range(n):
            y = rng.randrange(2)
            w = [rng.choice(words) for _ in range(rng.randrange(3, 10))]
            w.insert(rng.randrange(len(w) + 1), rng.choice(["great", "fun", "superb"] if y else ["dull", "awful"]))
            rows.append(f"{y} {' '.join(w)}")
        return "\n".join(rows) + "\n"

    (d / "train.txt").write_text(synth(300))
    (d / "val.txt").write_text(synth(60))
    return d


def test_finetune_classify_on_an_encoder(files, tmp_path, one_thread):  # noqa: F811
    pytest.importorskip("transformers")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scalelm.tasks.classify.files import load_classifier

    rc, out, err = cli("finetune", "classify", "--base", files / "base", "--train", files / "train.txt", "--val",
                       files / "val.txt", "--out", tmp_path / "run", "--train.micro_batch_size=16",
                       "--log.progress=false", "--optim.warmup_steps=2", "--train.precision=fp32",
                       "--train.max_steps=40", "--train.eval_every=20", "--optim.lr=2e-3")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["val_accuracy"] > 0.9, summary
    task = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["task"]
    assert task["pooling"] == "first" and task["special_tokens"] and not task["append_eos"]
    rc, out, err = cli("classify", tmp_path / "run" / "best", "--text", "a superb film", "--text", "dull")
    assert rc == 0 and [json.loads(r)["label"] for r in out.splitlines()] == ["1", "0"], err
    assert cli("convert", tmp_path / "run" / "best", "--to-hf", tmp_path / "hf")[0] == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model, _, _ = load_classifier(tmp_path / "run" / "best")
    texts = ["a superb film with actors", "dull"]
    enc = hf_tok(texts, padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0] == hf_tok.convert_tokens_to_ids("[CLS]")
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits, model(enc["input_ids"], enc["attention_mask"].bool()),
                                   atol=1e-4, rtol=0)


def test_first_token_pooling_needs_an_encoder(files, tmp_path, one_thread):  # noqa: F811
    from scalelm.model.io import save_model_dir

    save_model_dir(build_model(ModelConfig(**SHAPE)), tmp_path / "gpt",
                   tokenizer_json=(files / "base" / "tokenizer.json").read_text())
    rc, _, err = cli("finetune", "classify", "--base", tmp_path / "gpt", "--train", files / "train.txt", "--val",
                     files / "val.txt", "--out", tmp_path / "run", "--pooling", "first", "--no-eos")
    assert rc == 2 and "--pooling first reads the first token, which in a causal GPT has seen only itself" in err
