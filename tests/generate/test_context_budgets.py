"""Issue 28 item 4: each row of a batch gets the token budget it would get alone, and what the context
limit does (a prompt or source cut, a window slid, an output stopped) is reported, never hidden.

The Generator (plain, sliding, per-row budgets, beam search) and the Seq2SeqGenerator give every row of
a batch of different lengths exactly its one-at-a-time tokens; `translate` and `eval --task translate`
give the same lines whatever `--batch-size` (decoder-only and encoder-decoder), cut an over-long
source to its first tokens instead of answering an empty line, and count cuts on stderr and in JSON;
`generate` reports truncated prompts, slides and outputs stopped at the context."""

import json

import pytest
import torch
from train_helpers import cli

from scalelm.config import ModelConfig
from scalelm.generate.generator import Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.generate.seq2seq import Seq2SeqGenerator
from scalelm.model.build import build_model
from scalelm.model.io import save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")
GREEDY = SamplingParams(temperature=0.0)
T = 32  # every model's context: small, so that budgets and cuts are hit with short texts
LENGTHS = (2, 12, 28)  # prompts shorter than, near and close to the context


def _gpt():
    torch.manual_seed(0)  # a random model with peaked logits (init_std): no near-ties between batch and alone
    return build_model(ModelConfig(vocab_size=320, block_size=T, n_layer=2, n_head=2, n_embd=32, init_std=0.3,
                                   tie_embeddings=False)).eval()


def _encdec():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="encoder-decoder", vocab_size=320, block_size=T, n_layer=1,
                                   n_encoder_layer=1, n_decoder_layer=1, n_head=2, n_embd=32, intermediate_size=64,
                                   init_std=0.3)).eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_json):
    """Translation model directories (decoder-only and encoder-decoder) of random tiny models."""
    root = tmp_path_factory.mktemp("budgets")
    save_model_dir(_gpt(), root / "dec", tokenizer_json=tiny_tokenizer_json,
                   extra={"task": {"name": "translate", "arch": "decoder", "eot_id": 0, "separator": "=>"}})
    save_model_dir(_encdec(), root / "encdec", tokenizer_json=tiny_tokenizer_json,
                   extra={"task": {"name": "translate", "arch": "encoder-decoder", "eot_id": 0}})
    return root


# ----------------------------------------------------------------------------- the generators


def _batch_and_alone(gen, prompts, budget, **kw):
    batch = gen.generate(prompts, max_new_tokens=budget, **kw)
    alone = [gen.generate([p], max_new_tokens=budget if isinstance(budget, int) else [budget[i]], **kw)[0]
             for i, p in enumerate(prompts)]
    return batch, alone


@pytest.mark.parametrize("slide", [True, False])
def test_a_batch_gives_every_row_its_one_at_a_time_tokens(slide):
    gen, prompts = Generator(_gpt(), None, [0]), _prompts()
    kw = dict(sampling=GREEDY, ignore_eos=True, slide=slide)
    # per-row budgets that fit each row's own context, not the batch's: 2 + 30 > 28 + 1 slots past the longest
    batch, alone = _batch_and_alone(gen, prompts, [30, 9, 5], **kw)
    assert [c.tokens for c in batch] == [c.tokens for c in alone]
    assert [len(c.tokens) for c in batch] == [30, 9, 5] and not any(c.context_slides for c in batch)
    # 40 tokens, past every row's context: each slides when its own context fills (not its neighbour's), or stops
    batch, alone = _batch_and_alone(gen, prompts, 40, **kw)
    assert [c.tokens for c in batch] == [c.tokens for c in alone]
    if slide:
        assert all(len(c.tokens) == 40 and c.context_slides > 0 and not c.stopped_at_context for c in batch)
        assert [c.context_slides for c in batch] == [c.context_slides for c in alone]
    else:  # each its own room, block_size - prompt + 1 (a batch gave every row 32 - 28 + 1 = 5)
        assert [len(c.tokens) for c in batch] == [T - n + 1 for n in LENGTHS]
        assert all(c.stopped_at_context and c.finish_reason == "length" and not c.context_slides for c in batch)


def test_beam_search_gives_each_prompt_its_own_context():
    gen, prompts = Generator(_gpt(), None, [0]), _prompts()
    batch = gen.beam_search(prompts, num_beams=2, max_new_tokens=40, ignore_eos=True)
    alone = [gen.beam_search([p], num_beams=2, max_new_tokens=40, ignore_eos=True)[0] for p in prompts]
    assert [c.tokens for c in batch] == [c.tokens for c in alone]
    assert [len(c.tokens) for c in batch] == [T - n + 1 for n in LENGTHS]  # was 5 for every prompt of this batch
    assert all(c.stopped_at_context for c in batch)
    short = gen.beam_search(prompts, num_beams=2, max_new_tokens=3, ignore_eos=True)
    assert [len(c.tokens) for c in short] == [3, 3, 3] and not any(c.stopped_at_context for c in short)


