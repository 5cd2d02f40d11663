"""`scalelm finetune tokens`, `scalelm tag`, `scalelm eval --task tokens` and the HF export end to end:
a tiny GPT (and encoder) learns "a capitalised word is B-X" far above chance, `tag` writes its input's
lines back (blank lines and -DOCSTART- kept), LoRA trains, and every bad input is one exit-2 line."""

import json
import random

import pytest
import torch
from train_helpers import cli, one_thread  # noqa: F401

TINY = ["--train.micro_batch_size=16", "--log.progress=false", "--optim.warmup_steps=2", "--train.precision=fp32",
        "--train.max_steps=40", "--train.eval_every=20", "--optim.lr=3e-3"]
LOWER = "the a movie film story plot was is and but with of very quite".split()
CAPS = "Paris London Anna Bob Rome Tokyo Maria Smith".split()


def synth(n: int, seed: int) -> str:
    """CoNLL lines (word, a dummy column, tag): a capitalised word is B-X, the others O."""
    rng = random.Random(seed)
    rows = ["-DOCSTART- -X- O", ""]
    for _ in range(n):
        for _ in range(rng.randrange(3, 10)):
            w = rng.choice(CAPS) if rng.random() < 0.3 else rng.choice(LOWER)
            rows.append(f"{w} NN {'B-X' if w[0].isupper() else 'O'}")
        rows.append("")
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data):
    """Random-init GPT and BERT-style encoder bases (a byte-level BPE) and synthetic train/val files."""
    from scalelm.config import ModelConfig
    from scalelm.data.tokenizer import train_bpe
    from scalelm.model.build import build_model
    from scalelm.model.io import save_model_dir

    d = tmp_path_factory.mktemp("tok")
    lines = (shared_data / "sst2" / "stsa.binary.train").read_text().splitlines()[:2000]
    tok = train_bpe(iter([s.split(" ", 1)[1] for s in lines]), vocab_size=300).to_str()
    torch.manual_seed(0)
    shape = dict(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=64)
    save_model_dir(build_model(ModelConfig(**shape)), d / "base", tokenizer_json=tok)
    bert = dict(shape, arch="encoder", pos_embedding="learned", norm="layernorm", norm_eps=1e-12, mlp="gelu",
                gelu="erf", bias=True, tie_embeddings=True, norm_placement="post_add", type_vocab_size=2)
    save_model_dir(build_model(ModelConfig(**bert)), d / "encoder", tokenizer_json=tok)
    (d / "train.txt").write_text(synth(300, 0))
    (d / "val.txt").write_text(synth(60, 1))
    return d


def finetune(files, out, *extra, base="base"):
    return cli("finetune", "tokens", "--base", files / base, "--train", files / "train.txt", "--val",
               files / "val.txt", "--out", out, *TINY, *extra)


@pytest.fixture(scope="module")
def trained(files):
    import torch as t

    n = t.get_num_threads()
    t.set_num_threads(1)
    rc, out, err = finetune(files, files / "run")
    t.set_num_threads(n)
    assert rc == 0, err
    return files / "run", json.loads(out.strip().splitlines()[-1])


def test_learns_a_tagging_rule_and_eval_reports_it(files, trained, one_thread):  # noqa: F811
    run, summary = trained
    assert summary["task"] == "tokens" and summary["labels"] == ["O", "B-X"]
    assert summary["initial_val_f1"] < 0.7 and summary["val_f1"] > 0.9, summary  # far above chance
    assert summary["best_metric"] == "val_f1" and (run / "best" / "head.safetensors").is_file()
    task = json.loads((run / "best" / "config.json").read_text())["task"]
    assert task["name"] == "tokens" and task["spans"] and task["scheme"] == "IOB2"
    rc, out, err = cli("eval", run / "best", "--task", "tokens", "--data", files / "val.txt")
    assert rc == 0, err
    res = json.loads(out)
    assert res["f1"] == pytest.approx(summary["best_value"]) and set(res["per_type"]) == {"X"}
    assert res["accuracy"] > 0.9 and res["words"] > 0 and "loss" in res


