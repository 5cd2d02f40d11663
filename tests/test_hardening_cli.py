"""Hardening (issue 28, items 7-10 and 12): numbers that silently meant "the default", figures that
were wrong or could not be seen, scoring that dropped data without a word, model checks, and the
last tracebacks. Each refusal exits 2 with one line, prints no traceback and (where the command
would write) leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from test_bad_input import corpus, refused, tree
from train_helpers import TINY, char_tokenizer, cli, make_char_data

from scalelm.config import ModelConfig
from scalelm.model import GPT
from scalelm.model.io import load_model_dir, save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")

QA = [{"question": "what is two and two", "answer": "two and two #### 4"},
      {"question": "name a king", "answer": "the king is dead"},  # no '#### answer'
      {"question": "what is one and one", "answer": "#### 2"},
      {"question": "say a rose", "answer": "a rose"}]  # no '#### answer'
SST_PROMPT = "\nQuestion: Is this sentence positive or negative?\nAnswer: negative positive"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("SCALELM_PEAK_TFLOPS", "1")  # no CPU peak measurement
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A char DATA_DIR and a float model directory with its tokenizer (64 wide: packed for CPU decoding)."""
    root = tmp_path_factory.mktemp("hardening")
    text = corpus() + "".join(json.dumps(r) for r in QA) + SST_PROMPT + "0123456789#"
    data = make_char_data(root / "data", corpus(), tokenizer_text=text)
    tok = (data / "tokenizer.json").read_text()
    n = char_tokenizer(text).get_vocab_size()
    torch.manual_seed(0)
    save_model_dir(GPT(ModelConfig(vocab_size=n, block_size=160, n_layer=2, n_head=2, n_embd=64)), root / "model",
                   tokenizer_json=tok)
    return root


def json_out(result) -> dict:
    rc, so, se = result
    assert rc == 0, se
    return json.loads(so)


# ----------------------------------------------------------------------------- 7: 0 is not "the default"

@pytest.mark.parametrize("args,phrase", [
    (["--scheme", "int4", "--group-size", "0"], "--group-size must be a positive"),
    (["--scheme", "int4", "--group-size", "-32"], "--group-size must be a positive"),
    (["--scheme", "int4", "--method", "gptq", "--calib", "DATA", "--seq-len", "0"], "--seq-len must be a positive"),
])
def test_quantize_refuses_zero_and_negative_numbers(root, tmp_path, args, phrase):
    args = [str(root / "data") if a == "DATA" else a for a in args]
    refused(cli("quantize", root / "model", *args, "--out", tmp_path / "q"), phrase)
    assert not (tmp_path / "q").exists()


def test_prune_refuses_seq_len_zero(root, tmp_path):
    refused(cli("prune", root / "model", "--method", "wanda", "--sparsity", "0.5", "--calib", root / "data",
                "--seq-len", "0", "--out", tmp_path / "p"), "--seq-len must be a positive")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args,phrase", [
    (["--vocab-size", "0"], "--vocab-size must be a positive"),
    (["--vocab-size", "-5"], "--vocab-size must be a positive"),
    (["--vocab-size", "100"], "too small for byte-level BPE"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--seq-len", "0"], "--seq-len must be a positive"),
])
def test_prepare_refuses_zero_and_negative_numbers(tmp_path, args, phrase):
    src = tmp_path / "corpus.txt"
    src.write_text(corpus(5000))
    before = tree(tmp_path)
    refused(cli("prepare", "--input", src, "--out", tmp_path / "out", *args), phrase)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- 8: figures

def block_linear_weights(model: GPT) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}


