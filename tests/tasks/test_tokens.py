"""Token-classification pieces: the readers (CoNLL, CoNLL-U, JSONL; every bad input names FILE:LINE),
tag schemes (detection, IOB1/BIOES -> IOB2, orphan I- repair), subword alignment and windows, scores
against seqeval and an independent count, the tagger under padding, batches, and the Hugging Face
``*ForTokenClassification`` exports' parity (GPT-2, Llama-style, BERT)."""

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.model.build import build_model
from scalelm.model.loss import IGNORE_INDEX
from scalelm.tasks.tokens.align import WordEncoder
from scalelm.tasks.tokens.data import TokenBatches, label_ids, label_names, read_labelled
from scalelm.tasks.tokens.formats import TokensDataError, read_sentences
from scalelm.tasks.tokens.metrics import scores
from scalelm.tasks.tokens.model import Tagger
from scalelm.tasks.tokens.schemes import detect_scheme, has_spans, normalise, to_iob2

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GPT2_STYLE = dict(vocab_size=300, block_size=48, n_layer=2, n_head=2, n_embd=32)
LLAMA_STYLE = dict(GPT2_STYLE, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                   tie_embeddings=False, n_head=4, n_kv_head=2)
BERT_STYLE = dict(GPT2_STYLE, arch="encoder", pos_embedding="learned", norm="layernorm", norm_eps=1e-12, mlp="gelu",
                  gelu="erf", bias=True, tie_embeddings=True, norm_placement="post_add", type_vocab_size=2)
MODERN_STYLE = dict(GPT2_STYLE, arch="encoder", pos_embedding="rope", norm="layernorm", mlp="geglu", gelu="erf",
                    bias=False, tie_embeddings=True, norm_placement="pre")


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def bpe_json(shared_data) -> str:
    """A byte-level BPE (vocab 300) trained on SST-2 sentences: words split into several subwords."""
    from scalelm.data.tokenizer import train_bpe

    lines = (shared_data / "sst2" / "stsa.binary.train").read_text().splitlines()[:2000]
    return train_bpe(iter([s.split(" ", 1)[1] for s in lines]), vocab_size=300).to_str()


