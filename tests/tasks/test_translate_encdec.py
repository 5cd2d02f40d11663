"""Translation with the encoder-decoder: pair batches (source mask, shifted decoder input, labels),
resumable and sharded; `finetune translate` from scratch on Multi30k lines, `scalelm translate`,
`eval --task translate`, exact resume from a checkpoint, continuing from `--base`."""

import json

import numpy as np
import pytest
import torch
from train_helpers import cli, one_thread, read_metrics  # noqa: F401

from scalelm.model.loss import IGNORE_INDEX
from scalelm.tasks.translate.encdec import Pair, Seq2SeqBatches, collate

pytestmark = pytest.mark.usefixtures("one_thread")
EOT = 0
TINY = ["--model.n_layer=1", "--model.n_encoder_layer=1", "--model.n_decoder_layer=1", "--model.n_head=2",
        "--model.n_embd=32", "--model.intermediate_size=64", "--model.block_size=64", "--model.dropout=0.0",
        "--train.micro_batch_size=8", "--train.eval_every=5", "--train.save_every=5", "--train.log_every=1",
        "--log.progress=false", "--optim.warmup_steps=1", "--train.precision=fp32", "--optim.lr=3e-3"]


def _pairs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Pair(rng.integers(3, 50, rng.integers(1, 9)), np.append(rng.integers(3, 50, rng.integers(1, 7)), EOT))
            for _ in range(n)]


def test_collate_pads_the_source_with_a_mask_and_shifts_the_target():
    a = Pair(np.array([5, 6, 7]), np.array([8, 9, EOT]))
    b = Pair(np.array([4]), np.array([3, 2, 1, EOT]))
    src, valid, tgt_in, labels = collate([a, b], EOT, fill=2)
    assert src.tolist() == [[5, 6, 7], [4, 2, 2]]
    assert valid.tolist() == [[True] * 3, [True, False, False]]
    assert tgt_in.tolist() == [[EOT, 8, 9, 2], [EOT, 3, 2, 1]]
    assert labels.tolist() == [[8, 9, EOT, IGNORE_INDEX], [3, 2, 1, EOT]]


def test_batches_are_deterministic_resumable_and_sharded():
    pairs = _pairs()

    def take(b, n):
        return [b.next_batch() for _ in range(n)]

    full = take(Seq2SeqBatches(pairs, 4, 2, eot=EOT, seed=3), 30)  # past an epoch (40 pairs, 8 per step)
    again = take(Seq2SeqBatches(pairs, 4, 2, eot=EOT, seed=3), 30)
    assert all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(full, again))
    first = Seq2SeqBatches(pairs, 4, 2, eot=EOT, seed=3)
    take(first, 11)  # mid-step (accum 2)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Seq2SeqBatches(pairs, 4, 2, eot=EOT, seed=3)
    resumed.load_state_dict(state)
    assert all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(full[11:], take(resumed, 19)))
    # two data-parallel ranks together see one rank's global batches (the same pairs per step)
    r0, r1 = (Seq2SeqBatches(pairs, 2, 2, eot=EOT, seed=3, dp_rank=r, dp_world=2) for r in (0, 1))
    one = Seq2SeqBatches(pairs, 8, 1, eot=EOT, seed=3)
    for _ in range(5):
        seen = sorted(tuple(row[row != IGNORE_INDEX].tolist()) for b in (r0, r1) for _ in range(2)
                      for row in b.next_batch()[3])
        assert seen == sorted(tuple(row[row != IGNORE_INDEX].tolist()) for row in one.next_batch()[3])
    with pytest.raises(Exception, match="does not match"):
        Seq2SeqBatches(pairs, 4, 1, eot=EOT, seed=3).load_state_dict(state)


