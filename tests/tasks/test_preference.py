"""Preference tuning (`finetune dpo`): each loss and its rewards equal TRL's on the same log-probs, the
three pair formats, targets on the final reply only, the reference cache equal to recomputation, a LoRA
run's reference equal to the model with its adapters off, exact resume after a crash, TRL's metric
names in metrics.jsonl, and `eval --task preference` seeing what DPO learned."""

import json

import numpy as np
import pytest
import torch
from test_sft import EOT, PAD, char_tokenizer
from train_helpers import cli, one_thread, read_metrics  # noqa: F401

from scalelm.config import ModelConfig
from scalelm.model import GPT
from scalelm.model.io import save_model_dir
from scalelm.model.loss import IGNORE_INDEX
from scalelm.tasks.preference.losses import preference_loss
from scalelm.tasks.preference.pairs import PreferenceDataError, read_pairs

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--train.micro_batch_size=4", "--train.eval_every=4", "--train.save_every=4", "--train.log_every=1",
        "--log.progress=false", "--optim.warmup_steps=1", "--train.precision=fp32", "--optim.lr=3e-3"]


# ----------------------------------------------------------------------------- the losses against TRL

def _trl_cpo(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    """TRL's CPO loss function on tensors (the trainer's method, called on a stand-in for the trainer)."""
    import os
    from types import SimpleNamespace

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    me = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                         simpo_gamma=simpo_gamma, accelerator=SimpleNamespace(device=torch.device("cpu")))
    return lambda c, r: CPOTrainer.cpo_loss(me, c, r)


@pytest.fixture
def logps():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-40 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    nc, nr = torch.randint(1, 30, (64,), generator=g), torch.randint(1, 30, (64,), generator=g)
    return pc, pr, rc, rr, nc, nr


@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_sigmoid_and_conservative_dpo_equal_trl(logps, beta, ls):
    """TRL's DPO sigmoid loss is -logsigmoid(beta * ((pc - rc) - (pr - rr))); conservative DPO smooths it as
    TRL's sigmoid CPO loss does, which on the log-ratios is the same function."""
    pytest.importorskip("trl")
    pc, pr, rc, rr, nc, nr = logps
    ours, ch, rj = preference_loss("sigmoid", pc, pr, nc, nr, rc, rr, beta=beta, label_smoothing=ls)
    theirs, _, _ = _trl_cpo("sigmoid", beta, ls)(pc - rc, pr - rr)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ch, beta * (pc - rc), rtol=0, atol=1e-6)  # TRL's rewards/chosen
    torch.testing.assert_close(rj, beta * (pr - rr), rtol=0, atol=1e-6)
    if ls == 0:  # and the DPO trainer's own formula
        torch.testing.assert_close(ours, -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))))


def test_ipo_equals_trl(logps):
    """TRL's IPO divides each log-ratio by its reply's token count, then (h - 1/(2 beta))^2."""
    pytest.importorskip("trl")
    pc, pr, rc, rr, nc, nr = logps
    ours, ch, _ = preference_loss("ipo", pc, pr, nc, nr, rc, rr, beta=0.3)
    theirs, _, _ = _trl_cpo("ipo", 0.3)((pc - rc) / nc, (pr - rr) / nr)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ch, 0.3 * (pc - rc), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_equals_trl(logps, ls):
    """SimPO: TRL's CPO trainer with loss_type simpo on average log-probabilities (cpo_alpha 0)."""
    pytest.importorskip("trl")
    pc, pr, _, _, nc, nr = logps
    ours, ch, rj = preference_loss("simpo", pc, pr, nc, nr, beta=2.0, label_smoothing=ls, simpo_gamma=0.7)
    theirs, tch, trj = _trl_cpo("simpo", 2.0, ls, 0.7)(pc / nc, pr / nr)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ch, tch, rtol=0, atol=1e-6)
    torch.testing.assert_close(rj, trj, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the data

def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_the_three_pair_formats_read_alike(tmp_path):
    hh_prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: add 2 and 2\n\nAssistant:"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "add 2 and 2"}]
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": hh_prompt, "chosen": " 4", "rejected": " 5"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"chosen": turns + [{"role": "assistant", "content": "4"}],
                                            "rejected": turns + [{"role": "assistant", "content": "5"}]}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"chosen": hh_prompt + " 4", "rejected": hh_prompt + " 5"}])
    d = write_jsonl(tmp_path / "d.jsonl", [{"prompt": turns, "chosen": [{"role": "assistant", "content": "4"}],
                                            "rejected": [{"role": "assistant", "content": "5"}]}])
    got = [read_pairs(p)[0] for p in (a, b, c, d)]
    for p in got:
        assert (p.prompt, p.chosen, p.rejected) == (turns, "4", "5")
    plain = read_pairs(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Name a color.", "chosen": "red",
                                                           "rejected": " "}]))[0]
    assert plain.prompt == [{"role": "user", "content": "Name a color."}]
    assert plain.rejected == ""  # a blank reply is a reply (HH has a few): it can be the worse one


