"""Translation: "source => target" examples supervise the target only, parallel files are checked,
`finetune translate` from scratch (its own BPE, kept for resuming), `scalelm translate` (batched
greedy == one at a time, beams, one line per input line), `eval --task translate` (sacreBLEU)."""

import json

import numpy as np
import pytest
from train_helpers import cli, one_thread, read_metrics  # noqa: F401

from scalelm.model.loss import IGNORE_INDEX
from scalelm.tasks.sft.batches import example_arrays
from scalelm.tasks.translate.data import TranslateDataError, read_pairs
from scalelm.tasks.translate.model import DecoderTranslator

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=64", "--model.dropout=0.0",
        "--train.micro_batch_size=8", "--train.eval_every=5", "--train.save_every=5", "--train.log_every=1",
        "--log.progress=false", "--optim.warmup_steps=1", "--train.precision=fp32", "--optim.lr=3e-3"]


def test_only_the_target_and_its_end_are_supervised():
    from tokenizers import Tokenizer, decoders, models

    chars = sorted(set("ab cd=>xyz"))
    tok = Tokenizer(models.BPE(vocab={c: i + 1 for i, c in enumerate(chars)} | {"<|endoftext|>": 0}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    model = DecoderTranslator(None, tok, 0)
    (e,), _, rep = model.encode_pairs([("f:1", ("ab cd", "xyz"))], 100)
    text = "ab cd => xyz"
    assert e.ids.tolist() == [tok.token_to_id(c) for c in text] + [0]
    _, y = example_arrays(e)
    # targets at positions j predict token j+1: the space before "xyz", "xyz" and end-of-text
    assert [int(j) for j in np.nonzero(y != IGNORE_INDEX)[0]] == list(range(len("ab cd =>") - 1, len(text)))
    assert rep.supervised_tokens == 5


def test_parallel_files_must_be_line_aligned(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.de").write_text("eins\n")
    with pytest.raises(TranslateDataError, match="has 2 lines but .* has 1"):
        read_pairs(tmp_path / "a.en", tmp_path / "a.de")
    (tmp_path / "b.de").write_text("eins\n\n")
    assert [p for _, p in read_pairs(tmp_path / "a.en", tmp_path / "b.de")] == [("one", "eins")]


@pytest.fixture(scope="module")
def multi30k(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("m30k")
    for split, n in (("train", 400), ("val", 24)):
        for lang in ("en", "de"):
            lines = (shared_data / "multi30k" / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (d / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def _args(d, out, steps):
    return ["finetune", "translate", "--preset", "baby", "--vocab-size", "400", "--source", d / "train.en",
            "--target", d / "train.de", "--val-source", d / "val.en", "--val-target", d / "val.de", "--out", out,
            f"--train.max_steps={steps}", *TINY]


@pytest.fixture(scope="module")
def run(multi30k, tmp_path_factory):
    out = tmp_path_factory.mktemp("tr") / "run"
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELM_PEAK_TFLOPS", "1")  # no CPU peak measurement
        rc, so, se = cli(*_args(multi30k, out, 10))
    torch.set_num_threads(n)
    assert rc == 0, se
    return out, json.loads(so)


def test_finetune_translate_trains_its_own_bpe_and_resumes(run, multi30k):
    out, s = run
    assert s["task"] == "translate" and s["step"] == 10 and 0 < s["supervised_tokens"] < s["real_tokens"]
    assert s["best_val_loss"] < s["initial_val_loss"]
    from tokenizers import Tokenizer

    kept = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert kept.get_vocab_size() == 400
    assert (out / "best" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    task = json.loads((out / "best" / "config.json").read_text())["task"]
    assert task["name"] == "translate" and task["arch"] == "decoder" and task["separator"] == "=>"
    rc, _so, se = cli(*_args(multi30k, out, 12))  # continues on the kept tokenizer (no retraining)
    assert rc == 0 and "resumed from" in se and "training a" not in se, se
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 13))


def test_scalelm_translate_writes_one_line_per_input_line(run, multi30k, tmp_path, capsys):
    from scalelm.tasks.translate.model import load_translator

    src = (multi30k / "val.en").read_text().splitlines()[:6]
    inp = tmp_path / "in.en"
    inp.write_text("\n".join(src[:3] + [""] + src[3:]) + "\n")
    rc, so, se = cli("translate", run[0], "--input", inp, "--batch-size", "4", "--max-new-tokens", "12")
    assert rc == 0, se
    lines = so.split("\n")[:-1]
    assert len(lines) == 7 and lines[3] == "" and so.endswith("\n")
    model = load_translator(run[0])
    one_by_one = model.translate(src, batch_size=1, max_new_tokens=12)
    assert model.translate(src, batch_size=4, max_new_tokens=12) == one_by_one == lines[:3] + lines[4:]
    rc, _, se = cli("translate", run[0] / "best", "--input", inp, "--beams", "3", "--out", tmp_path / "o.de",
                    "--max-new-tokens", "12")
    assert rc == 0, se
    assert len((tmp_path / "o.de").read_text().split("\n")) == 8


def test_eval_task_translate_prints_bleu_and_chrf(run, multi30k, tmp_path):
    hyp = tmp_path / "hyp.de"
    rc, so, se = cli("eval", run[0], "--task", "translate", "--source", multi30k / "val.en", "--reference",
                     multi30k / "val.de", "--batch-size", "8", "--limit", "8", "--save-hypotheses", hyp)
    assert rc == 0, se
    res = json.loads(so)
    assert res["n"] == 8 and res["beams"] == 1 and 0 <= res["bleu"] <= 100 and 0 <= res["chrf"] <= 100
    assert res["sentences_per_s"] > 0
    from sacrebleu.metrics import CHRF

    hyps = hyp.read_text(encoding="utf-8").split("\n")
    assert len(hyps) == 9 and hyps[-1] == ""  # the 8 scored translations, one a line
    refs = (multi30k / "val.de").read_text(encoding="utf-8").splitlines()[:8]
    assert abs(CHRF().corpus_score(hyps[:8], [refs]).score - res["chrf"]) < 1e-9  # the lines that were scored
    assert res["bleu_signature"].startswith("nrefs:1|") and "tok:13a" in res["bleu_signature"]
    assert res["chrf_signature"].startswith("nrefs:1|")
    rc, _, se = cli("eval", run[0], "--task", "translate", "--source", multi30k / "val.en")
    assert rc == 2 and "--reference" in se