def test_prune_reports_prunable_and_pruned_weights(root, tmp_path):
    res = json_out(cli("prune", root / "model", "--method", "magnitude", "--sparsity", "0.5", "--out", tmp_path / "p"))
    weights = block_linear_weights(load_model_dir(tmp_path / "p"))
    assert res["prunable_weights"] == sum(w.numel() for w in weights.values())
    assert res["pruned_weights"] == sum(int((w == 0).sum()) for w in weights.values())
    assert res["pruned_weights"] == pytest.approx(res["prunable_weights"] / 2, rel=0.02)  # not the prunable count
    assert res["linear_sparsity"] == res["pruned_weights"] / res["prunable_weights"]
    res = json_out(cli("prune", root / "model", "--method", "structured", "--ffn-dim", "64", "--calib", root / "data",
                       "--calib-samples", "4", "--out", tmp_path / "s"))
    assert res["pruned_weights"] == res["params_before"] - res["params"] > 0


def loaded_params(stderr: str) -> float:
    return float(re.search(r"\(([\d.]+)M params", stderr).group(1))


def test_generate_prints_the_models_parameter_count(root, tmp_path):
    n = load_model_dir(root / "model").num_params()
    rc, _, se = cli("generate", root / "model", "--prompt", "the", "--max-new-tokens", "2", "--temperature", "0")
    assert rc == 0, se
    assert loaded_params(se) == round(n / 1e6, 2)  # the packed CPU copy holds its Linears as buffers
    json_out(cli("quantize", root / "model", "--scheme", "int8", "--out", tmp_path / "q"))
    rc, _, se = cli("generate", tmp_path / "q", "--prompt", "the", "--max-new-tokens", "2", "--temperature", "0")
    assert rc == 0, se
    assert loaded_params(se) == round(n / 1e6, 2)  # int weights are buffers too: still the model's count


def test_throughput_plot_draws_mfu_on_its_own_axis(tmp_path, monkeypatch):
    from scalelm.analysis import plots

    run = tmp_path / "run"
    run.mkdir()
    tps = [1000.0, 1500.0, 1200.0, 1800.0, 1700.0]
    recs = [{"step": i + 1, "loss": 3.0 - 0.1 * i, "tokens": 128 * (i + 1), "tokens_per_s": t, "mfu": t * 2e-5}
            for i, t in enumerate(tps)]  # MFU is tokens/s times a constant, as the trainer computes it
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    figs = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.__setitem__(path.name, fig), save(fig, path)))
    json_out(cli("plot", run))
    assert (run / "throughput.png").stat().st_size > 0
    fig = figs["throughput.png"]
    ax, ax2 = fig.axes  # tokens/s on the left, MFU on a twin axis at the right
    assert ax2.get_shared_x_axes().joined(ax, ax2)
    (tline,), (mline,) = ax.get_lines(), ax2.get_lines()
    assert list(tline.get_ydata()) == tps and list(mline.get_ydata()) == pytest.approx([100 * t * 2e-5 for t in tps])

    def heights(line, axis):
        lo, hi = axis.get_ylim()
        return (np.asarray(line.get_ydata()) - lo) / (hi - lo)

    # on two autoscaled axes the proportional lines coincide; each drawn at its own height they do not
    assert np.abs(heights(tline, ax) - heights(mline, ax2)).min() > 0.2
    assert ax2.get_ylabel().startswith("MFU")
    legend = ax2.get_legend() or ax.get_legend()
    assert {t.get_text() for t in legend.get_texts()} == {"run tokens/s", "run MFU"}


# ----------------------------------------------------------------------------- 9: data dropped without a word

def sst_file(tmp_path, lines: list[str], name="sst.txt"):
    f = tmp_path / name
    f.write_text("\n".join(lines) + "\n")
    return f