@pytest.mark.parametrize("rec,msg", [
    ({"prompt": "x", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "'chosen' is a int, not text"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "'prompt' is blank"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "must share"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "must end with the assistant's reply"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "differ before"),
    ({"chosen": "no turns", "rejected": "at all"}, "whole HH dialogues"),
])
def test_bad_pairs_name_file_and_line(tmp_path, rec, msg):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, rec])
    with pytest.raises(PreferenceDataError, match=msg) as e:
        read_pairs(p)
    assert str(e.value).startswith(f"{p}:2: ")


def test_targets_are_the_final_reply_only_and_long_prompts_keep_their_end():
    from scalelm.data.chat_template import ChatTemplate
    from scalelm.tasks.preference.encode import encode_pair
    from scalelm.tasks.preference.pairs import Pair
    from scalelm.tasks.sft.encode import Encoder
    from scalelm.tasks.sft.template import CHATML

    tok = char_tokenizer()
    enc = Encoder(tok, ChatTemplate(CHATML, EOT, EOT), 200)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "sum?"}]
    e, cut = encode_pair(enc, Pair("f:1", turns, "four", "five!"))
    assert not cut
    for seq, reply in ((e.chosen, "four"), (e.rejected, "five!")):
        text = tok.decode(seq.ids[seq.sup].tolist(), skip_special_tokens=False)
        # as SFT marks a reply (its end-of-turn too); the earlier assistant turn ("hello") is context
        assert text.startswith(reply + "<|im_end|>") and "hello" not in text
    n_prompt = int(np.argmax(e.chosen.sup))
    assert e.chosen.ids[:n_prompt].tolist() == e.rejected.ids[:n_prompt].tolist()
    small = Encoder(tok, ChatTemplate(CHATML, EOT, EOT), 30)  # 31 tokens: the prompt loses its oldest
    e, cut = encode_pair(small, Pair("f:1", turns, "four", "five!"))
    assert cut and len(e.chosen.ids) <= 31 and len(e.rejected.ids) <= 31
    assert tok.decode(e.chosen.ids[e.chosen.sup].tolist(), skip_special_tokens=False).startswith("four<|im_end|>")
    assert "sum?" in tok.decode(e.chosen.ids.tolist(), skip_special_tokens=False)


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("pbase") / "model"
    tok = char_tokenizer((EOT, PAD))
    torch.manual_seed(0)
    save_model_dir(GPT(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=96, n_layer=2, n_head=2, n_embd=32)),
                   d, tok.to_str())
    return d


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A preference the data teaches: the chosen reply repeats the prompt's word, the rejected reverses it."""
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "maple"]
    recs = []
    for i in range(48):
        w = words[rng.integers(len(words))] + str(i % 5)
        recs.append({"prompt": f"echo {w}", "chosen": w, "rejected": w[::-1]})
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "train.jsonl", recs[:40]), write_jsonl(d / "val.jsonl", recs[40:])


