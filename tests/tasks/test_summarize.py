"""Summarization: JSONL fields, ROUGE as rouge-score computes it (stemming, several references),
the lead-K baseline, `finetune summarize` of both architectures with --max-source-length (the cut
counted), `scalelm summarize` (one line per input, in order), `eval --task summarize`."""

import json

import pytest
from train_helpers import cli, one_thread  # noqa: F401

from scalelm.tasks.summarize.rouge import ROUGE_TYPES, lead, length_stats, parse_baseline, rouge_f1
from scalelm.tasks.translate.data import TranslateDataError, read_jsonl_pairs

pytest.importorskip("rouge_score")
pytestmark = pytest.mark.usefixtures("one_thread")

HYPS = ["meeting moved to tuesday", "the gas prices are running high", "", "Q3 budget review"]
REFS = ["Meeting on Tuesday", "gas price runs high today", "hello", "budget"]
MORE = [["meeting tuesday", "moved meeting"], ["high gas prices"], ["greetings", "hi"], []]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_fields_are_read_and_checked(tmp_path):
    f = _write(tmp_path / "a.jsonl", [{"body": " one two ", "subj": "x\n"}, {"body": "", "subj": "y"},
                                      {"body": "three", "subj": "z", "id": 3}])
    assert [p for _, p in read_jsonl_pairs(f, "body", "subj")] == [("one two", "x"), ("three", "z")]
    with pytest.raises(TranslateDataError, match=r"a.jsonl:1: no field 'email_body'.*\['body', 'subj'\]"):
        read_jsonl_pairs(f, "email_body", "subj")
    (tmp_path / "b.jsonl").write_text('{"body": 1, "subj": "x"}\n')
    with pytest.raises(TranslateDataError, match="a int in field 'body'"):
        read_jsonl_pairs(tmp_path / "b.jsonl", "body", "subj")


def test_rouge_agrees_with_rouge_score_called_directly():
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    got = rouge_f1(HYPS, [[r] for r in REFS])
    for k in ROUGE_TYPES:
        want = 100 * sum(sc.score(r, h)[k].fmeasure for h, r in zip(HYPS, REFS)) / len(HYPS)
        assert got[k] == pytest.approx(want, abs=1e-9)
    # stemming is on ("running"/"runs" match "run"), and it matters here
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert got["rouge1"] > 100 * sum(plain.score(r, h)["rouge1"].fmeasure for h, r in zip(HYPS, REFS)) / len(HYPS)
    # Lsum splits sentences at newlines
    two = rouge_f1(["a b\nc d"], [["c d\na b"]])
    assert two["rougeLsum"] == pytest.approx(100.0) and two["rougeL"] < 100.0


def test_several_references_take_the_best_one_per_type():
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    allrefs = [[r, *m] for r, m in zip(REFS, MORE)]
    got = rouge_f1(HYPS, allrefs)
    for k in ROUGE_TYPES:
        want = 100 * sum(max(sc.score(r, h)[k].fmeasure for r in rs) for h, rs in zip(HYPS, allrefs)) / len(HYPS)
        assert got[k] == pytest.approx(want, abs=1e-9)
        assert got[k] >= rouge_f1(HYPS, [[r] for r in REFS])[k]
    assert got["rouge1"] > rouge_f1(HYPS, [[r] for r in REFS])["rouge1"]


def test_lead_baseline_and_lengths():
    assert lead(["  a b\nc d e ", "x"], 3) == ["a b c", "x"]
    assert parse_baseline("lead-8") == 8
    for bad in ("lead", "lead-0", "first-3", "lead-x"):
        with pytest.raises(Exception, match="lead-K"):
            parse_baseline(bad)
    s = length_stats(["a b c", "", "d"])
    assert s["mean_words"] == pytest.approx(4 / 3, abs=0.01) and s["max_words"] == 3 and s["empty"] == 1