def test_padding_does_not_change_the_loss():
    from scalelm.config import ModelConfig
    from scalelm.model.build import build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="encoder-decoder", vocab_size=50, block_size=16, n_layer=1, n_head=2,
                                n_embd=16)).eval()
    pairs = _pairs(6)
    one = [m(s, tin, lab, src_valid=v)[1] for s, v, tin, lab in (collate([p], EOT) for p in pairs)]
    s, v, tin, lab = collate(pairs, EOT, fill=7)
    per_row = [m(s[[i]], tin[[i]], lab[[i]], src_valid=v[[i]])[1] for i in range(len(pairs))]
    torch.testing.assert_close(torch.stack(per_row), torch.stack(one), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def multi30k(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("m30k")
    for split, n in (("train", 300), ("val", 16)):
        for lang in ("en", "de"):
            lines = (shared_data / "multi30k" / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (d / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def _args(d, out, steps, *extra):
    return ["finetune", "translate", "--preset", "transformer-small", "--vocab-size", "300", "--source",
            d / "train.en", "--target", d / "train.de", "--val-source", d / "val.en", "--val-target", d / "val.de",
            "--out", out, f"--train.max_steps={steps}", *TINY, *extra]


def _in_process(*args):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELM_PEAK_TFLOPS", "1")
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return cli(*args)
        finally:
            torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(multi30k, tmp_path_factory):
    out = tmp_path_factory.mktemp("tr") / "run"
    rc, so, se = _in_process(*_args(multi30k, out, 10))
    assert rc == 0, se
    return out, json.loads(so)


def test_finetune_translate_trains_an_encoder_decoder(run):
    out, s = run
    assert s["task"] == "translate" and s["arch"] == "encoder-decoder" and s["label_smoothing"] == 0.1
    assert s["step"] == 10 and s["best_val_loss"] < s["initial_val_loss"]
    cfg = json.loads((out / "best" / "config.json").read_text())
    task = cfg["task"]
    assert task["name"] == "translate" and task["arch"] == "encoder-decoder" and task["label_smoothing"] == 0.1
    assert cfg["model"]["arch"] == "encoder-decoder"
    assert (out / "best" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    assert json.loads((out / "task.json").read_text())["packing"] == "off"


def test_translate_and_eval_load_the_encoder_decoder(run, multi30k, tmp_path):
    from scalelm.tasks.translate.encdec import EncDecTranslator
    from scalelm.tasks.translate.model import load_translator

    src = (multi30k / "val.en").read_text().splitlines()[:5]
    inp = tmp_path / "in.en"
    inp.write_text("\n".join(src[:2] + [""] + src[2:]) + "\n")
    rc, so, se = cli("translate", run[0], "--input", inp, "--batch-size", "3", "--max-new-tokens", "10")
    assert rc == 0, se
    lines = so.split("\n")[:-1]
    assert len(lines) == 6 and lines[2] == ""
    model = load_translator(run[0])
    assert isinstance(model, EncDecTranslator)
    assert model.translate(src, batch_size=1, max_new_tokens=10) == lines[:2] + lines[3:]
    rc, _, se = cli("translate", run[0] / "best", "--input", inp, "--beams", "3", "--out", tmp_path / "o.de",
                    "--max-new-tokens", "10")
    assert rc == 0, se
    assert len((tmp_path / "o.de").read_text().split("\n")) == 7
    rc, so, se = cli("eval", run[0], "--task", "translate", "--source", multi30k / "val.en", "--reference",
                     multi30k / "val.de", "--batch-size", "8", "--limit", "6")
    assert rc == 0, se
    res = json.loads(so)
    assert res["n"] == 6 and 0 <= res["bleu"] <= 100 and 0 <= res["chrf"] <= 100


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(run, multi30k, tmp_path):
    out, _ = run
    resumed = tmp_path / "resumed"
    rc, _so, se = _in_process(*_args(multi30k, resumed, 10, "--resume", out / "ckpt-00000005"))
    assert rc == 0 and "resumed from" in se, se

    def losses(d):
        return {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}

    def vals(d):
        return {r["step"]: r["val_loss"] for r in read_metrics(d) if "val_loss" in r}

    a, b = losses(out), losses(resumed)
    assert [a[k] for k in range(6, 11)] == [b[k] for k in range(6, 11)]
    assert vals(out)[10] == vals(resumed)[10]


def test_settings_are_checked(run, multi30k, tmp_path):
    out, _ = run
    rc, _, se = _in_process(*_args(multi30k, out, 10, "--label-smoothing", "0.2"))
    assert rc == 2 and "label_smoothing" in se
    rc, _, se = _in_process(*_args(multi30k, tmp_path / "p", 2, "--packing", "on"))
    assert rc == 2 and "--packing" in se
    rc, _, se = _in_process("finetune", "translate", "--preset", "baby", "--vocab-size", "300", "--source",
                            multi30k / "train.en", "--target", multi30k / "train.de", "--val-source",
                            multi30k / "val.en", "--val-target", multi30k / "val.de", "--out", tmp_path / "d",
                            "--label-smoothing", "0.1")
    assert rc == 2 and "encoder-decoder" in se


def test_base_continues_an_encoder_decoder(run, multi30k, tmp_path):
    out, _ = run
    d = multi30k
    rc, so, se = _in_process("finetune", "translate", "--base", out / "best", "--source", d / "train.en",
                             "--target", d / "train.de", "--val-source", d / "val.en", "--val-target", d / "val.de",
                             "--out", tmp_path / "ft", "--train.max_steps=3", "--train.eval_every=3",
                             "--train.micro_batch_size=8", "--log.progress=false", "--train.precision=fp32")
    assert rc == 0, se
    s = json.loads(so)
    assert s["arch"] == "encoder-decoder" and s["step"] == 3
    # starting from the trained model: its first validation is the base's best
    assert s["initial_val_loss"] == pytest.approx(run[1]["best_val_loss"], rel=1e-5)


def _torchrun_translate(d, out, nproc, *extra):
    import subprocess

    from dist_launch import ROOT, torchrun_cmd, worker_env

    args = _args(d, out, 4, "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.eval_every=2",
                 "--train.save_every=2", *extra)
    p = subprocess.run(torchrun_cmd(nproc, "-m", "scalelm", *args), check=False, capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    return read_metrics(out)


@pytest.fixture(scope="module")
def single(multi30k, tmp_path_factory):
    return _torchrun_translate(multi30k, tmp_path_factory.mktemp("one") / "run", 1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--parallel.dp_replicate=2", "--parallel.dp_shard=1"], []],
                         ids=["ddp", "fsdp2"])
def test_ddp_and_fsdp2_train_like_one_process(multi30k, single, tmp_path, layout):
    two = _torchrun_translate(multi30k, tmp_path / "two", 2, *layout)
    for key in ("loss", "val_loss"):
        a = {r["step"]: r[key] for r in single if key in r}
        b = {r["step"]: r[key] for r in two if key in r}
        assert a.keys() == b.keys() and len(a) >= 3
        assert all(abs(a[k] - b[k]) < 1e-5 for k in a), (key, a, b)
    # the run's latest checkpoint (sharded under FSDP2) and best/ translate
    inp = tmp_path / "in.en"
    inp.write_text("A man is sleeping.\n")
    for ckpt in (tmp_path / "two", tmp_path / "two" / "best"):
        rc, so, se = cli("translate", ckpt, "--input", inp, "--max-new-tokens", "5")
        assert rc == 0 and len(so.split("\n")) == 2, se
