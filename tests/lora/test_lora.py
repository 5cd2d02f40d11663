"""LoRA: adapters only train, merged == unmerged, checkpoints hold adapters + the base's hash, exact
resume (also after SIGKILL), a changed base is refused, `scalelm merge`, PEFT parity, DDP/FSDP2."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file
from train_helpers import (  # noqa: F401
    ONE_THREAD,
    TINY,
    cli,
    one_thread,
    read_metrics,
    shakespeare_data,
)

from scalelm.config import ConfigError, LoRAConfig, ModelConfig
from scalelm.errors import CheckpointError
from scalelm.lora import (
    NEEDS_BASE,
    LoRAFiles,
    LoRALinear,
    apply_lora,
    merge_lora,
    parse_targets,
)
from scalelm.model import GPT
from scalelm.model.io import load_model, load_model_dir, save_model_dir
from scalelm.train.model_io import ModelIO

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STYLES = {
    "gpt2": dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, pos_embedding="learned",
                 norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, pos_embedding="rope",
                  norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}
IDX = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def random_gpt(style: str, dtype=torch.float32) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(**STYLES[style])).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms and biases non-trivial
    return m.eval()


def with_adapters(gpt: GPT, targets: str, r: int = 2, alpha: float = 6.0) -> GPT:
    apply_lora(gpt, LoRAConfig(r=r, alpha=alpha, targets=targets))
    with torch.no_grad():
        for layer in gpt.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.3)  # zero-initialised B would make every check trivial
    return gpt


def logits(m, idx=IDX):
    with torch.no_grad():
        return m.eval()(idx % m.cfg.vocab_size)[0]


# ----------------------------------------------------------------------------- layers

@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_merged_model_computes_what_the_adapted_model_does(style, tmp_path):
    gpt = with_adapters(random_gpt(style, torch.float64), "all")
    want = logits(gpt)
    assert not torch.allclose(want, logits(random_gpt(style, torch.float64)))  # the adapters do something
    # the model layer's loader (base dir + adapter dir) merges to the same function
    base = save_model_dir(random_gpt(style, torch.float64), tmp_path / "base")
    LoRAFiles(ModelIO(), gpt, base).save(gpt, gpt.state_dict(), tmp_path / "lora", None, {})
    loaded = load_model_dir(tmp_path / "lora")
    assert type(loaded) is GPT and not any(isinstance(m, LoRALinear) for m in loaded.modules())
    assert (logits(loaded) - want).abs().max() < 1e-5  # loaded as fp32
    merged = merge_lora(gpt)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert (logits(merged) - want).abs().max() < 1e-10
    assert set(merged.state_dict()) == set(random_gpt(style).state_dict())


def test_only_adapters_get_gradients_and_the_base_stays_unchanged():
    from scalelm.config import OptimConfig
    from scalelm.train.optim import build_optimizer

    gpt = random_gpt("llama")
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    names = apply_lora(gpt, LoRAConfig(r=2, targets="q,v,down"))
    assert names == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q_proj", "attn.v_proj", "mlp.down")]
    trainable = {n for n, p in gpt.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    opt = build_optimizer(gpt, OptimConfig(lr=1e-2))
    gpt.train()
    for _ in range(3):
        loss = gpt(IDX[:, :-1], IDX[:, 1:])[1]
        loss.backward()
        assert all((p.grad is not None) == p.requires_grad for p in gpt.parameters())
        opt.step()
        opt.zero_grad()
    sd = gpt.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base.items())  # base names unchanged, values untouched
    assert all(sd[f"{n}.lora_B"].abs().sum() > 0 for n in names)  # B started at zero and trained


def test_targets_parse_and_bad_ones_say_what_to_write():
    gelu, swiglu = ModelConfig(**STYLES["gpt2"]), ModelConfig(**STYLES["llama"])
    assert parse_targets("all", swiglu) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert parse_targets("all", gelu) == parse_targets("attn,mlp", gelu) == ["q", "k", "v", "o", "up", "down"]
    assert parse_targets(" v, q ,q", gelu) == ["q", "v"]
    for spec, msg in [("qq", "did you mean 'q'"), ("q_proj", "did you mean 'q'"), ("c_attn", "'q,k,v'"),
                      ("attention", "did you mean 'attn'"), ("", "lora.targets is empty")]:
        with pytest.raises(ConfigError, match=msg):
            parse_targets(spec, swiglu)
    with pytest.raises(ConfigError, match="model.mlp=gelu has no gate projection.*up,down"):
        parse_targets("q,gate", gelu)
    gpt = random_gpt("gpt2")
    for bad, msg in [(dict(r=-1), "positive integer rank"), (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout")]:
        with pytest.raises(ConfigError, match=msg):
            apply_lora(gpt, LoRAConfig(**{"r": 4, **bad}))
    assert all(p.requires_grad for p in gpt.parameters())  # a refused model is left as it was
    apply_lora(gpt, LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(gpt, LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="--init-from MODEL_DIR"):
        LoRAFiles(ModelIO(), gpt, None)


# ----------------------------------------------------------------------------- runs from the CLI

LORA = [*TINY, "--train.precision=fp32", "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.1",
        "--model.dropout=0.1", "--optim.lr=1e-2", "--optim.schedule=constant", "--train.eval_every=5",
        "--train.save_every=5"]  # constant: a run stopped at 5 of 10 steps has the same schedule


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    return shakespeare_data(shared_data, tmp_path_factory.mktemp("lora") / "data", chars=20_000)


def train_base(data, run, dropout=0.1):
    """A briefly trained model directory (RUN/best) to adapt; --init-from wants the same model
    config as the run's, dropout included."""
    rc, _, err = cli("train", "--data", data, "--out", run, "--train.max_steps=6", "--train.eval_every=6", *TINY,
                     f"--model.dropout={dropout}")
    assert rc == 0, err
    return run / "best"


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    return train_base(data, tmp_path_factory.mktemp("base") / "run")