def test_dpo_logs_trl_metrics_and_eval_sees_the_preference(base, pairs, tmp_path):
    train, val = pairs
    out = tmp_path / "dpo"
    rc, so, err = cli("finetune", "dpo", "--base", base, "--data", train, "--val", val, "--out", out,
                      "--beta", "0.5", "--train.max_steps=12", *TINY)
    assert rc == 0, err
    s = json.loads(so)
    assert s["task"] == "dpo" and s["reference"] == "computed" and s["train_pairs"] == 40
    recs = read_metrics(out)
    first = next(r for r in recs if "loss" in r)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        assert k in first, k
    assert abs(first["loss"] - np.log(2)) < 1e-6 and first["rewards/margins"] == pytest.approx(0, abs=1e-9)
    assert recs[0]["val_loss"] == pytest.approx(np.log(2), abs=1e-6)  # step 0: the policy is its reference
    assert s["val_rewards/accuracies"] > 0.8 and s["val_loss"] < np.log(2)
    rc, so, err = cli("eval", out / "best", "--task", "preference", "--data", val)
    assert rc == 0, err
    r = json.loads(so)
    assert r["reference"] == str(base.resolve()) and r["accuracy"] > 0.8 and r["mean_margin"] > 0
    rc, so, _ = cli("eval", base, "--task", "preference", "--data", val)  # reference-free, on the untrained base
    assert rc == 0 and json.loads(so)["reference"] is None


def test_reference_cache_equals_recomputation_and_lora_reference_is_adapters_off(base, pairs, tmp_path):
    """The cached reference log-probs equal recomputing them: from the base, and from the trained LoRA
    model with its adapters switched off (while with them on it has moved)."""
    from contextlib import nullcontext

    from safetensors.numpy import load_file

    import scalelm.tasks.preference.train as tr
    from scalelm.checkpoint.adapters import read_adapters
    from scalelm.config import LoRAConfig
    from scalelm.lora import adapters_off, apply_lora
    from scalelm.model.io import load_model_dir
    from scalelm.tasks.preference.objective import reference_logps

    train, val = pairs
    out = tmp_path / "lora"
    args = ["finetune", "dpo", "--base", base, "--data", train, "--val", val, "--out", out, "--lora.r=4", *TINY]
    rc, so, err = cli(*args, "--train.max_steps=6")
    assert rc == 0, err
    cache = load_file(str(out / "reference_logps.safetensors"))
    plans = {}
    real = tr.DPORecipe._reference

    def spy(self, plan, model, base_dir, ctx):
        plans["plan"] = plan
        return real(self, plan, model, base_dir, ctx)

    tr.DPORecipe._reference = spy
    try:  # continued to step 8: the cache is read, not recomputed
        rc, so, err = cli(*args, "--train.max_steps=8")
    finally:
        tr.DPORecipe._reference = real
    assert rc == 0 and json.loads(so)["reference"] == "cached", err
    plan, cpu = plans["plan"], torch.device("cpu")
    model = load_model_dir(out / "base")  # the frozen base: the char tokenizer grown by ChatML's tokens
    np.testing.assert_allclose(reference_logps(model, plan.val, 3, cpu, nullcontext), cache["val"], rtol=0, atol=1e-6)
    apply_lora(model, LoRAConfig(r=4))
    entry, tensors = read_adapters(out / "ckpt-00000008")
    missing = model.load_state_dict({k[len(entry.get("prefix", "")):]: v for k, v in tensors.items()}, strict=False)
    assert not missing.unexpected_keys
    with adapters_off(model):
        np.testing.assert_allclose(reference_logps(model, plan.train, 4, cpu, nullcontext), cache["train"],
                                   rtol=0, atol=1e-6)
    moved = reference_logps(model, plan.train, 4, cpu, nullcontext)
    assert np.abs(moved - cache["train"]).max() > 1e-3  # the adapters did train


