"""`scalelm generate` and `scalelm chat`: thin layers over the Python API, on real checkpoint dirs."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_cli

from scalelm import cli
from scalelm.config import ModelConfig
from scalelm.generate.chat import PLAIN_STOPS, ChatFormat, fit_context
from scalelm.generate.generator import Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.model import GPT
from scalelm.model.io import save_model_dir

GREEDY = SamplingParams(temperature=0.0)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on a shared machine: no OpenMP contention
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # a module-wide fixture (conftest)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer_json):
    """A model dir with tokenizer, a RUN_DIR around a copy of it, one without tokenizer, one with a chat template."""
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, block_size=48, n_layer=2, n_head=4, n_embd=64,
                        tie_embeddings=False, init_std=0.3))
    save_model_dir(m, root / "model", tokenizer_json=tiny_tokenizer_json)
    (root / "run").mkdir()
    shutil.copytree(root / "model", root / "run" / "ckpt-00000005")
    (root / "run" / "latest").write_text("ckpt-00000005\n")
    save_model_dir(m, root / "notok")
    save_model_dir(m, root / "templated", tokenizer_json=tiny_tokenizer_json)
    (root / "templated" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return root


def main(capsys, monkeypatch, *args, stdin=None):
    """`scalelm ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_greedy_from_a_run_dir_matches_the_api_streamed_or_not(ckpts):
    gen = Generator.from_checkpoint(ckpts / "model")
    want = gen.generate("To be", max_new_tokens=20, sampling=GREEDY)[0].text
    args = ["generate", ckpts / "run", "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "20"]
    p = run_cli(*args, "--stream", "--echo", env=ONE_THREAD)  # the real console entry, once
    assert p.stdout == "To be" + want + "\n"
    assert "generated 20 tokens" in p.stderr and "tok/s" in p.stderr


def test_generate_json_batch_is_reproducible_and_matches_the_api(ckpts, capsys, monkeypatch):
    rc, out, _ = main(capsys, monkeypatch, "generate", ckpts / "model", "--prompt", "First", "--prompt",
                      "Citizen:", "--num-samples", "2", "--seed", "3", "--max-new-tokens", "12", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0
    assert [r["prompt_index"] for r in rows] == [0, 0, 1, 1]
    gen = Generator.from_checkpoint(ckpts / "model")
    api = gen.generate(["First", "Citizen:"], max_new_tokens=12, num_samples=2, seed=3,
                       sampling=SamplingParams(temperature=0.8, top_k=200))  # the CLI's defaults
    assert [r["tokens"] for r in rows] == [c.tokens for c in api]
    assert [r["text"] for r in rows] == [c.text for c in api]
    assert all(r["finish_reason"] in ("length", "eos") for r in rows)


def test_generate_without_tokenizer_takes_and_prints_ids(ckpts, capsys, monkeypatch):
    gen = Generator.from_checkpoint(ckpts / "notok")
    want = gen.generate([1, 2, 3], max_new_tokens=6, sampling=GREEDY)[0].tokens
    for extra in ([], ["--stream"]):
        rc, out, _ = main(capsys, monkeypatch, "generate", ckpts / "notok", "--prompt-ids", "1,2,3",
                          "--temperature", "0", "--max-new-tokens", "6", *extra)
        assert rc == 0 and [int(x) for x in out.split()] == want
    rc, _, err = main(capsys, monkeypatch, "generate", ckpts / "notok", "--prompt", "hi")
    assert rc == 2 and "no tokenizer.json" in err and "--prompt-ids" in err


@pytest.mark.parametrize("args, message", [
    (["--top-p", "1.5"], "top_p=1.5 is invalid: must be in (0, 1]"),
    (["--temperature", "-1"], "temperature=-1.0 is invalid: must be >= 0"),
    (["--prompt", "x" * 400], "but the model's context is 48: shorten it, or pass --truncate"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file not found"),
])
def test_generate_bad_input_is_a_clear_error(ckpts, args, message, capsys, monkeypatch):
    rc, _, err = main(capsys, monkeypatch, "generate", ckpts / "model", *args)
    assert rc == 2 and message in err


def chat(ckpt, stdin: str, *args):
    env = {**os.environ, **ONE_THREAD}
    return subprocess.run([sys.executable, "-m", "scalelm", "chat", str(ckpt), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


def test_chat_over_piped_stdin_replies_per_turn_and_exits_at_eof(ckpts):
    p = chat(ckpts / "model", "Hello there\n\nHow are you?\n", "--temperature", "0", "--max-new-tokens", "10")
    assert p.returncode == 0, p.stderr
    assert "plain User:/Assistant: format" in p.stderr
    # the first reply is what the API generates for the rendered first turn
    gen = Generator.from_checkpoint(ckpts / "model")
    ids = ChatFormat(gen).encode([{"role": "user", "content": "Hello there"}])
    first = gen.generate([ids], max_new_tokens=10, sampling=GREEDY, stop=PLAIN_STOPS)[0].text.strip()
    assert p.stdout.startswith(first + "\n")
    assert p.stdout.count("\n") >= 2  # two turns, two replies (the blank line is skipped)


def test_chat_uses_the_checkpoints_chat_template(ckpts, capsys, monkeypatch):
    rc, out, err = main(capsys, monkeypatch, "chat", ckpts / "templated", "--seed", "1", "--max-new-tokens", "5",
                        stdin="Hi\n/reset\nAgain\n/exit\nnever read\n")
    assert rc == 0 and "chat (chat template)" in err and "conversation reset" in err
    assert out.count("\n") == 2  # two replies, then /exit: the last line is never read
    gen = Generator.from_checkpoint(ckpts / "templated")
    fmt = ChatFormat(gen)
    assert fmt.render([{"role": "user", "content": "Hi"}]) == "<|user|>Hi<|endoftext|><|assistant|>"
    assert fmt.stops == []  # the template's eos ends a reply, not a plain-text marker


def test_plain_format_and_dropping_old_turns(ckpts):
    gen = Generator.from_checkpoint(ckpts / "model")
    fmt = ChatFormat(gen, plain=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert fmt.render(msgs) == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    long = msgs[:1] + [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 6}
                       for i in range(12)] + [{"role": "user", "content": "last"}]
    kept, ids = fit_context(fmt, long, room=12)
    assert len(ids) <= 48 - 12
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last" and len(kept) < len(long)


def test_tokenizer_override_gives_a_checkpoint_without_one_text(ckpts, capsys, monkeypatch):
    want = Generator.from_checkpoint(ckpts / "model").generate("To be", max_new_tokens=8, sampling=GREEDY)[0].text
    for tok in (ckpts / "model" / "tokenizer.json", ckpts / "model"):  # a file, or a directory with one
        rc, out, _ = main(capsys, monkeypatch, "generate", ckpts / "notok", "--tokenizer", tok, "--prompt", "To be",
                          "--temperature", "0", "--max-new-tokens", "8")
        assert rc == 0 and out == want + "\n"
    rc, _, err = main(capsys, monkeypatch, "generate", ckpts / "notok", "--tokenizer", ckpts / "nope.json")
    assert rc == 2 and "tokenizer not found" in err


def test_generate_and_chat_on_a_checkpoint_the_trainer_made(tmp_path, shared_data, capsys, monkeypatch):
    from train_helpers import TINY, shakespeare_data

    monkeypatch.setenv("SCALELM_PEAK_TFLOPS", "1")  # the trainer's MFU: skip measuring the CPU peak
    data = shakespeare_data(shared_data, tmp_path / "data", chars=20_000)
    rc, _, _ = main(capsys, monkeypatch, "train", "--data", data, "--out", tmp_path / "run",
                    "--train.max_steps=4", "--train.save_every=2", "--train.eval_every=2", *TINY)
    assert rc == 0 and (tmp_path / "run" / "latest").read_text().strip() == "ckpt-00000004"
    rc, out, _ = main(capsys, monkeypatch, "generate", tmp_path / "run", "--prompt", "ROMEO:", "--seed", "3",
                      "--max-new-tokens", "12", "--ignore-eos", "--json")
    row = json.loads(out)
    assert rc == 0 and len(row["tokens"]) == 12 and row["text"]
    rc, out, err = main(capsys, monkeypatch, "chat", tmp_path / "run" / "best", "--seed", "1",
                        "--max-new-tokens", "8", stdin="Hello\n")
    assert rc == 0 and "plain User:/Assistant: format" in err and out.endswith("\n")


def test_streamed_batch_prints_rows_in_order_like_the_plain_output(ckpts, capsys, monkeypatch):
    args = ["generate", ckpts / "model", "--prompt", "To be", "--prompt", "", "--num-samples", "2", "--seed", "4",
            "--max-new-tokens", "10", "--echo", "--stop", "e"]
    rc1, plain, _ = main(capsys, monkeypatch, *args)
    rc2, streamed, _ = main(capsys, monkeypatch, *args, "--stream")
    assert rc1 == rc2 == 0 and streamed == plain
    assert plain.count("-" * 40) == 3 and plain.startswith("To be")


def test_generate_beams_prints_the_generators_beam_search(ckpts, capsys, monkeypatch):
    gen = Generator.from_checkpoint(ckpts / "model")
    want = gen.beam_search(["To be", "First"], num_beams=3, max_new_tokens=10)
    greedy = gen.generate("To be", max_new_tokens=10, sampling=GREEDY)[0]
    assert want[0].tokens != greedy.tokens  # so the comparison below can tell beam search from greedy
    rc, out, _ = main(capsys, monkeypatch, "generate", ckpts / "model", "--prompt", "To be", "--prompt", "First",
                      "--beams", "3", "--max-new-tokens", "10", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [r["prompt_index"] for r in rows] == [0, 1]
    assert [(r["tokens"], r["text"], r["finish_reason"]) for r in rows] == \
        [(c.tokens, c.text, c.finish_reason) for c in want]
    rc, out, _ = main(capsys, monkeypatch, "generate", ckpts / "model", "--prompt", "To be", "--beams", "3",
                      "--max-new-tokens", "10")
    assert rc == 0 and out == want[0].text + "\n"


@pytest.mark.parametrize("extra,named", [(["--temperature", "0.5"], "--temperature"), (["--seed", "1"], "--seed"),
                                         (["--stream"], "--stream"), (["--num-samples", "2"], "--num-samples"),
                                         (["--prompt-lookup", "2"], "--prompt-lookup"),
                                         (["--top-k", "5", "--stop", "x"], "--top-k, --stop")])
def test_generate_beams_refuses_sampling_streaming_and_speculation(ckpts, capsys, monkeypatch, extra, named):
    rc, out, err = main(capsys, monkeypatch, "generate", ckpts / "model", "--beams", "2", *extra)
    assert rc == 2 and out == "" and f"--beams 2 searches for the most likely continuation; {named} belong" in err


def test_generate_beams_must_be_positive(ckpts, capsys, monkeypatch):
    rc, _, err = main(capsys, monkeypatch, "generate", ckpts / "model", "--beams", "0")
    assert rc == 2 and "--beams=0 is invalid" in err


def test_generate_passes_the_decoding_controls(ckpts, capsys, monkeypatch):
    gen = Generator.from_checkpoint(ckpts / "model")
    kw = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4)
    want = gen.beam_search("To be", num_beams=3, max_new_tokens=10, length_penalty=0.5, **kw)[0]
    rc, out, err = main(capsys, monkeypatch, "generate", ckpts / "model", "--prompt", "To be", "--beams", "3",
                        "--max-new-tokens", "10", "--length-penalty", "0.5", "--repetition-penalty", "1.3",
                        "--no-repeat-ngram-size", "2", "--min-new-tokens", "4", "--json")
    assert rc == 0, err
    assert json.loads(out)["tokens"] == want.tokens
    greedy = gen.generate("To be", 10, sampling=GREEDY.__class__(temperature=0.0, **kw))[0]
    rc, out, err = main(capsys, monkeypatch, "generate", ckpts / "model", "--prompt", "To be", "--temperature", "0",
                        "--max-new-tokens", "10", "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2",
                        "--min-new-tokens", "4", "--json")
    assert rc == 0 and json.loads(out)["tokens"] == greedy.tokens
    rc, _, err = main(capsys, monkeypatch, "generate", ckpts / "model", "--length-penalty", "2")
    assert rc == 2 and "--length-penalty weighs finished beams" in err