def lora_train(data, base, out, steps, *extra):
    init = ["--init-from", base] if base is not None else []
    return cli("train", "--data", data, "--out", out, *init, f"--train.max_steps={steps}", *LORA, *extra)


def losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def lora_run(data, base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run") / "run"
    rc, _, err = lora_train(data, base, out, 10)
    assert rc == 0, err
    return out


def test_a_lora_checkpoint_holds_only_adapters_and_the_base_hash(lora_run, base):
    from scalelm.fileio import sha256_file

    ckpt = lora_run / "ckpt-00000010"
    assert not (ckpt / "model.safetensors").exists() and not (lora_run / "best" / "model.safetensors").exists()
    keys = set(load_file(str(ckpt / "adapter.safetensors")))
    names = [f"blocks.{i}.attn.{x}_proj" for i in range(2) for x in "qkvo"]
    assert keys == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert {k.rsplit("/", 1)[0] for k in load_file(str(ckpt / "optimizer.safetensors"))} == keys
    entry = json.loads((ckpt / "config.json").read_text())["lora"]
    assert entry == {"r": 4, "alpha": 8.0, "dropout": 0.1, "targets": "q,k,v,o", "prefix": "",
                     "base": str(base.resolve()), "base_sha256": sha256_file(base / "model.safetensors")}
    assert json.loads((lora_run / "best" / "config.json").read_text())["lora"] == entry


def test_generate_eval_and_merge_read_a_lora_run(lora_run, data, tmp_path):
    model = load_model(lora_run)
    assert type(model) is GPT and not torch.equal(logits(model), logits(load_model_dir(json_base(lora_run))))
    rc, out, err = cli("generate", lora_run, "--prompt", "ROMEO:", "--max-new-tokens", "8", "--ignore-eos", "--json")
    assert rc == 0 and "generated 8 tokens" in err, err
    rc, out, err = cli("eval", lora_run, "--data", data, "--max-batches", "2")
    assert rc == 0 and json.loads(out)["loss"] > 0, err
    rc, out, err = cli("merge", lora_run, "--out", tmp_path / "merged")
    assert rc == 0, err
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter.safetensors").exists()
    meta = json.loads((merged / "config.json").read_text())
    assert "lora" not in meta and meta["merged_from"]["r"] == 4 and (merged / "tokenizer.json").is_file()
    assert (logits(load_model_dir(merged)) - logits(model)).abs().max() < 1e-5
    # an existing output is replaced only with --overwrite; the run itself never
    assert cli("merge", lora_run, "--out", merged)[0] == 2
    assert cli("merge", lora_run, "--out", merged, "--overwrite")[0] == 0
    rc, _, err = cli("merge", lora_run, "--out", lora_run)
    assert rc == 2 and "source" in err
    rc, _, err = cli("merge", merged, "--out", tmp_path / "again")
    assert rc == 2 and "no LoRA adapters" in err


def json_base(run):
    return json.loads((run / "best" / "config.json").read_text())["lora"]["base"]


def test_lora_needs_a_base_model(data, tmp_path):
    rc, _, err = lora_train(data, None, tmp_path / "run", 2)
    assert rc == 2 and NEEDS_BASE in err


def test_resuming_continues_exactly(data, base, lora_run, tmp_path):
    out = tmp_path / "run"
    assert lora_train(data, base, out, 5)[0] == 0
    rc, _, err = cli("train", "--data", data, "--out", out, "--train.max_steps=10")  # the run's own settings
    assert rc == 0 and "resumed from" in err, err
    assert losses(out) == losses(lora_run)  # bitwise (dropout on both model and adapters)
    assert [s for s, _ in losses(out)] == list(range(1, 11))
    # LoRA settings belong to the run
    rc, _, err = cli("train", "--data", data, "--out", out, "--train.max_steps=12", "--lora.r=8")
    assert rc == 2 and "lora.r: 4 there, 8 now" in err
    rc, _, err = cli("train", "--data", data, "--out", out, "--train.max_steps=12", "--lora.r=0")
    assert rc == 2 and "was trained with LoRA" in err


def test_a_changed_or_missing_base_is_refused(data, base, tmp_path):
    own = tmp_path / "base"
    shutil.copytree(base, own)
    out = tmp_path / "run"
    assert lora_train(data, own, out, 5)[0] == 0
    good = logits(load_model(out))
    sd = load_file(str(own / "model.safetensors"))
    sd["norm_f.weight"] = sd["norm_f.weight"] + 1
    save_file(sd, str(own / "model.safetensors"), metadata={"format": "pt"})
    (own / "manifest.json").unlink()  # a base re-saved by hand: only the hash can tell
    with pytest.raises(CheckpointError, match="not the one the adapters .* were trained on: its weights have sha256 "
                                              "[0-9a-f]{64}, the adapters expect [0-9a-f]{64}"):
        load_model(out)
    rc, _, err = cli("train", "--data", data, "--out", out, "--train.max_steps=8")
    assert rc == 2 and "the adapters expect" in err
    shutil.rmtree(own)
    rc, _, err = cli("generate", out, "--prompt", "A", "--max-new-tokens", "2")
    assert rc == 2 and "which is not there: put the base back" in err
    assert torch.isfinite(good).all()


def test_master_weights_and_activation_checkpointing(data, base, tmp_path):
    out = tmp_path / "run"
    rc, _, err = lora_train(data, base, out, 5, "--train.precision=bf16", "--train.master_weights=true",
                            "--train.activation_checkpointing=true")
    assert rc == 0, err
    adapters = load_file(str(out / "ckpt-00000005" / "adapter.safetensors"))
    assert {t.dtype for t in adapters.values()} == {torch.float32}
    assert load_model(out).tok_emb.weight.dtype == torch.float32  # merged into the fp32 base on disk
    rc, _, err = cli("train", "--data", data, "--out", out, "--train.max_steps=7")
    assert rc == 0 and "resumed from" in err, err


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_loss_curve(data, base, tmp_path):
    steps = 40
    ref = tmp_path / "ref"
    assert lora_train(data, base, ref, steps, "--train.eval_every=10")[0] == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "scalelm", "train", "--data", str(data), "--out", str(out), "--init-from",
           str(base), f"--train.max_steps={steps}", *LORA, "--train.eval_every=10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD})
    import time

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # a checkpoint, then a few steps past it
        if (out / "latest").is_file() and (out / "metrics.jsonl").is_file():
            done = [json.loads(s)["step"] for s in (out / "metrics.jsonl").read_text().splitlines()[:-1]
                    if '"loss"' in s]
            if done and done[-1] >= int((out / "latest").read_text().split("-")[1]) + 2 and done[-1] < steps - 2:
                break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cli("train", "--data", data, "--out", out, f"--train.max_steps={steps}", env=ONE_THREAD)
    assert losses(out) == losses(ref)
    assert [s for s, _ in losses(out)] == list(range(1, steps + 1))


# ----------------------------------------------------------------------------- PEFT

@pytest.mark.parametrize("style, targets", [("gpt2", "q,v,o,down"), ("gpt2", "all"), ("llama", "all"),
                                            ("llama", "k,up")])
def test_peft_loads_the_export_and_computes_the_same_logits(style, targets, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_model_dir(random_gpt(style), tmp_path / "base")
    gpt = with_adapters(random_gpt(style), targets, r=3, alpha=5.0)
    LoRAFiles(ModelIO(), gpt, base).save(gpt, gpt.state_dict(), tmp_path / "lora", None, {})
    want = logits(load_model_dir(tmp_path / "lora"))
    assert cli("convert", base, "--to-hf", tmp_path / "hf")[0] == 0
    rc, _, err = cli("convert", tmp_path / "lora", "--to-peft", tmp_path / "peft")
    assert rc == 0, err
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(IDX).logits
    assert (got - want).abs().max() < 1e-4
    assert (got - logits(load_model_dir(base))).abs().max() > 1e-3  # the adapters were applied
    # --to-hf of the LoRA dir itself exports the merged model
    assert cli("convert", tmp_path / "lora", "--to-hf", tmp_path / "hf_merged")[0] == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_merged")(IDX).logits
    assert (merged - want).abs().max() < 1e-4
    # the output directory follows the same rules as --to-hf
    assert cli("convert", tmp_path / "lora", "--to-peft", tmp_path / "peft")[0] == 2
    assert cli("convert", tmp_path / "lora", "--to-peft", tmp_path / "peft", "--overwrite")[0] == 0


def test_peft_export_refuses_what_hf_cannot_hold(tmp_path):
    cfg = {**STYLES["llama"], "n_shared_blocks": 1}
    torch.manual_seed(0)
    base = save_model_dir(GPT(ModelConfig(**cfg)), tmp_path / "base")
    gpt = GPT(ModelConfig(**cfg))
    apply_lora(gpt, LoRAConfig(r=2))
    LoRAFiles(ModelIO(), gpt, base).save(gpt, gpt.state_dict(), tmp_path / "lora", None, {})
    rc, _, err = cli("convert", tmp_path / "lora", "--to-peft", tmp_path / "peft")
    assert rc == 2 and "n_shared_blocks" in err
    rc, _, err = cli("convert", base, "--to-peft", tmp_path / "peft")
    assert rc == 2 and "not a LoRA checkpoint" in err


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_and_fsdp2_train_a_lora_run_like_one_process(data, tmp_path):
    from dist_launch import ROOT, torchrun_cmd, worker_env

    base = train_base(data, tmp_path / "base", dropout=0.0)  # no dropout: ranks draw other masks

    common = ["--train.micro_batch_size=2", "--train.global_batch_size=8", "--optim.schedule=constant",
              "--lora.dropout=0", "--model.dropout=0", "--lora.targets=all", "--train.max_steps=4",
              "--train.eval_every=2", "--train.save_every=2"]

    def train(out, nproc, *extra):
        args = ["train", "--data", str(data), "--out", str(out), *LORA, *common, *extra]
        if not (out / "config.json").exists():
            args[5:5] = ["--init-from", str(base)]
        if nproc == 1:
            run_cli(*args, env=ONE_THREAD)
        else:
            p = subprocess.run(torchrun_cmd(nproc, "-m", "scalelm", *args), capture_output=True, text=True,
                               timeout=300, cwd=ROOT, env=worker_env(SCALELM_PEAK_TFLOPS=1))
            assert p.returncode == 0, p.stderr[-4000:]
        return dict(losses(out))

    one = train(tmp_path / "one", 1)
    for name, layout in [("ddp", ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]), ("fsdp", [])]:
        got = train(tmp_path / name, 2, *layout)
        assert got.keys() == one.keys() and all(abs(got[k] - one[k]) < 1e-5 for k in one), (name, got, one)
    fsdp = tmp_path / "fsdp"
    assert (fsdp / "ckpt-00000004" / "dcp" / ".metadata").is_file()  # sharded: base + adapters
    assert json.loads((fsdp / "ckpt-00000004" / "config.json").read_text())["lora"]["base"] == str(base.resolve())
    assert (fsdp / "best" / "adapter.safetensors").is_file()
    # the sharded checkpoint and best/ merge to what one process trained
    for a, b in [(fsdp, tmp_path / "one"), (fsdp / "best", tmp_path / "one" / "best")]:
        assert (logits(load_model(a)) - logits(load_model(b))).abs().max() < 1e-4
    # resumes cross layouts: the sharded run in one process, the single-process run under FSDP2
    longer = ["--train.max_steps=6"]
    assert set(train(fsdp, 1, *longer)) == set(range(1, 7))
    resumed = train(tmp_path / "one", 2, *longer)
    assert set(resumed) == set(range(1, 7)) and all(resumed[k] == one[k] for k in one)