def test_seq2seq_rows_get_their_own_budgets():
    gen, sources = Seq2SeqGenerator(_encdec(), None, [0]), _prompts()
    budgets = [2 * len(s) + 16 for s in sources]  # what translate asks: 20, 40, 72 (past the decoder's 32)
    batch = gen.generate(sources, max_new_tokens=budgets, sampling=GREEDY, ignore_eos=True, slide=False)
    alone = [gen.generate([s], max_new_tokens=[n], sampling=GREEDY, ignore_eos=True, slide=False)[0]
             for s, n in zip(sources, budgets)]
    assert [c.tokens for c in batch] == [c.tokens for c in alone]
    assert [len(c.tokens) for c in batch] == [20, T, T] and [c.stopped_at_context for c in batch] == [False, True, True]
    beams = gen.beam_search(sources, num_beams=2, max_new_tokens=budgets, ignore_eos=True)
    one = [gen.beam_search([s], num_beams=2, max_new_tokens=[n], ignore_eos=True)[0] for s, n in zip(sources, budgets)]
    assert [c.tokens for c in beams] == [c.tokens for c in one]


def test_per_row_budgets_are_checked():
    gen = Generator(_gpt(), None, [0])
    with pytest.raises(ValueError, match="2 budgets for 3 prompts"):
        gen.generate(_prompts(), max_new_tokens=[4, 4])
    with pytest.raises(ValueError, match="max_new_tokens=0 is invalid"):
        gen.generate(_prompts(), max_new_tokens=[4, 0, 4])


# ----------------------------------------------------------------------------- translate / eval --task translate


def _sources(tmp_path):
    long = " ".join(["a very long sentence about dogs and the green park"] * 6)  # longer than the context
    lines = ["A dog.", "Two men play football in a park.", long, "", "Birds sing.", "x"]
    src = tmp_path / "src.en"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src, lines


@pytest.mark.parametrize("arch", ["dec", "encdec"])
@pytest.mark.parametrize("beams", ["1", "2"])
def test_translate_does_not_depend_on_the_batch_size_and_reports_cuts(models, tmp_path, arch, beams):
    src, lines = _sources(tmp_path)
    outs = []
    for bs in ("1", "3", str(len(lines))):
        rc, so, se = cli("translate", models / arch, "--input", src, "--batch-size", bs, "--beams", beams)
        assert rc == 0 and "Traceback" not in se, se
        outs.append(so)
    assert outs[0] == outs[1] == outs[2]
    got = outs[0].split("\n")
    assert len(got) == len(lines) + 1 and got[-1] == "" and got[3] == ""  # one line per input; blank stays blank
    assert got[2] != ""  # an over-long source is cut to its first tokens and translated, not answered empty
    assert "warning: 1 source was longer than the context (cut to its first" in se and "line 3)" in se
    rc, _, se = cli("translate", models / arch, "--input", src, "--beams", beams, "--max-new-tokens", "10000")
    assert rc == 0 and "translations stopped at the context limit (lines 1, 2, 3, 5, 6)" in se, se


def test_eval_translate_counts_cut_sources_and_stopped_outputs(models, tmp_path):
    src, lines = _sources(tmp_path)
    ref = tmp_path / "ref.de"
    ref.write_text("\n".join(["Ein Hund."] * len(lines)) + "\n", encoding="utf-8")
    for bs in ("1", "4"):
        rc, so, se = cli("eval", models / "dec", "--task", "translate", "--source", src, "--reference", ref,
                         "--batch-size", bs, "--save-hypotheses", tmp_path / f"hyp{bs}")
        assert rc == 0 and "Traceback" not in se, se
        res = json.loads(so)
        assert res["sources_cut"] == 1 and res["stopped_at_context"] >= 1 and res["n"] == len(lines)
        assert "source was longer than the context" in se
    assert (tmp_path / "hyp1").read_text() == (tmp_path / "hyp4").read_text()


# ----------------------------------------------------------------------------- generate


def test_generate_reports_truncated_prompts_slides_and_stops(models, capsys):
    long = " ".join(["word"] * 60)
    rc, so, se = cli("generate", models / "dec", "--prompt", long, "--prompt", "hi", "--truncate", "--temperature",
                     "0", "--max-new-tokens", "40", "--ignore-eos", "--json")
    assert rc == 0 and "Traceback" not in se, se
    rows = [json.loads(line) for line in so.splitlines()]
    assert rows[0]["prompt_cut_tokens"] > 0 and rows[1]["prompt_cut_tokens"] == 0
    assert all(r["context_slides"] > 0 and not r["stopped_at_context"] and len(r["tokens"]) == 40 for r in rows)
    assert "warning: 1 prompt was longer than the context" in se and "2 outputs outgrew the context" in se
    rc, so, se = cli("generate", models / "dec", "--prompt", long, "--prompt", "hi", "--truncate", "--beams", "2",
                     "--max-new-tokens", "40", "--ignore-eos", "--json")
    assert rc == 0 and "Traceback" not in se, se
    rows = [json.loads(line) for line in so.splitlines()]
    assert all(r["stopped_at_context"] for r in rows) and len(rows[1]["tokens"]) > len(rows[0]["tokens"])
    assert "2 outputs stopped at the context limit" in se
    rc, so, se = cli("generate", models / "dec", "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "5",
                     "--json")
    assert rc == 0 and "warning" not in se and json.loads(so)["stopped_at_context"] is False