def test_harness_sst2_counts_the_lines_it_cannot_score(root, tmp_path):
    pytest.importorskip("lm_eval")
    good = ["0 a dull queen", "1 long live the king", "0 not a rose", "1 the king is a rose"]
    f = sst_file(tmp_path, good[:2] + ["", "2 a rose", "no label here", "1"] + good[2:] + ["positive the queen"])
    rc, so, se = cli("eval", root / "model", "--harness", "scalelm_sst2", "--harness-data", f, "--batch-size", "4")
    assert rc == 0, se
    out = json.loads(so)
    assert out["harness_data"]["scalelm_sst2"] == {"examples": 4, "skipped_lines": 4}
    assert out["results"]["scalelm_sst2"]["sample_len"] == 4
    warning = [line for line in se.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "4 of 8 lines" in warning[0] and "lines 4, 5, 6, 9" in warning[0]


@pytest.mark.parametrize("task", ["scalelm_sst2", "scalelm_text_ppl"])
@pytest.mark.parametrize("content,phrase", [(b"0 caf\xe9 au lait\n", "is not UTF-8 text (byte 5"),
                                            (b"", "is empty"), (b"\n  \n", "is empty")])
def test_harness_data_not_utf8_or_empty(root, tmp_path, task, content, phrase):
    pytest.importorskip("lm_eval")
    f = tmp_path / "data.txt"
    f.write_bytes(content)
    se = refused(cli("eval", root / "model", "--harness", task, "--harness-data", f), "--harness-data", phrase)
    assert len(se.strip().splitlines()) == 1


def test_harness_sst2_with_no_scorable_line(root, tmp_path):
    pytest.importorskip("lm_eval")
    f = sst_file(tmp_path, ["positive a rose", "3 the king"])
    refused(cli("eval", root / "model", "--harness", "scalelm_sst2", "--harness-data", f), "nothing to score")


@pytest.mark.parametrize("limit", ["nan", "inf", "-inf", "0", "-2", "2.5"])
@pytest.mark.parametrize("task", [["--harness", "scalelm_sst2", "--harness-data", "SST"], ["--task", "qa"]])
def test_eval_limit_that_is_no_number_of_examples(root, tmp_path, limit, task):
    f = sst_file(tmp_path, ["1 a rose"])
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in QA))
    args = [str(f) if a == "SST" else a for a in task] + (["--data", qa] if "qa" in task else [])
    refused(cli("eval", root / "model", *args, "--limit", limit), "--limit")


def test_eval_qa_counts_references_without_an_answer(root, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    rc, so, se = cli("eval", root / "model", "--task", "qa", "--data", data, "--max-new-tokens", "2")
    assert rc == 0, se
    res = json.loads(so)
    assert res["no_reference_answer"] == 2 and res["n"] == 2  # scored: the two with '#### N'
    warning = [line for line in se.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "2 of 4 references" in warning[0] and "qa.jsonl:2" in warning[0]
    none = tmp_path / "none.jsonl"
    none.write_text("".join(json.dumps(r) + "\n" for r in (QA[1], QA[3])))
    refused(cli("eval", root / "model", "--task", "qa", "--data", none), "none of the 2 references", "--answer-regex")


# ----------------------------------------------------------------------------- 10, 12: model checks

def onnx_dir(path, cfg: ModelConfig, tok_json: str, n: int, bias: float = 0.0, symbolic: bool = False):
    """A graph with scalelm's decode inputs and outputs whose logits are ``bias`` + 0.01 * token id
    over ``n`` tokens, and present = past. ``symbolic``: over as many tokens as the past's last
    dimension (head_dim, known only when the graph runs), so the declared width is a name."""
    import onnx
    from onnx import TensorProto, helper

    from scalelm.generate.onnx_backend import FORMAT

    kv = ["L", "B", "H", "P", "D"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "T"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv),
              helper.make_tensor_value_info("logit_positions", TensorProto.INT64, ["N"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "N", "V" if symbolic else n]),
               helper.make_tensor_value_info("present_key", TensorProto.FLOAT, kv),
               helper.make_tensor_value_info("present_value", TensorProto.FLOAT, kv)]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["ids_f", "logit_positions"], ["picked"], axis=1),
             helper.make_node("Unsqueeze", ["picked", "axis2"], ["picked3"]),
             helper.make_node("Mul", ["picked3", "zero"], ["zeros"]),
             *([helper.make_node("Shape", ["past_key"], ["kv_shape"]),
                helper.make_node("Gather", ["kv_shape", "four"], ["width"]),
                helper.make_node("Range", ["zero_i", "width", "one_i"], ["ids"]),
                helper.make_node("Cast", ["ids"], ["ids_float"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["ids_float", "step"], ["bias"])] if symbolic else []),
             helper.make_node("Add", ["zeros", "bias"], ["logits"]),
             helper.make_node("Identity", ["past_key"], ["present_key"]),
             helper.make_node("Identity", ["past_value"], ["present_value"])]
    inits = [helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             *([helper.make_tensor("four", TensorProto.INT64, [], [4]),
                helper.make_tensor("zero_i", TensorProto.INT64, [], [0]),
                helper.make_tensor("one_i", TensorProto.INT64, [], [1]),
                helper.make_tensor("step", TensorProto.FLOAT, [], [0.01])] if symbolic else
               [helper.make_tensor("bias", TensorProto.FLOAT, [n], [bias + 0.01 * i for i in range(n)])])]
    graph = helper.make_graph(nodes, "decode", inputs, outputs, inits)
    path.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path / "model.onnx")
    (path / "config.json").write_text(json.dumps({"format": FORMAT, "model": dataclasses.asdict(cfg), "onnx": {}}))
    (path / "tokenizer.json").write_text(tok_json)
    return path


