"""`scalelm inspect` (scalelm/interp/inspect.py, report_html.py, figures.py): the numbers, the outputs,
and the HTML report opened in headless Chromium (when one is installed) to show that it renders."""

import json
import math
import shutil
import subprocess

import pytest
import torch

from scalelm import cli
from scalelm.config import ModelConfig
from scalelm.data.tokenizer import byte_tokenizer
from scalelm.interp.inspect import inspect_ids
from scalelm.interp.report_html import render_report
from scalelm.model.gpt import GPT
from scalelm.model.io import save_model_dir

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TEXT = "To be, or not to be </script><b>x"  # a closing tag in the text must stay text in the report


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = byte_tokenizer()
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=4, n_embd=64, init_std=0.2))
    d = tmp_path_factory.mktemp("inspect") / "m"
    save_model_dir(m, d, tokenizer_json=tok.to_str())
    return d


def test_the_numbers_are_the_models():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64, init_std=0.2)).eval()
    ids = [5, 17, 42, 8, 99, 3]
    ins = inspect_ids(m, ids, top_k=4, lens_k=2)
    with torch.no_grad():
        logits = m(torch.tensor([ids]))[0][0]
    logp = logits.log_softmax(-1)
    assert ins.loss[0] is None
    assert ins.loss[1:] == pytest.approx([-float(logp[i, t]) for i, t in enumerate(ids[1:])], abs=1e-5)
    assert ins.surprisal[2] == pytest.approx(ins.loss[2] / math.log(2))
    assert [t for t, _, _ in ins.top[3]] == logits[3].topk(4).indices.tolist()
    assert len(ins.lens_top) == 3 and ins.lens_labels == ["embed", "layer 1", "layer 2"]
    # the last row of the lens is the model's own prediction
    assert [(t, round(p, 5)) for t, _, p in ins.lens_top[-1][4]] == \
        [(t, round(float(p), 5)) for p, t in zip(*logits[4].softmax(-1).topk(2))]
    assert ins.attention.shape == (2, 4, 6, 6)
    torch.testing.assert_close(ins.attention.sum(-1), torch.ones(2, 4, 6))


def test_inspect_command_table_json_and_report(model_dir, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["inspect", str(model_dir), "--text", TEXT, "--top-k", "3"]) == 0
    table = capsys.readouterr().out
    assert "logit lens" in table and "perplexity" in table and "␣" in table
    out = tmp_path / "rep"
    assert cli.main(["inspect", str(model_dir), "--text", TEXT, "--json", "--bos", "--out", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"][0]["loss"] is None and got["tokens"][1]["loss"] > 0  # the first is end-of-text
    assert len(got["tokens"]) == len(TEXT.encode()) + 1
    assert got["perplexity"] == pytest.approx(math.exp(got["mean_loss"]), rel=1e-3)
    assert got["attention"]["shape"] == [2, 4, len(got["tokens"]), len(got["tokens"])]
    assert json.loads((out / "inspect.json").read_text()) == got
    assert sorted(p.name for p in out.iterdir()) == ["attention_layer0.png", "attention_layer1.png", "inspect.json",
                                                     "report.html"]
    page = (out / "report.html").read_text()
    assert page.count("</script>") == 2 and "http://" not in page and "https://" not in page  # self-contained
    assert cli.main(["inspect", str(model_dir), "--text", "x", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["inspect", str(model_dir), "--text", "x" * 80]) == 2
    assert "the model's context is 64" in capsys.readouterr().err


def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-headless-shell", "chromium-browser",
                                           "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium-headless-shell)")
def test_the_report_renders_in_headless_chromium(tmp_path):
    """The page's script runs (the tables it builds are in the DOM) and the screenshot shows the colours."""
    from PIL import Image

    torch.manual_seed(0)
    tok = byte_tokenizer()
    m = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=4, n_embd=64,
                        init_std=0.2)).eval()
    ins = inspect_ids(m, tok.encode(TEXT).ids, tok)
    page = tmp_path / "report.html"
    page.write_text(render_report(ins), encoding="utf-8")
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<tr>") == len(ins.ids) + 1  # the logit-lens table: a header and a row per token
    assert dom.count('class="tok"') == 2 * len(ins.ids)  # the surprisal text and the attention text
    assert "<b>" not in dom and "&lt;" in dom  # the text stays text: no element made of it
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1100,1300", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(1 << 20)
    red = sum(n for n, (r, g, b) in colours if r > 180 and g < 150 and b < 150)  # surprisal
    blue = sum(n for n, (r, g, b) in colours if b > 180 and r < 150)  # the attention heatmap
    green = sum(n for n, (r, g, b) in colours if g > 120 and r < 120 and b < 120)  # the logit lens
    assert red > 500 and blue > 500 and green > 500, (red, blue, green)