def test_eval_baseline_alone(tmp_path):
    recs = [{"email_body": f"Meeting about the gas budget number {i} tomorrow at noon in room {i}",
             "subject_line": "gas budget meeting" if i % 2 else f"room {i}",
             "annotations": ["budget meeting", "gas meeting"]} for i in range(6)]
    f = _write(tmp_path / "v.jsonl", recs)
    rc, so, se = cli("eval", "none", "--task", "summarize", "--data", f, "--source-field", "email_body",
                     "--target-field", "subject_line", "--baseline", "lead-4")
    assert rc == 0, se
    res = json.loads(so)
    b = res["baseline"]
    srcs = [r["email_body"] for r in recs]
    assert b["name"] == "lead-4" and res["n"] == 6 and "rouge" not in res
    assert b["rouge"] == pytest.approx(rouge_f1(lead(srcs, 4), [[r["subject_line"]] for r in recs]))
    assert b["rouge_all_references"] == pytest.approx(
        rouge_f1(lead(srcs, 4), [[r["subject_line"], *r["annotations"]] for r in recs]))
    assert b["hypothesis_lengths"]["max_words"] == 4 and b["references_per_example"] == 3
    rc, _, se = cli("eval", "none", "--task", "summarize", "--data", f, "--source-field", "email_body",
                    "--target-field", "subject_line")
    assert rc == 2 and "--baseline" in se


# ----------------------------------------------------------------------------- training and decoding

TINY = ["--model.n_head=2", "--model.n_embd=32", "--model.block_size=96", "--model.dropout=0.0",
        "--train.micro_batch_size=8", "--train.eval_every=4", "--train.save_every=4", "--train.log_every=1",
        "--log.progress=false", "--optim.warmup_steps=1", "--train.precision=fp32", "--optim.lr=3e-3",
        "--train.max_steps=4"]
ARCHS = {"decoder": ["--preset", "baby", "--model.n_layer=2"],
         "encoder-decoder": ["--preset", "transformer-small", "--model.n_layer=1", "--model.n_encoder_layer=1",
                             "--model.n_decoder_layer=1", "--model.intermediate_size=64"]}