@pytest.fixture(scope="module")
def onnx_dirs(root, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    d = tmp_path_factory.mktemp("onnx")
    model = load_model_dir(root / "model")
    tok = (root / "model" / "tokenizer.json").read_text()
    return {"ok": onnx_dir(d / "ok", model.cfg, tok, model.cfg.vocab_size),
            "vocab5": onnx_dir(d / "vocab5", model.cfg, tok, 5),
            "symbolic": onnx_dir(d / "symbolic", model.cfg, tok, model.cfg.head_dim, symbolic=True),
            "nan": onnx_dir(d / "nan", model.cfg, tok, model.cfg.vocab_size, bias=float("nan"))}


def onnx_generate(path, *args):
    return cli("generate", path, "--backend", "onnxruntime", "--prompt", "the", "--max-new-tokens", "3", *args)


def test_onnx_graph_whose_logits_are_not_the_vocabulary(onnx_dirs):
    rc, so, se = onnx_generate(onnx_dirs["ok"], "--temperature", "0", "--ignore-eos")
    assert rc == 0, se  # the crafted graph itself is a working one
    cfg = json.loads((onnx_dirs["ok"] / "config.json").read_text())["model"]
    head_dim = cfg["n_embd"] // cfg["n_head"]
    for name, width in (("vocab5", 5), ("symbolic", head_dim)):
        before = tree(onnx_dirs[name])
        se = refused(onnx_generate(onnx_dirs[name], "--temperature", "0"), f"over {width} tokens",
                     f"has {cfg['vocab_size']}")
        errors = [line for line in se.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and se.strip().splitlines()[-1] == errors[0]
        assert tree(onnx_dirs[name]) == before
    from scalelm.errors import CheckpointError
    from scalelm.generate.onnx_backend import load_onnx_model

    with pytest.raises(CheckpointError, match="over 5 tokens"):
        load_onnx_model(onnx_dirs["vocab5"])  # a fixed width: refused at load, before anything runs
    load_onnx_model(onnx_dirs["symbolic"])  # a symbolic one is known at the first run (above)


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.8", "--seed", "1"]])
def test_onnx_graph_with_nan_logits_stops_with_an_error(onnx_dirs, sampling):
    rc, so, se = onnx_generate(onnx_dirs["nan"], *sampling)
    refused((rc, so, se), "not finite (NaN or inf)", "new token 1")
    assert "\x00" not in so and so.strip() == ""  # no NUL bytes, no text made of NaNs


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_non_finite_logits_stop_every_decoding(root, poison):
    """The torch path too (a model whose weights broke after loading), sampled, greedy and beam search."""
    from scalelm.generate.generator import Generator
    from scalelm.generate.sampling import NonFiniteLogits, SamplingParams
    from tokenizers import Tokenizer

    model = load_model_dir(root / "model")
    with torch.no_grad():
        model.lm_head.weight.fill_(float(poison))  # tied: every logit is +-inf or NaN
    gen = Generator(model, Tokenizer.from_file(str(root / "model" / "tokenizer.json")), eos_ids=[0])
    for sampling in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5)):
        with pytest.raises(NonFiniteLogits, match="not finite"):
            gen.generate(["the king", "a"], max_new_tokens=4, sampling=sampling, seed=0)
    with pytest.raises(NonFiniteLogits, match="not finite"):
        gen.beam_search("the king", num_beams=2, max_new_tokens=4)