def test_dpo_resumes_exactly_after_a_crash(base, pairs, tmp_path, monkeypatch):
    train, val = pairs
    args = ["--base", base, "--data", train, "--val", val, "--train.max_steps=8", *TINY, "--train.save_every=3",
            "--loss", "ipo"]
    ref = tmp_path / "ref"
    assert cli("finetune", "dpo", "--out", ref, *args)[0] == 0
    import scalelm.tasks.preference.objective as obj

    calls = {"n": 0}
    real = obj.PreferenceObjective.__call__

    def crashing(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # after the step-3 checkpoint
            raise KeyboardInterrupt
        return real(self, model, batch)

    out = tmp_path / "crashed"
    monkeypatch.setattr(obj.PreferenceObjective, "__call__", crashing)
    assert cli("finetune", "dpo", "--out", out, *args)[0] == 130
    monkeypatch.setattr(obj.PreferenceObjective, "__call__", real)
    rc, _so, err = cli("finetune", "dpo", "--out", out, *args)
    assert rc == 0 and "resumed from" in err, err

    def curve(d):
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("rewards/margins")) for r in read_metrics(d)]

    assert curve(out) == curve(ref)


def test_simpo_needs_no_reference_and_bad_settings_are_one_line(base, pairs, tmp_path):
    train, val = pairs
    rc, so, err = cli("finetune", "dpo", "--base", base, "--data", train, "--val", val, "--out", tmp_path / "s",
                      "--loss", "simpo", "--train.max_steps=2", *TINY)
    assert rc == 0, err
    assert "reference" not in json.loads(so) and not (tmp_path / "s" / "reference_logps.safetensors").exists()
    for bad, msg in ((["--beta", "0"], "--beta must be positive"),
                     (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
                     (["--loss", "ipo", "--label-smoothing", "0.1"], "IPO has no labels")):
        rc, _, err = cli("finetune", "dpo", "--base", base, "--data", train, "--out", tmp_path / "b", *bad, *TINY)
        assert rc == 2 and msg in err and "Traceback" not in err, err
    rc, _, err = cli("finetune", "dpo", "--data", train, "--out", tmp_path / "c")
    assert rc == 2 and "pass --base MODEL_DIR" in err


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_trains_like_one_process_with_each_rank_scoring_a_share_of_the_reference(base, pairs, tmp_path):
    """Two DDP processes: the reference cache (each rank scores a share, then they are gathered) equals
    one process's, and so does every step's loss and reward margin."""
    import subprocess

    from dist_launch import ROOT, torchrun_cmd, worker_env
    from safetensors.torch import load_file

    train, val = pairs
    args = lambda out: ["finetune", "dpo", "--base", base, "--data", train, "--val", val, "--out", out,  # noqa: E731
                        "--train.max_steps=4", "--train.global_batch_size=8", *TINY]
    assert cli(*args(tmp_path / "one"))[0] == 0
    p = subprocess.run(torchrun_cmd(2, "-m", "scalelm", *args(tmp_path / "ddp"), "--parallel.dp_replicate=2",
                                    "--parallel.dp_shard=1"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
    assert p.returncode == 0, p.stderr[-6000:]
    one, ddp = (load_file(tmp_path / d / "reference_logps.safetensors") for d in ("one", "ddp"))
    assert one.keys() == ddp.keys() and all(torch.allclose(one[k], ddp[k], atol=1e-6) for k in one)

    def curve(d):
        return {r["step"]: (r["loss"], r["rewards/margins"]) for r in read_metrics(d) if "loss" in r}

    a, b = curve(tmp_path / "one"), curve(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s][0] - b[s][0]) < 1e-5 and abs(a[s][1] - b[s][1]) < 1e-5 for s in a), (a, b)