@pytest.fixture(scope="module")
def aeslc(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("aeslc")
    for name, n in (("train.part0", 160), ("validation", 12)):
        lines = (shared_data / "aeslc" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module", params=list(ARCHS))
def run(request, aeslc, tmp_path_factory):
    out = tmp_path_factory.mktemp("sum") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELM_PEAK_TFLOPS", "1")
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rc, so, se = cli("finetune", "summarize", *ARCHS[request.param], "--vocab-size", "300", "--train",
                             aeslc / "train.part0.jsonl", "--val-fraction", "0.1", "--source-field", "email_body",
                             "--target-field", "subject_line", "--max-source-length", "48", "--out", out, *TINY,
                             *(["--packing", "off"] if request.param == "decoder" else []))
        finally:
            torch.set_num_threads(n)
    assert rc == 0, se
    return request.param, out, json.loads(so), se


def test_finetune_summarize_reads_the_fields_and_counts_the_cut(run, aeslc):
    from tokenizers import Tokenizer

    arch, out, s, se = run
    task = json.loads((out / "best" / "config.json").read_text())["task"]
    assert s["task"] == "summarize" and task["name"] == "summarize" and task["arch"] == arch
    assert task["source_field"] == "email_body" and task["max_source_length"] == 48
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    recs = [json.loads(x) for x in (aeslc / "train.part0.jsonl").read_text().splitlines()]
    lens = [len(tok.encode(r["email_body"].strip(), add_special_tokens=False).ids) for r in recs]
    assert s["sources_truncated"] + s["val_sources_truncated"] == sum(n > 48 for n in lens) > 0
    assert f"cut {s['sources_truncated']:,} of 144 training sources" in se
    assert task["max_new_tokens"] >= 2


def test_summarize_writes_one_line_per_input_in_order(run, aeslc, tmp_path):
    arch, out, _, _ = run
    val = aeslc / "validation.jsonl"
    rc, so, se = cli("summarize", out, "--input", val, "--batch-size", "5")
    assert rc == 0, se
    lines = so.split("\n")[:-1]
    assert len(lines) == 12
    one = [cli("summarize", out, "--input", _write(tmp_path / f"{i}.jsonl", [json.loads(x)]))[1]
           for i, x in enumerate(val.read_text().splitlines()[:3])]
    assert [o.rstrip("\n") for o in one] == lines[:3]  # batched == alone, in input order
    # the decoding controls reach the model: at least 3 new tokens, so no summary is empty
    rc, so2, se = cli("summarize", out, "--input", val, "--min-new-tokens", "3", "--no-repeat-ngram-size", "3",
                      "--beams", "2", "--length-penalty", "1.5", "--repetition-penalty", "1.2")
    assert rc == 0, se
    assert len(so2.split("\n")[:-1]) == 12 and all(line.strip() for line in so2.split("\n")[:-1])
    rc, _, se = cli("summarize", out, "--input", val, "--no-repeat-ngram-size", "-1")
    assert rc == 2 and "no_repeat_ngram_size=-1 is invalid" in se


def test_eval_task_summarize_prints_rouge_against_one_and_all_references(run, aeslc):
    _, out, _, _ = run
    rc, so, se = cli("eval", out, "--task", "summarize", "--data", aeslc / "validation.jsonl", "--baseline",
                     "lead-8", "--target-field", "subject_line")
    assert rc == 0, se
    res = json.loads(so)
    assert set(res["rouge"]) == set(ROUGE_TYPES) and set(res["rouge_all_references"]) == set(ROUGE_TYPES)
    assert res["references_per_example"] == 4 and res["n"] == 12
    assert all(res["rouge_all_references"][k] >= res["rouge"][k] for k in ROUGE_TYPES)
    assert res["baseline"]["name"] == "lead-8" and res["reference_lengths"]["median_words"] > 0
    loss = res["reference_loss"]
    assert loss["source_use_nats"] == pytest.approx(loss["given_another_source"] - loss["given_source"])


def test_source_use_is_zero_exactly_when_the_sources_do_not_differ(run, aeslc):
    from scalelm.tasks.summarize.evaluate import source_use
    from scalelm.tasks.translate.model import load_translator

    _, out, _, _ = run
    recs = [json.loads(x) for x in (aeslc / "validation.jsonl").read_text().splitlines()]
    model = load_translator(out)
    sources, refs = [r["email_body"] for r in recs], [r["subject_line"] for r in recs]
    real = source_use(model, sources, refs, batch_size=5)
    assert real["tokens"] > len(refs) and real["source_use_nats"] != 0  # the rotation reaches the model
    same = source_use(model, [sources[0]] * len(refs), refs, batch_size=5)
    assert same["source_use_nats"] == 0 and same["tokens"] == real["tokens"]
    assert source_use(model, sources[:1], refs[:1]) == {}  # one record has no other source to give


def test_finetune_summarize_from_a_base(run, aeslc, tmp_path):
    arch, out, _, _ = run
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc, so, se = cli("finetune", "summarize", "--base", out / "best", "--train", aeslc / "train.part0.jsonl",
                         "--val", aeslc / "validation.jsonl", "--source-field", "email_body", "--target-field",
                         "subject_line", "--max-source-length", "40", "--out", tmp_path / "r", "--train.max_steps=2",
                         "--train.eval_every=2", "--log.progress=false", "--train.micro_batch_size=8",
                         "--train.precision=fp32")
    finally:
        torch.set_num_threads(n)
    assert rc == 0, se
    s = json.loads(so)
    assert s["step"] == 2 and s["task"] == "summarize" and s["val_sources_truncated"] > 0
    assert json.loads((tmp_path / "r" / "best" / "config.json").read_text())["task"]["arch"] == arch


def test_an_encoder_decoder_warm_starts_from_a_gpt_base(run, aeslc, tmp_path):
    arch, out, _, _ = run
    if arch != "decoder":
        pytest.skip("the base here is the decoder-only run")
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    common = ["--train", aeslc / "train.part0.jsonl", "--val", aeslc / "validation.jsonl", "--source-field",
              "email_body", "--target-field", "subject_line", "--max-source-length", "40", "--out", tmp_path / "r",
              "--log.progress=false", "--train.micro_batch_size=8", "--train.precision=fp32", "--train.eval_every=2"]
    try:
        rc, so, se = cli("finetune", "summarize", "--base", out / "best", "--model.arch=encoder-decoder",
                         "--train.max_steps=2", *common)
        assert rc == 0, se
        rc2, so2, se2 = cli("finetune", "summarize", "--base", out / "best", "--train.max_steps=3", *common)
    finally:
        torch.set_num_threads(n)
    s = json.loads(so)
    cfg = json.loads((tmp_path / "r" / "best" / "config.json").read_text())
    assert s["arch"] == "encoder-decoder" and cfg["task"]["arch"] == "encoder-decoder"
    base = json.loads((out / "best" / "config.json").read_text())["model"]
    assert cfg["model"]["n_encoder_layer"] == cfg["model"]["n_decoder_layer"] == base["n_layer"]
    assert rc2 == 0 and json.loads(so2)["step"] == 3, se2  # resumed: still the encoder-decoder, from its checkpoint
    assert json.loads((tmp_path / "r" / "best" / "config.json").read_text())["task"]["arch"] == "encoder-decoder"
    rc, so, se = cli("summarize", tmp_path / "r", "--input", aeslc / "validation.jsonl")
    assert rc == 0 and len(so.split("\n")[:-1]) == 12, se
