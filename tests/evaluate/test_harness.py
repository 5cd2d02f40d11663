"""The lm-evaluation-harness backend: parity with lm-eval's own `hf` model on the HF export of the
same checkpoint, on the local tasks, and the CLI."""

import json
import math

import pytest
import torch
from train_helpers import char_tokenizer, cli, one_thread  # noqa: F401 (fixture)

pytest.importorskip("lm_eval")

from scalelm.config import ModelConfig  # noqa: E402
from scalelm.model import GPT, save_model_dir  # noqa: E402

PROMPT = "\nQuestion: Is this sentence positive or negative?\nAnswer: negative positive"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("harness")
    sst = shared_data / "sst2" / "stsa.binary.dev"
    tok = char_tokenizer(sst.read_text() + PROMPT)
    torch.manual_seed(0)
    # a context longer than any prompt here: lm-eval's API models truncate one token differently
    save_model_dir(GPT(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=320, n_layer=2, n_head=2, n_embd=32)),
                   root / "m", tok.to_str())
    rc, _, se = cli("convert", root / "m", "--to-hf", root / "hf")
    assert rc == 0, se
    lines = [line[2:] for line in sst.read_text().splitlines()[:60]]
    paragraphs = [" ".join(lines[i:i + 6]) for i in range(0, 60, 6)]  # most longer than the context: several windows
    (root / "text.txt").write_text("\n\n".join(paragraphs))
    return root, sst


def _hf_results(root, task, data_file, limit):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from scalelm.evaluate.harness import TASKS_DIR

    meta = {"data_file": str(data_file)}
    return simple_evaluate(model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32,device=cpu",
                           tasks=[task], task_manager=TaskManager(include_path=[str(TASKS_DIR)],
                                                                    include_defaults=False, metadata=meta),
                           limit=limit, batch_size=4, log_samples=True, metadata=meta)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["scalelm_sst2", "scalelm_text_ppl"])
def test_loglikelihoods_and_scores_equal_lm_evals_hf_model(model_dirs, task, one_thread, monkeypatch):
    from scalelm.evaluate.harness import run_harness

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, sst = model_dirs
    data_file = sst if task == "scalelm_sst2" else root / "text.txt"
    limit = 24 if task == "scalelm_sst2" else 6
    ours = run_harness(root / "m", task, None, limit, str(data_file), 4, "cpu", log_samples=True)
    theirs = _hf_results(root, task, data_file, limit)
    a, b = ours["samples"][task], theirs["samples"][task]
    assert len(a) == len(b) == limit
    for x, y in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
        fx = [r[0] if isinstance(r, (list, tuple)) else r for r in x["filtered_resps"]]
        fy = [r[0] if isinstance(r, (list, tuple)) else r for r in y["filtered_resps"]]
        # every loglikelihood to 1e-4; a rolling document sums thousands of token logprobs in fp32,
        # so there the bound is relative (1e-6 of the sum: ~1e-7 nats per token)
        assert fx == pytest.approx(fy, abs=1e-4, rel=1e-6)
    for k, v in ours["results"][task].items():
        if isinstance(v, float) and not k.endswith("stderr,none"):
            assert v == pytest.approx(theirs["results"][task][k], rel=1e-5), k  # identical task scores
    if task == "scalelm_sst2":
        assert 0 <= ours["results"][task]["acc,none"] <= 1
    else:
        assert math.isfinite(ours["results"][task]["bits_per_byte,none"])


def test_harness_cli_and_its_errors(model_dirs, one_thread, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, sst = model_dirs
    rc, so, se = cli("eval", root / "m", "--harness", "scalelm_sst2", "--harness-data", sst, "--limit", "8")
    assert rc == 0, se
    res = json.loads(so)["results"]["scalelm_sst2"]
    assert 0 <= res["acc,none"] <= 1 and res["sample_len"] == 8
    for args, phrase in [(["--harness", "scalelm_sst2"], "--harness-data FILE"),
                         (["--harness", "nope_task", "--harness-data", sst], "unknown harness task"),
                         (["--harness", "scalelm_sst2", "--harness-data", root / "missing"], "no such file"),
                         (["--harness", "scalelm_sst2", "--data", root], "give one of")]:
        rc, _, se = cli("eval", root / "m", *args)
        assert rc == 2 and phrase in se and "Traceback" not in se, (args, se)


def test_generate_until_uses_the_cached_generator(model_dirs, one_thread):
    from lm_eval.api.instance import Instance

    from scalelm.evaluate.harness import _lm_class
    from scalelm.generate import Generator
    from scalelm.generate.sampling import SamplingParams

    root, _ = model_dirs
    lm = _lm_class()(str(root / "m"))
    req = Instance("generate_until", {}, ("the movie is", {"until": ["\n"], "max_gen_toks": 12}), 0)
    out = lm.generate_until([req])[0]
    ref = Generator.from_checkpoint(root / "m", device="cpu", dtype="float32").generate(
        "the movie is", 12, sampling=SamplingParams(temperature=0.0), stop=["\n"])[0].text
    assert out == ref.split("\n")[0] and "\n" not in out


@pytest.mark.slow
def test_the_harness_through_the_server_equals_the_direct_backend(model_dirs, one_thread, monkeypatch):
    """lm-eval's `local-completions` model against `scalelm serve` (token-id prompts, echo, logprobs)
    gives the loglikelihoods of the in-process backend."""
    pytest.importorskip("uvicorn")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from serve_helpers import Live

    from scalelm.evaluate.harness import TASKS_DIR, run_harness

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    root, sst = model_dirs
    meta = {"data_file": str(sst)}
    live = Live(root / "m", name="m", max_batch=4, max_queue=64)
    try:
        args = (f"model=m,base_url={live.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={root / 'hf'},max_length=320,num_concurrent=1,max_retries=1")
        theirs = simple_evaluate(model="local-completions", model_args=args, tasks=["scalelm_sst2"],
                                 task_manager=TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False,
                                                          metadata=meta), limit=8, log_samples=True, metadata=meta)
    finally:
        live.close()
    ours = run_harness(root / "m", "scalelm_sst2", None, 8, str(sst), 4, "cpu", log_samples=True)
    a = sorted(ours["samples"]["scalelm_sst2"], key=lambda s: s["doc_id"])
    b = sorted(theirs["samples"]["scalelm_sst2"], key=lambda s: s["doc_id"])
    for x, y in zip(a, b):
        assert [r[0] for r in x["filtered_resps"]] == pytest.approx([r[0] for r in y["filtered_resps"]], abs=1e-4)
    assert ours["results"]["scalelm_sst2"]["acc,none"] == theirs["results"]["scalelm_sst2"]["acc,none"]
