"""Instruction tuning: reply-only loss for every format (multi-turn chat too), packing isolation, the
chat template round trip (training text == what chat/serve render), new-token rows at the mean,
the no-supervision error and truncation report, exact resume, CLI end to end (sft, chat, eval qa)."""

import json

import numpy as np
import pytest
import torch
from train_helpers import ONE_THREAD, cli, one_thread, read_metrics  # noqa: F401

from scalelm.config import ModelConfig
from scalelm.data.chat_template import ChatTemplate
from scalelm.model import GPT
from scalelm.model.io import save_model_dir
from scalelm.model.loss import IGNORE_INDEX
from scalelm.model.masks import document_mask
from scalelm.tasks.sft.batches import (
    GroupedBatches,
    PackedBatches,
    example_arrays,
    pack,
)
from scalelm.tasks.sft.encode import Encoded, Encoder
from scalelm.tasks.sft.formats import to_messages
from scalelm.tasks.sft.template import ALPACA, CHATML, PLAIN
from scalelm.tasks.sft.vocab import extend_tokenizer, grow_vocab

pytestmark = pytest.mark.usefixtures("one_thread")
EOT, PAD, S, E = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"
TINY = ["--model.dropout=0.0", "--train.micro_batch_size=4", "--train.eval_every=4", "--train.save_every=4",
        "--train.log_every=1", "--log.progress=false", "--optim.warmup_steps=1", "--train.precision=fp32",
        "--optim.lr=3e-3"]