def test_tag_writes_its_input_back_line_for_line(files, trained, tmp_path, one_thread):  # noqa: F811
    run, _ = trained
    src = tmp_path / "in.txt"
    src.write_text("-DOCSTART- -X- O\n\nthe NN O\nRome NN O\n\n\nAnna NN O\nwas NN O\n")  # the tag column is ignored
    rc, out, err = cli("tag", run / "best", "--input", src)
    assert rc == 0, err
    assert out.split("\n") == ["-DOCSTART- -X- O", "", "the\tO", "Rome\tB-X", "", "", "Anna\tB-X", "was\tO", ""]
    rc, out, _ = cli("tag", run / "best", "--input", src, "--output-format", "jsonl")
    assert [json.loads(r) for r in out.splitlines()] == [{"tokens": ["the", "Rome"], "tags": ["O", "B-X"]},
                                                         {"tokens": ["Anna", "was"], "tags": ["B-X", "O"]}]
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"tokens": ["Bob", "is"]}\n\n{"tokens": []}\n')
    dest = tmp_path / "out.jsonl"
    assert cli("tag", run / "best", "--input", jl, "--out", dest)[0] == 0
    assert dest.read_text().split("\n") == ['{"tokens": ["Bob", "is"], "tags": ["B-X", "O"]}', "",
                                            '{"tokens": [], "tags": []}', ""]
    rc, out, _ = cli("tag", run / "best", "--text", "a film with Maria")
    assert json.loads(out)["tags"] == ["O", "O", "O", "B-X"]
    conllu = tmp_path / "in.conllu"
    conllu.write_text("# c\n1\tAnna\t_\t_\t_\t_\t_\t_\t_\t_\n2-3\tx\t_\t_\t_\t_\t_\t_\t_\t_\n2\tflew\t_\t_\t_\t_\t_\t_\t_\t_\n")
    rc, out, _ = cli("tag", run / "best", "--input", conllu)
    assert out.splitlines()[0] == "# c" and out.splitlines()[1].split("\t")[3] == "B-X"
    assert out.splitlines()[2].startswith("2-3\tx") and out.splitlines()[3].split("\t")[3] == "O"


def test_hf_export_matches_within_1e4(files, trained, tmp_path, one_thread):  # noqa: F811
    pytest.importorskip("transformers")
    from transformers import AutoModelForTokenClassification

    from scalelm.tasks.tokens.files import load_tagger

    run, _ = trained
    assert cli("convert", run / "best", "--to-hf", tmp_path / "hf")[0] == 0
    hf = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf").eval()
    model, _, _ = load_tagger(run / "best")
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, model(idx), atol=1e-4, rtol=0)
    assert hf.config.id2label == {0: "O", 1: "B-X"}


def test_lora_and_encoder_bases(files, tmp_path, one_thread):  # noqa: F811
    rc, out, err = finetune(files, tmp_path / "lora", "--lora.r=4", "--optim.lr=1e-2")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trainable_params"] < summary["params"] / 2 and summary["val_f1"] > 0.5, summary
    assert (tmp_path / "lora" / "best" / "adapter.safetensors").is_file()
    rc, out, err = cli("tag", tmp_path / "lora" / "best", "--text", "with Anna")
    assert rc == 0 and json.loads(out)["tags"][1] == "B-X", err
    rc, out, err = finetune(files, tmp_path / "enc", base="encoder")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["val_f1"] > 0.9, summary


@pytest.mark.parametrize("train, val, message", [
    ("Anna B-X\nflew NN O\n", None, "train.txt:2: 3 columns, but the file's first word line has 2"),
    (None, "Rome NN B-LOC\n", "val.txt:1: unknown tag 'B-LOC'"),
    (None, "", "val.txt is empty"),
    ('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": \n', None, "train.txt:2: not valid JSON"),
])
def test_bad_input_is_one_line_naming_the_file(files, tmp_path, train, val, message, one_thread):  # noqa: F811
    t, v = files / "train.txt", files / "val.txt"
    if train is not None:
        t = tmp_path / "train.txt"
        t.write_text(train)
    if val is not None:
        v = tmp_path / "val.txt"
        v.write_text(val)
    fmt = ["--format", "jsonl"] if train and train.startswith("{") else []
    rc, out, err = cli("finetune", "tokens", "--base", files / "base", "--train", t, "--val", v, "--out",
                       tmp_path / "run", *fmt, *TINY)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