def test_finite_logits_decode_as_before(root):
    """The check flags no healthy row: greedy output equals argmax decoding done by hand."""
    from scalelm.generate.generator import Generator
    from scalelm.generate.sampling import SamplingParams
    from tokenizers import Tokenizer

    model = load_model_dir(root / "model").eval()
    gen = Generator(model, Tokenizer.from_file(str(root / "model" / "tokenizer.json")), eos_ids=[])
    prompt = gen.encode("the king")
    out = gen.generate(prompt, max_new_tokens=5, sampling=SamplingParams(temperature=0.0))[0].tokens
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert out == ids[len(prompt):]


@pytest.mark.parametrize("token,phrase", [("", "is empty"), (" ", "only whitespace"), ("\n", "only whitespace"),
                                          ("\t ", "only whitespace")])
def test_sft_refuses_empty_and_whitespace_special_tokens(root, tmp_path, token, phrase):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the king", "completion": " is dead"}) + "\n" for _ in range(4)))
    before = tree(tmp_path)
    se = refused(cli("finetune", "sft", "--base", root / "model", "--data", data, "--out", tmp_path / "r",
                     "--special-token", token, *TINY), "--special-token", phrase)
    assert len(se.strip().splitlines()) == 1
    assert tree(tmp_path) == before


def test_sft_special_token_check():
    from scalelm.errors import UserError
    from scalelm.tasks.sft.template import check_special_tokens

    check_special_tokens(None)
    check_special_tokens(["<|tool|>", " <|x|>"])  # visible text (surrounding spaces are the user's choice)
    for bad in ([""], ["<|ok|>", "  "], ["\u3000"]):  # an ideographic space is whitespace too
        with pytest.raises(UserError):
            check_special_tokens(bad)


# ----------------------------------------------------------------------------- 12: quantize a LoRA run

@pytest.fixture(scope="module")
def lora_run(root, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    fixed = [*TINY, "--train.max_steps=2", "--train.eval_every=2", "--train.precision=fp32"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELM_PEAK_TFLOPS", "1")  # (module fixtures start before the autouse one)
        rc, _, se = cli("train", "--data", root / "data", "--out", d / "base", *fixed)
        assert rc == 0, se
        rc, _, se = cli("train", "--data", root / "data", "--out", d / "lora", "--init-from", d / "base" / "best",
                        *fixed, "--lora.r=2", "--optim.lr=3e-2")
        assert rc == 0, se
    return d / "lora"


def test_quantize_a_lora_run_quantizes_its_merged_model(lora_run, tmp_path):
    assert not (lora_run / "best" / "model.safetensors").exists()  # adapters only
    res = json_out(cli("quantize", lora_run, "--scheme", "int4", "--group-size", "32", "--out", tmp_path / "q"))
    assert 0 < res["bytes"] < res["bytes_before"]
    json_out(cli("merge", lora_run, "--out", tmp_path / "merged"))
    json_out(cli("quantize", tmp_path / "merged", "--scheme", "int4", "--group-size", "32", "--out", tmp_path / "qm"))
    a, b = load_model_dir(tmp_path / "q").state_dict(), load_model_dir(tmp_path / "qm").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # what merging first gives
    base = load_model_dir(lora_run.parent / "base" / "best")
    merged = load_model_dir(tmp_path / "merged")
    assert any(not torch.equal(p, q) for p, q in zip(base.state_dict().values(), merged.state_dict().values()))
    rc, _, se = cli("generate", tmp_path / "q", "--prompt", "the", "--max-new-tokens", "2", "--temperature", "0")
    assert rc == 0, se