def char_tokenizer(specials=(EOT, PAD, S, E)):
    """One token per character, each special one token: positions can be read off the text."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(list(specials) + sorted(set(CHARS)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(specials))
    return tok


def pieces_to_expected(tok, pieces):
    """(ids, supervised target positions) of [(text, is_reply)], counting specials as one token."""
    import re

    ids, sup = [], []
    for text, reply in pieces:
        for t in re.findall(r"<\|[a-z_]+\|>|.|\n", text, flags=re.DOTALL):
            ids.append(tok.token_to_id(t))
            sup.append(reply)
    return ids, {j for j in range(len(ids) - 1) if sup[j + 1]}


def supervised_positions(enc: Encoded):
    _, y = example_arrays(enc)
    return {int(j) for j in np.nonzero(y != IGNORE_INDEX)[0]}


# ----------------------------------------------------------------------------- loss masking

def test_chatml_multi_turn_supervises_exactly_the_assistant_turns():
    tok = char_tokenizer()
    msgs = to_messages({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2?"},
                                     {"role": "assistant", "content": "4"}]}, "x")
    e = Encoder(tok, ChatTemplate(CHATML, EOT, EOT), 500).encode(msgs)
    ids, want = pieces_to_expected(tok, [
        (f"{S}system\nBe brief.{E}\n{S}user\nhi{E}\n{S}assistant\n", False), (f"yo{E}\n", True),
        (f"{S}user\n2+2?{E}\n{S}assistant\n", False), (f"4{E}\n", True)])
    assert e.ids.tolist() == ids
    assert supervised_positions(e) == want


@pytest.mark.parametrize("record,fields,prompt,reply", [
    ({"instruction": "Add.", "input": "1 2", "output": "3"}, (None, None), "Add.\n\n1 2", "3"),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, (None, None), "Say hi.", "hi"),
    ({"prompt": "Q: sky?", "completion": " blue"}, (None, None), "Q: sky?", " blue"),
    ({"question": "1+1?", "answer": "2\n#### 2"}, ("question", "answer"), "1+1?", "2\n#### 2"),
])
def test_each_format_supervises_its_reply(record, fields, prompt, reply):
    tok = char_tokenizer()
    msgs = to_messages(record, "f", *fields)
    assert msgs == [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    alpaca = ChatTemplate(ALPACA, EOT, EOT)
    e = Encoder(tok, alpaca, 500).encode(msgs)
    head = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    ids, want = pieces_to_expected(tok, [(f"{head}\n\n### Instruction:\n{prompt}\n\n### Response:\n", False),
                                         (f"{reply}{EOT}\n\n", True)])
    assert e.ids.tolist() == ids and supervised_positions(e) == want
    plain = Encoder(tok, ChatTemplate(PLAIN, EOT, EOT), 500).encode(msgs)
    ids, want = pieces_to_expected(tok, [(prompt, False), (reply + EOT, True)])
    assert plain.ids.tolist() == ids and supervised_positions(plain) == want
    every = Encoder(tok, ChatTemplate(PLAIN, EOT, EOT), 500, loss_on="all").encode(msgs)
    assert supervised_positions(every) == set(range(len(ids) - 1))


def test_bad_records_name_their_line(tmp_path):
    from scalelm.tasks.sft.formats import SFTDataError, read_conversations

    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"text": "x"}\n')
    with pytest.raises(SFTDataError, match=r"d.jsonl:2: unknown record"):
        read_conversations(p)
    p.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    with pytest.raises(SFTDataError, match="no assistant message"):
        read_conversations(p)


def test_a_template_that_rewrites_history_is_refused():
    from scalelm.data.chat_template import ChatTemplateError

    odd = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ChatTemplateError, match="does not render a conversation"):
        ChatTemplate(odd).segments(msgs)


# ----------------------------------------------------------------------------- packing

def _examples(rng, lengths, vocab=40):
    return [Encoded(rng.integers(4, vocab, n), np.r_[np.zeros(n // 2, bool), np.ones(n - n // 2, bool)])
            for n in lengths]


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_packed_examples_compute_what_they_compute_alone(pos):
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16, pos_embedding=pos)).eval()
    rng = np.random.default_rng(0)
    ex = _examples(rng, [9, 7, 11])
    b = PackedBatches(ex, 1, window=32, seed=0)
    x, y, doc = b.collate([[0, 1, 2]])
    mask, pos_ids = document_mask(doc)
    with torch.no_grad():
        packed = gpt(x, attn_mask=mask, pos_ids=pos_ids)[0]
        x2 = x.clone()
        x2[0, :8] = (x2[0, :8] + 5) % 40  # perturb the first example: the second must not notice
        perturbed = gpt(x2, attn_mask=mask, pos_ids=pos_ids)[0]
        alone = gpt(torch.from_numpy(example_arrays(ex[1])[0])[None])[0]
    assert torch.allclose(packed[0, 8:14], alone[0], atol=1e-5)
    assert torch.equal(packed[0, 8:], perturbed[0, 8:])  # later examples bit for bit
    assert (doc[0, 8:14] == 1).all() and (doc[0, 26:] == -1).all() and (y[0, 26:] == IGNORE_INDEX).all()


def test_packing_fills_windows_and_covers_every_example_once_per_epoch():
    lengths = np.array([30, 5, 20, 10, 12, 3, 31, 8])
    windows = pack(lengths, np.arange(8), 32)
    assert sorted(i for w in windows for i in w) == list(range(8))
    assert all(lengths[w].sum() <= 32 for w in windows)
    assert windows == [[0], [1, 2, 5], [3, 4, 7], [6]]  # first fit: 3 goes back to the second window


@pytest.mark.parametrize("cls", [PackedBatches, GroupedBatches])
def test_batches_resume_exactly_from_their_state(cls):
    rng = np.random.default_rng(1)
    ex = _examples(rng, rng.integers(3, 20, 37))
    kw = {"window": 24} if cls is PackedBatches else {}
    a = cls(ex, 3, 2, seed=5, **kw)
    for _ in range(7):
        a.next_batch()
    b = cls(ex, 3, 2, seed=5, **kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(40):  # across epoch boundaries
        assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))
    assert a.supervised_tokens == b.supervised_tokens > 0


# ----------------------------------------------------------------------------- new tokens

@pytest.mark.parametrize("tied", [True, False])
def test_new_token_rows_start_at_the_mean_of_the_old(tied):
    cfg = ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=4, tie_embeddings=tied)
    torch.manual_seed(0)
    sd = GPT(cfg).state_dict()
    grown = grow_vocab(sd, cfg, 12, [10, 11], n_old=10)
    assert torch.equal(grown["tok_emb.weight"][:10], sd["tok_emb.weight"])
    assert torch.allclose(grown["tok_emb.weight"][10], sd["tok_emb.weight"].mean(0))
    assert torch.equal(grown["tok_emb.weight"][10], grown["tok_emb.weight"][11])
    if not tied:
        assert torch.allclose(grown["lm_head.weight"][11], sd["lm_head.weight"].mean(0))
    _tok_json, ids = extend_tokenizer(char_tokenizer((EOT, PAD)).to_str(), [S, E, EOT])
    assert len(ids) == 2 and ids[0] == char_tokenizer((EOT, PAD)).get_vocab_size()


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random GPT with a character tokenizer that has no chat tokens (they get added)."""
    d = tmp_path_factory.mktemp("base") / "model"
    tok = char_tokenizer((EOT, PAD))
    torch.manual_seed(0)
    save_model_dir(GPT(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=160, n_layer=2, n_head=2,
                                   n_embd=32)), d, tok.to_str())
    return d