@pytest.fixture(scope="module")
def wordpiece_json() -> str:
    """A BERT-style WordPiece tokenizer: [CLS] ... [SEP] around every text, lowercasing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(["the film was a fine story about paris and rome, anna said."] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok.to_str()


# ----------------------------------------------------------------------------- readers

def test_conll_columns_docstart_and_tag_column(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"
    sents, layout, fmt = read_sentences(write(tmp_path, "a.txt", text))
    assert fmt == "conll"
    assert [(s.words, s.tags) for s in sents] == [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]
    assert sents[1].where(0).endswith("a.txt:6")
    assert layout.slots == [None, None, (0, 0), (0, 1), None, (1, 0)]  # one entry per input line
    chunks, _, _ = read_sentences(write(tmp_path, "a.txt", text), tag_column=3)
    assert chunks[0].tags == ["B-NP", "B-VP"]
    tabs, _, _ = read_sentences(write(tmp_path, "t.txt", "New York\tB-LOC\nis\tO\n"))  # tabs: a word may hold a space
    assert tabs[0].words == ["New York", "is"]
    words_only, _, _ = read_sentences(write(tmp_path, "w.txt", "Anna\nflew\n"), labelled=False)
    assert words_only[0].words == ["Anna", "flew"] and words_only[0].tags is None


def test_conllu_skips_comments_ranges_and_empty_nodes(tmp_path):
    rows = ["# sent_id = 1", "# text = I don't", "1\tI\tI\tPRON\tPRP\t_\t2\tnsubj\t_\t_",
            "2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_", "2\tdo\tdo\tAUX\tVBP\t_\t0\troot\t_\t_",
            "3\tn't\tnot\tPART\tRB\t_\t2\tadvmod\t_\t_", "3.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t2:x\t_", ""]
    p = write(tmp_path, "a.conllu", "\n".join(rows) + "\n")
    sents, layout, fmt = read_sentences(p)
    assert fmt == "conllu" and sents[0].words == ["I", "do", "n't"] and sents[0].tags == ["PRON", "AUX", "PART"]
    assert read_sentences(p, tag_field="xpos")[0][0].tags == ["PRP", "VBP", "RB"]
    assert layout.slots == [None, None, (0, 0), None, (0, 1), (0, 2), None, None]
    assert read_sentences(write(tmp_path, "noext", "\n".join(rows) + "\n"))[2] == "conllu"  # by content


def test_jsonl_records(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"tokens": ["Anna", "flew"], "tags": ["B-PER", "O"]}\n\n'
              '{"tokens": ["Rome"], "tags": ["B-LOC"]}\n')
    sents, layout, fmt = read_sentences(p)
    assert fmt == "jsonl" and [s.tags for s in sents] == [["B-PER", "O"], ["B-LOC"]]
    assert layout.slots == [(0, 0), None, (1, 0)]
    assert read_sentences(write(tmp_path, "x.data", '{"tokens": ["a"], "tags": ["O"]}\n'))[2] == "jsonl"


@pytest.mark.parametrize("name, text, kw, message", [
    ("e.txt", "\n \n", {}, "e.txt is empty"),
    ("c.txt", "EU B-ORG\nrejects VBZ O\n", {}, "c.txt:2: 3 columns, but the file's first word line has 2"),
    ("c.txt", "EU\tB-ORG\nrejects O\n", {}, "c.txt:2: 1 columns"),
    ("c.txt", "EU\nrejects\n", {}, "c.txt:1: one column"),
    ("c.txt", "EU NNP B-ORG\n", {"tag_column": 4}, "--tag-column 4 is not a tag column"),
    ("d.txt", "-DOCSTART- O\n\n", {}, "holds no sentences"),
    ("u.conllu", "1\tI\tI\tPRON\tPRP\t_\t2\tnsubj\t_\n", {}, "u.conllu:1: 9 tab-separated fields"),
    ("u.conllu", "1\tI\tI\t_\tPRP\t_\t2\tnsubj\t_\t_\n", {}, "u.conllu:1: no UPOS"),
    ("u.conllu", "x\tI\tI\tPRON\tPRP\t_\t2\tnsubj\t_\t_\n", {}, "u.conllu:1: the ID field 'x'"),
    ("j.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a"\n', {}, "j.jsonl:2: not valid JSON"),
    ("j.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', {}, "j.jsonl:1: 2 tokens but 1 tags"),
    ("j.jsonl", '{"words": ["a"], "tags": ["O"]}\n', {}, "j.jsonl:1: no field 'tokens'"),
    ("j.jsonl", '[1, 2]\n', {}, "j.jsonl:1: expected a JSON object"),
    ("j.jsonl", '{"tokens": [], "tags": []}\n', {}, "j.jsonl:1: 'tokens' is empty"),
])
def test_bad_input_names_file_and_line(tmp_path, name, text, kw, message):
    with pytest.raises(TokensDataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_sentences(write(tmp_path, name, text), **kw)


def test_unknown_validation_tag_names_its_line(tmp_path):
    s = {"format": None}
    train, _ = read_labelled(write(tmp_path, "tr.txt", "Anna B-PER\nflew O\n"), s)
    val, _ = read_labelled(write(tmp_path, "va.txt", "Rome B-LOC\n\nAnna B-PER\n"), s, True)
    names = label_names(train, "tr.txt")
    assert names == ["O", "B-PER"]  # O first
    with pytest.raises(TokensDataError, match=r"va.txt:1: unknown tag 'B-LOC'.*the tags of --train"):
        label_ids(val, names, "--train tr.txt")


# ----------------------------------------------------------------------------- schemes

def test_scheme_detection_and_conversion_to_iob2():
    iob1 = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"], ["O", "I-ORG"]]
    assert detect_scheme(iob1) == "IOB1"
    assert to_iob2(iob1[0], "IOB1") == (["B-PER", "I-PER", "B-PER", "O", "B-LOC"], [])  # no repairs: IOB1's rule
    bioes = [["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "U-ORG", "B-ORG", "L-ORG"]]
    assert detect_scheme(bioes) == "BIOES"
    assert to_iob2(bioes[0], "BIOES")[0] == ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "B-ORG", "B-ORG", "I-ORG"]
    iob2 = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "I-LOC"]]  # a stray I- in an IOB2 file: repaired
    assert detect_scheme(iob2) == "IOB2"
    tags, scheme, repairs = normalise(iob2)
    assert scheme == "IOB2" and tags[1] == ["O", "B-LOC"] and repairs == [(1, 1)]
    pos = [["NOUN", "VERB"], ["DET", "NOUN"]]
    assert not has_spans(t for s in pos for t in s) and normalise(pos) == (pos, "none", [])
    assert not has_spans(["O", "O"]) and has_spans(["O", "B-X"])


def test_repairs_are_counted_in_one_note(tmp_path, capsys):
    sents, scheme = read_labelled(write(tmp_path, "r.txt", "a B-X\nb O\nc I-X\n\nd I-Y\n"), {})
    assert scheme == "IOB2" and [s.tags for s in sents] == [["B-X", "O", "B-X"], ["B-Y"]]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "repaired 2 I- tag(s)" in err and "r.txt:3" in err


# ----------------------------------------------------------------------------- scores

def _entities(seq):
    """Strict IOB2 entities, counted independently of seqeval: (type, start, end)."""
    out, start, typ = set(), None, None
    for i, t in enumerate(seq + ["O"]):
        p, _, ty = t.partition("-")
        if start is not None and not (p == "I" and ty == typ):
            out.add((typ, start, i))
            start = None
        if p == "B":
            start, typ = i, ty
    return out


def test_scores_agree_with_seqeval_and_an_independent_count():
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"], ["B-LOC", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "I-ORG", "O"], ["I-LOC", "O", "B-PER"]]
    s = scores(gold, pred, spans=True)
    assert s["f1"] == pytest.approx(f1_score(gold, pred, mode="strict", scheme=IOB2))
    g = {(i, e) for i, x in enumerate(gold) for e in _entities(x)}
    p = {(i, e) for i, x in enumerate(pred) for e in _entities(x)}  # the stray I-LOC starts no entity (strict)
    prec, rec = len(g & p) / len(p), len(g & p) / len(g)
    assert (s["precision"], s["recall"]) == (pytest.approx(prec), pytest.approx(rec))
    assert s["f1"] == pytest.approx(2 * prec * rec / (prec + rec))  # 2 right of 4 predicted, 5 gold
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert s["per_type"]["LOC"]["recall"] == 0.0 and s["entities"] == 5
    assert s["accuracy"] == pytest.approx(8 / 11)
    pos = scores([["NOUN", "VERB", "DET"]], [["NOUN", "NOUN", "DET"]], spans=False)
    assert pos["accuracy"] == pytest.approx(2 / 3) and "f1" not in pos and pos["per_tag"]["VERB"]["recall"] == 0.0


# ----------------------------------------------------------------------------- alignment

def test_first_subword_carries_the_label(bpe_json):
    enc = WordEncoder(bpe_json, 64)
    words = ["Unbelievably", "dull", ",", "Grandiloquent", "film"]
    (w,) = enc.windows([words], [[1, 0, 0, 2, 0]])
    assert enc.tokenizer.decode(w.ids) == " ".join(words)  # words after the first read with their space
    per = enc.subwords([words])[0]
    assert len(per[0][0]) > 1 and w.first == [sum(len(p[0]) for p in per[:i]) + per[i][1] for i in range(5)]
    labelled = [(i, y) for i, y in enumerate(w.labels) if y != IGNORE_INDEX]
    assert labelled == list(zip(w.first, [1, 0, 0, 2, 0]))  # only first subwords; the rest are ignored
    assert enc.tokenizer.decode(w.ids[w.first[3]:w.first[4]]).strip() == "Grandiloquent"
    assert all(not enc.tokenizer.decode([w.ids[p]]).isspace() for p in w.first)  # never a lone space


def test_long_sentences_are_split_into_windows_at_word_boundaries(bpe_json):
    enc = WordEncoder(bpe_json, 6)
    words = ["a", "wonderfully", "odd", "film", "with", "extraordinarily", "long", "words"]
    labels = list(range(len(words)))
    wins = enc.windows([words, ["short"]], [labels, [0]])
    assert all(len(w.ids) <= 6 for w in wins) and wins[-1].sent == 1
    seen = [(w.word0 + k, w.labels[p]) for w in wins if w.sent == 0 for k, p in enumerate(w.first)]
    assert seen == list(zip(range(len(words)), labels))  # every word in exactly one window, in order


def test_encoder_windows_carry_the_tokenizers_special_tokens(wordpiece_json):
    enc = WordEncoder(wordpiece_json, 32, special_tokens=True)
    cls, sep = enc.tokenizer.token_to_id("[CLS]"), enc.tokenizer.token_to_id("[SEP]")
    assert (enc.prefix, enc.suffix) == ([cls], [sep])
    (w,) = enc.windows([["Anna", "said", "Paris,"]], [[1, 0, 2]])
    assert w.ids[0] == cls and w.ids[-1] == sep and w.labels[0] == w.labels[-1] == IGNORE_INDEX
    assert w.first[0] == 1 and [w.labels[p] for p in w.first] == [1, 0, 2]
    assert len(enc.windows([["x"] * 40])) == 2  # 30 words fit between [CLS] and [SEP]


# ----------------------------------------------------------------------------- model and batches

@pytest.mark.parametrize("shape", [GPT2_STYLE, BERT_STYLE, MODERN_STYLE], ids=["gpt", "bert", "modernbert"])
def test_tagger_logits_do_not_depend_on_padding(shape):
    torch.manual_seed(0)
    model = Tagger(build_model(ModelConfig(**shape)), 3).eval()
    a, b = torch.randint(0, 300, (1, 5)), torch.randint(0, 300, (1, 9))
    idx = torch.zeros(2, 9, dtype=torch.long)
    idx[0, :5], idx[1] = a, b
    valid = torch.zeros(2, 9, dtype=torch.bool)
    valid[0, :5], valid[1] = True, True
    with torch.no_grad():
        both = model(idx, valid)
        torch.testing.assert_close(both[0, :5], model(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1], model(b)[0], atol=1e-5, rtol=0)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all("lm_head" in n or "head_dense" in n or "head_norm" in n for n in frozen)
    assert all(p.requires_grad for p in model.head.parameters())


def test_token_batches_pad_labels_and_resume():
    ids = [[5, 6, 7], [8], [9, 10]]
    labels = [[1, IGNORE_INDEX, 0], [2], [0, 1]]
    b = TokenBatches(ids, labels, micro_batch_size=3, seed=1)
    idx, valid, y = b.next_batch()
    assert y.shape == idx.shape and (y[~valid] == IGNORE_INDEX).all()
    rows = {tuple(r[v].tolist()): tuple(t[v].tolist()) for r, v, t in zip(idx, valid, y)}
    assert rows == {(5, 6, 7): (1, IGNORE_INDEX, 0), (8,): (2,), (9, 10): (0, 1)}
    state = b.state_dict()
    assert state["kind"] == "tokens"
    c = TokenBatches(ids, labels, micro_batch_size=3, seed=1)
    c.load_state_dict(state)
    assert torch.equal(c.next_batch()[0], b.next_batch()[0])


# ----------------------------------------------------------------------------- Hugging Face export

@pytest.mark.parametrize("shape, arch", [(GPT2_STYLE, "GPT2ForTokenClassification"),
                                         (LLAMA_STYLE, "LlamaForTokenClassification"),
                                         (BERT_STYLE, "BertForTokenClassification"),
                                         (MODERN_STYLE, "ModernBertForTokenClassification")],
                         ids=["gpt2", "llama", "bert", "modernbert"])
def test_hf_token_classification_parity(shape, arch):
    pytest.importorskip("transformers")
    from scalelm.tasks.tokens.hf import to_hf_tagger

    torch.manual_seed(0)
    model = Tagger(build_model(ModelConfig(**shape)), 5).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            if p.dim() == 1:
                p.normal_()  # biases (and a norm's weight) that matter
    hf = to_hf_tagger(model, {"labels": ["O", "B-A", "I-A", "B-B", "I-B"]})
    assert type(hf).__name__ == arch and hf.config.id2label[1] == "B-A"
    idx = torch.randint(0, 300, (2, 11))
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 7:] = False  # right padding
    with torch.no_grad():
        ours = model(idx, valid)
        theirs = hf(input_ids=idx, attention_mask=valid.long()).logits
    torch.testing.assert_close(theirs[valid], ours[valid], atol=1e-4, rtol=0)


def test_span_predictions_are_decoded_as_valid_iob2_and_pos_tags_by_argmax():
    """Per-word argmax would write O I-MISC and B-PER I-ORG, which strict IOB2 scoring drops; the decoder
    returns the best sequence the scheme allows. Without spans (POS) each word keeps its argmax."""
    import torch

    from scalelm.tasks.tokens.metrics import tags_of
    from scalelm.tasks.tokens.schemes import split_tag

    names = ["O", "B-MISC", "B-ORG", "B-PER", "I-MISC", "I-ORG", "I-PER"]

    def row(**p):
        x = torch.full((len(names),), -5.0)
        for k, v in p.items():
            x[names.index(k.replace("_", "-"))] = v
        return x

    sent = [row(O=0.0, B_MISC=-0.5), row(I_MISC=1.5, O=0.5), row(B_PER=2.0), row(I_ORG=1.0, I_PER=0.8), None]
    assert [names[int(x.argmax())] for x in sent[:4]] == ["O", "I-MISC", "B-PER", "I-ORG"]  # invalid as argmax
    assert tags_of([sent], names, "O") == [["B-MISC", "I-MISC", "B-PER", "I-PER", "O"]]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # random scores: always a valid IOB2 sequence
        tags = tags_of([[torch.randn(len(names), generator=g) * 3 for _ in range(8)]], names, "O")[0]
        for prev, cur in zip(["O"] + tags, tags):
            if cur.startswith("I-"):
                assert split_tag(prev)[0] in ("B", "I") and split_tag(prev)[1] == split_tag(cur)[1], tags
    pos = ["ADJ", "NOUN", "VERB"]
    assert tags_of([[torch.tensor([0.0, 2.0, 1.0]), torch.tensor([3.0, 0.0, 1.0])]], pos, "X") == [["NOUN", "ADJ"]]
