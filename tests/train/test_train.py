"""`scalelm train` end to end: it learns, logs what it says, and bad input gets advice."""

import json
import math
import resource
import subprocess
import sys

import pytest
from train_helpers import (  # noqa: F401 (fixture)
    ONE_THREAD,
    TINY,
    cli,
    make_char_data,
    one_thread,
    read_metrics,
    shakespeare_data,
)

from scalelm.config import Config
from scalelm.data.loader import TokenData
from scalelm.train.optim import lr_at
from scalelm.train.trainer import OutOfMemory, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    return shakespeare_data(shared_data, tmp_path_factory.mktemp("data") / "d", chars=60_000)


def test_train_learns_logs_metrics_and_plots(tmp_path, data, one_thread):
    out = tmp_path / "run"
    rc, so, se = cli("train", "--data", data, "--out", out, *TINY, "--train.max_steps=40", "--train.eval_every=20",
                     "--optim.lr=3e-3", "--train.precision=fp32")
    assert rc == 0, se
    summary = json.loads(so)
    assert summary["step"] == 40 and summary["stopped"] == "max_steps" and summary["precision"] == "fp32"
    assert "precision: fp32" in se
    # learned: chance level is ln(vocab) ~ 4.1 nats; 40 steps of a tiny model get well below
    assert summary["initial_val_loss"] > 3.8 and summary["val_loss"] < summary["initial_val_loss"] - 0.6
    recs = read_metrics(out)
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41)) and [r["step"] for r in val] == [0, 20, 40]
    for r in train:
        assert {"lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_mb", "elapsed_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["mfu"] > 0 and r["grad_norm"] > 0
        assert r["tokens"] == r["step"] * 4 * 32
    cfg = Config()
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 2
    assert [r["lr"] for r in train] == pytest.approx([lr_at(s, cfg.optim, 40) for s in range(40)])
    v = val[-1]
    assert v["val_perplexity"] == pytest.approx(math.exp(v["val_loss"]))
    meta = json.loads((data / "meta.json").read_text())["splits"]["val"]
    assert v["val_bits_per_byte"] == pytest.approx(v["val_loss"] / math.log(2) * meta["tokens"] / meta["bytes"])
    best = json.loads((out / "best" / "config.json").read_text())
    assert best["step"] == 40 and best["val_loss"] == pytest.approx(summary["best_val_loss"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["vocab_size"] == TokenData(data).vocab_size  # followed the data
    rc, so, se = cli("plot", out)
    assert rc == 0, se
    for path in json.loads(so).values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_get_clear_errors(tmp_path, data, one_thread):
    out = tmp_path / "run"
    rc, _, se = cli("train", "--data", data, "--out", out, *TINY, "--optim.lrr=1")
    assert rc == 2 and "did you mean 'optim.lr'" in se
    rc, _, se = cli("train", "--data", data, "--out", out, *TINY, "--model.vocab_size=20")
    assert rc == 2 and "vocabulary has" in se and "--model.vocab_size=" in se
    rc, _, se = cli("train", "--data", data, "--out", out, *TINY, "--train.precision=fp16")
    assert rc == 2 and "bf16" in se
    rc, _, se = cli("train", "--out", out, *TINY)
    assert rc == 2 and "--data" in se
    rc, _, se = cli("train", "--data", tmp_path / "nope", "--out", out, *TINY)
    assert rc == 2 and "scalelm prepare" in se
    small = make_char_data(tmp_path / "small", "tiny corpus " * 20)
    rc, _, se = cli("train", "--data", small, "--out", out, *TINY, "--model.block_size=64")
    assert rc == 2 and "block_size" in se
    rc, _, se = cli("train", "--data", data, "--out", out, *TINY, "--train.global_batch_size=6")
    assert rc == 2 and "not a multiple of micro_batch_size" in se
    assert not out.exists()  # nothing was written by a refused run


def test_explicit_vocab_larger_than_the_data_is_kept(tmp_path, data, one_thread):
    out = tmp_path / "run"
    rc, so, se = cli("train", "--data", data, "--out", out, *TINY, "--model.vocab_size=128", "--train.max_steps=2",
                     "--train.eval_every=0")
    assert rc == 0, se
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 128


@pytest.mark.slow
def test_out_of_memory_says_what_to_do(tmp_path, data):
    """A real allocation failure: the address space is capped so that the step cannot fit."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    p = subprocess.run([sys.executable, "-m", "scalelm", "train", "--data", str(data), "--out", str(tmp_path / "r"),
                        "--model.n_layer=1", "--model.n_embd=256", "--model.n_head=2", "--model.block_size=256",
                        "--train.micro_batch_size=4096", "--train.max_steps=2", "--train.eval_every=0",
                        "--train.precision=fp32", "--log.progress=false"],
                       capture_output=True, text=True, preexec_fn=cap, timeout=300,
                       env={**__import__("os").environ, **ONE_THREAD})
    assert p.returncode == 2, p.stderr[-2000:]
    assert "out of memory" in p.stderr and "--train.micro_batch_size=2048 --train.grad_accum_steps=2" in p.stderr
    assert "activation_checkpointing=true" in p.stderr and "Traceback" not in p.stderr


def _trainer(data, out, **train):
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd = data.vocab_size, 32, 2, 2, 32
    cfg.train.micro_batch_size, cfg.train.precision, cfg.train.eval_iters, cfg.log.progress = 4, "fp32", 2, False
    cfg.optim.warmup_steps = 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return Trainer(cfg, data, out)


def test_oom_inside_the_step_is_converted(tmp_path, data, one_thread, monkeypatch):
    t = _trainer(TokenData(data), tmp_path / "r", max_steps=3, eval_every=0)

    def boom():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9999999999 bytes")

    monkeypatch.setattr(t, "train_step", boom)
    with pytest.raises(OutOfMemory, match="micro_batch_size=2 --train.grad_accum_steps=2"):
        t.fit()


def test_early_stopping_time_budget_and_sigint_free_exit(tmp_path, data, one_thread):
    d = TokenData(data)
    # a learning rate too small to move the validation loss: patience 2 stops after two flat evaluations
    t = _trainer(d, tmp_path / "es", max_steps=100, eval_every=2, early_stop_patience=2)
    t.cfg.optim.lr, t.cfg.optim.min_lr = 1e-12, 1e-12
    s = t.fit()
    assert s["stopped"] == "early_stop" and s["step"] == 4 and s["best_step"] == 0
    assert (tmp_path / "es" / "ckpt-00000004").is_dir()
    # a tiny time budget stops (and saves) after the first step
    t = _trainer(d, tmp_path / "tb", max_steps=100, eval_every=0, max_minutes=1e-6)
    s = t.fit()
    assert s["stopped"] == "time_budget" and s["step"] == 1 and (tmp_path / "tb" / "ckpt-00000001").is_dir()


def test_time_budget_schedule_decays_by_the_time_left(tmp_path, data, one_thread):
    from scalelm.train.optim import lr_at

    t = _trainer(TokenData(data), tmp_path / "s", max_steps=100_000, eval_every=0, max_minutes=1.0)
    assert t.schedule_steps(0.0) == 100_000  # no step yet: nothing to project from
    t.step = 100
    assert t.schedule_steps(30.0) == 200  # half the minute for 100 steps: the budget ends near step 200
    assert t.schedule_steps(60.0) == 101  # out of time: the next step is the last
    assert t.schedule_steps(1e-4) == 100_000  # faster than max_steps needs: max_steps decides
    t.cfg.optim.schedule, t.cfg.optim.warmup_steps = "cosine", 0
    assert lr_at(100, t.cfg.optim, t.schedule_steps(59.9)) < 0.01 * t.cfg.optim.lr + t.cfg.optim.min_lr
    t.cfg.train.max_minutes = None
    assert t.schedule_steps(30.0) == 100_000


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, data, one_thread):
    d = TokenData(data)
    a = _trainer(d, tmp_path / "a", max_steps=3, eval_every=0).fit()
    b = _trainer(d, tmp_path / "b", max_steps=3, eval_every=0, activation_checkpointing=True).fit()
    assert a["train_loss"] == b["train_loss"]


def test_resume_elsewhere_and_init_from(tmp_path, data, one_thread):
    a = tmp_path / "a"
    args = [*TINY, "--train.max_steps=6", "--train.save_every=3", "--train.eval_every=3", "--model.dropout=0.1",
            "--train.precision=fp32"]
    assert cli("train", "--data", data, "--out", a, *args)[0] == 0
    # --resume a checkpoint of run a into a new run: the continuation equals run a's own steps
    b = tmp_path / "b"
    rc, so, se = cli("train", "--data", data, "--out", b, *args, "--resume", a / "ckpt-00000003")
    assert rc == 0, se
    la = [(r["step"], r["loss"]) for r in read_metrics(a) if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in read_metrics(b) if "loss" in r]
    assert lb == la[3:]
    # --init-from: a new run (step 0) starting from trained weights
    c = tmp_path / "c"
    rc, so, se = cli("train", "--data", data, "--out", c, *args, "--init-from", a / "best", "--train.max_steps=1")
    assert rc == 0, se
    first = [r for r in read_metrics(c) if "val_loss" in r][0]
    best = json.loads((a / "best" / "config.json").read_text())
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)


def test_tensorboard(tmp_path, data, one_thread):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    rc, _, se = cli("train", "--data", data, "--out", out, *TINY, "--train.max_steps=2", "--log.tensorboard=true")
    assert rc == 0, se
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_compile_matches_eager(tmp_path, data, one_thread):
    d = TokenData(data)
    a = _trainer(d, tmp_path / "a", max_steps=2, eval_every=0).fit()
    b = _trainer(d, tmp_path / "b", max_steps=2, eval_every=0, compile=True).fit()
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)


def test_toml_config_file(tmp_path, data, one_thread):
    cfg = tmp_path / "run.toml"
    cfg.write_text('preset = "baby"\n[model]\nn_layer = 1\nblock_size = 32\nvocab_size = 96\n'
                   '[train]\nmax_steps = 3\nmicro_batch_size = 4\neval_every = 0\ntrain_tokens = 5\n')
    rc, _, se = cli("train", "--config", cfg, "--data", data, "--out", tmp_path / "r", "--log.progress=false")
    assert rc == 2 and "unknown config key 'train.train_tokens'" in se
    cfg.write_text(cfg.read_text().replace("train_tokens = 5\n", "global_batch_tokens = 256\n"))
    rc, so, se = cli("train", "--config", cfg, "--data", data, "--out", tmp_path / "r", "--log.progress=false",
                     "--train.max_steps=2")
    assert rc == 0, se
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["model"]["n_embd"] == 128 and saved["model"]["n_layer"] == 1  # preset, then the file
    assert saved["model"]["vocab_size"] == 96  # set in the file: kept, not taken from the data
    assert saved["train"]["max_steps"] == 2 and json.loads(so)["tokens"] == 2 * 256  # overrides win
    assert "4 x 2 accum" in se  # 256 tokens = 8 sequences of 32 = micro batch 4 x 2 accumulation steps


def test_keep_freed_memory_tunes_glibc_unless_the_user_did(monkeypatch):
    import platform

    from scalelm.train.trainer import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # e.g. the memory probe's setting: left alone
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    for k in [k for k in __import__("os").environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(k)
    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True
    assert Config().train.keep_freed_memory is True