@pytest.fixture(scope="module")
def alpaca(shared_data, tmp_path_factory):
    recs = json.loads((shared_data / "alpaca_1k" / "alpaca_data_1k.json").read_text())[:60]
    p = tmp_path_factory.mktemp("alpaca") / "a.json"
    p.write_text(json.dumps([{k: "".join(c for c in v if c in CHARS) for k, v in r.items()} for r in recs]))
    return p


@pytest.fixture(scope="module")
def sft_run(base, alpaca, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELM_PEAK_TFLOPS", "1")  # no CPU peak measurement
        rc, so, se = cli("finetune", "sft", "--base", base, "--data", alpaca, "--out", out, "--train.max_steps=8",
                         *TINY)
    assert rc == 0, se
    return out, json.loads(so), se


def test_sft_run_records_supervision_and_the_template(sft_run, base):
    out, summary, err = sft_run
    assert summary["task"] == "sft" and summary["template"] == "chatml" and summary["packing"] == "on"
    assert 0 < summary["supervised_tokens"] < summary["real_tokens"]
    assert summary["truncated_examples"] > 0 and "truncated" in err
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert all(0 < r["supervised_tokens_per_s"] < r["real_tokens_per_s"] for r in recs)
    assert recs[-1]["supervised_tokens"] == summary["supervised_tokens"]
    best = out / "best"
    assert {"chat_template.jinja", "tokenizer_config.json", "tokenizer.json"} <= {p.name for p in best.iterdir()}
    meta = json.loads((best / "config.json").read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(best / "tokenizer.json"))
    assert tok.encode(f"{S}user{E}", add_special_tokens=False).ids[0] == tok.token_to_id(S)
    assert meta["model"]["vocab_size"] == tok.get_vocab_size() == 2 + len(set(CHARS)) + 2
    assert tok.token_to_id(E) in meta["hf"]["eos_token_id"] and tok.token_to_id(EOT) in meta["hf"]["eos_token_id"]
    assert meta["task"]["special_tokens"] == [S, E]


def test_chat_renders_what_training_used(sft_run, alpaca):
    from scalelm.generate.chat import ChatFormat
    from scalelm.generate.generator import Generator
    from scalelm.tasks.sft.formats import read_conversations

    best = sft_run[0] / "best"
    gen = Generator.from_checkpoint(best)
    fmt = ChatFormat(gen, best)
    assert fmt.template and E in {gen.tokenizer.id_to_token(i) for i in gen.eos_ids}
    msgs = read_conversations(alpaca)[0][1]
    trained = ChatTemplate(CHATML, EOT, EOT)
    segs = trained.segments(msgs)
    assert fmt.render(msgs[:1]) == segs[0][0] == f"{S}user\n{msgs[0]['content']}{E}\n{S}assistant\n"
    enc = Encoder(gen.tokenizer, trained, 10_000).encode(msgs)
    prompt_ids = fmt.encode(msgs[:1])
    assert enc.ids[:len(prompt_ids)].tolist() == prompt_ids and not enc.sup[:len(prompt_ids)].any()
    assert enc.sup[len(prompt_ids)]  # the reply starts right after what chat sends


def test_scalelm_chat_uses_the_saved_template(sft_run, monkeypatch, capsys):
    import io

    from scalelm.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Name a color.\n"))
    assert main(["chat", str(sft_run[0] / "best"), "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert "chat template" in capsys.readouterr().err


def test_no_supervised_token_is_an_error_and_truncation_is_reported(base, tmp_path):
    data = tmp_path / "d.jsonl"
    long_prompt = "x" * 200
    data.write_text("".join(json.dumps({"prompt": long_prompt, "completion": " y"}) + "\n" for _ in range(4)))
    rc, _, err = cli("finetune", "sft", "--base", base, "--data", data, "--val", data, "--out", tmp_path / "r",
                     "--template", "plain", *TINY)
    assert rc == 2 and "nothing to learn" in err and "4 of 4 training examples" in err
    ok = tmp_path / "ok.jsonl"
    ok.write_text(data.read_text() + "".join(json.dumps({"prompt": "hi", "completion": " yo"}) + "\n"
                                             for _ in range(3)))
    rc, so, err = cli("finetune", "sft", "--base", base, "--data", ok, "--val", ok, "--out", tmp_path / "r2",
                      "--template", "plain", "--train.max_steps=2", *TINY)
    assert rc == 0, err
    assert "4 of 7 training examples have no reply token" in err and "ok.jsonl:1, " in err
    assert json.loads(so)["dropped_examples"] == 4


def test_eval_qa_scores_final_answers(sft_run, shared_data, tmp_path):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(json.dumps({k: "".join(c for c in v if c in CHARS) for k, v in json.loads(x).items()})
                              for x in lines) + "\n")
    rc, so, err = cli("eval", sft_run[0], "--task", "qa", "--data", data, "--max-new-tokens", "8")
    assert rc == 0, err
    res = json.loads(so)
    assert res["n"] == 6 and 0 <= res["exact_match"] <= 1 and res["loss"] > 0 and res["supervised_tokens"] > 0
    import re

    from scalelm.tasks.sft.qa import GSM8K_ANSWER, extract

    pat = re.compile(GSM8K_ANSWER)
    assert extract("so 3 + 4 = 7\n#### 1,234.", pat) == "1234" and extract("#### $5.0", pat) == "5"
    assert extract("no answer", pat) is None


def test_lora_sft_adds_tokens_to_a_saved_base(base, alpaca, tmp_path):
    out = tmp_path / "lora"
    rc, so, err = cli("finetune", "sft", "--base", base, "--data", alpaca, "--out", out, "--lora.r=2",
                      "--train.max_steps=2", *TINY)
    assert rc == 0, err
    s = json.loads(so)
    assert s["trainable_params"] < s["params"]
    assert (out / "best" / "adapter.safetensors").is_file() and (out / "best" / "chat_template.jinja").is_file()
    assert json.loads((out / "best" / "config.json").read_text())["lora"]["base"] == str((out / "base").resolve())
    from scalelm.generate.generator import Generator

    gen = Generator.from_checkpoint(out / "best")  # base + adapters merged, the grown vocabulary
    assert gen.chat_template is not None and gen.tokenizer.token_to_id(S) == gen.cfg.vocab_size - 2


def test_sft_resumes_exactly_after_a_crash(base, alpaca, tmp_path, monkeypatch):
    args = ["--data", alpaca, "--train.max_steps=10", *TINY, "--model.dropout=0.1", "--train.save_every=3"]
    ref = tmp_path / "ref"
    assert cli("finetune", "sft", "--base", base, "--out", ref, *args)[0] == 0
    import scalelm.tasks.sft.objective as obj

    calls = {"n": 0}
    real = obj.sft_loss

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # after the step-6 checkpoint, mid-way to the next
            raise KeyboardInterrupt
        return real(model, batch)

    out = tmp_path / "crashed"
    monkeypatch.setattr(obj, "sft_loss", crashing)
    assert cli("finetune", "sft", "--base", base, "--out", out, *args)[0] == 130
    monkeypatch.setattr(obj, "sft_loss", real)
    assert (out / "latest").read_text().strip() == "ckpt-00000006"
    rc, _so, err = cli("finetune", "sft", "--out", out, "--base", base, *args)
    assert rc == 0 and "resumed from" in err, err

    def curve(d):
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("supervised_tokens")) for r in read_metrics(d)]

    assert curve(out) == curve(ref)


def test_the_server_chats_with_the_saved_template(sft_run):
    from serve_helpers import Live

    best = sft_run[0] / "best"
    live = Live(best)
    try:
        msgs = [{"role": "user", "content": "Name a color."}]
        assert live.server.chat.render(msgs) == ChatTemplate(CHATML, EOT, EOT).prompt(msgs)
        r = live.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert live.server.gen.tokenizer.token_to_id(E) in live.server.gen.eos_ids
    finally:
        live.close()


def test_chat_jsonl_without_packing_trains(base, tmp_path):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                         {"role": "assistant", "content": "see you"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(conv) + "\n" for _ in range(6)))
    rc, so, err = cli("finetune", "sft", "--base", base, "--data", data, "--val-fraction", "0.3", "--packing", "off",
                      "--out", tmp_path / "r", "--train.max_steps=2", *TINY)
    assert rc == 0, err
    s = json.loads(so)
    assert s["packing"] == "off" and s["train_examples"] == 4 and s["val_examples"] == 2
    # two replies per conversation: "hello<|im_end|>\n" and "see you<|im_end|>\n", 7 + 9 targets
    assert s["reply_tokens_per_epoch"] == 4 * 16
