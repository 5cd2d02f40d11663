"""Steering by activation addition, measured: how often a sentiment classifier judges generations
positive, unsteered and steered at several scales, beside the fluency cost.

    python benchmarks/bench_steer.py --lm MODEL --classifier CLASSIFIER [--layer L] [--scales 0,2,4,8]
                                     [--pairs 200] [--samples 100] [--max-new-tokens 40] [--quick]

The vector (scalelm/interp/steering.py) is the difference of the mean streams entering ``--layer``
(default: the middle layer) over ``--pairs`` positive and as many negative SST-2 *train* sentences.
Generations start from neutral prompts (below), sampled at temperature 1 with top-k 50 and fixed seeds,
so each scale sees the same random draws. Each row: the scale, the share of generations the
classifier (a ``scalelm finetune classify`` model, run through ``scalelm classify``) labels
positive, and the perplexity the *unsteered* LM assigns to the generated tokens given their prompt
(how much the steering costs in fluency). Negative scales steer towards negative sentiment.
``--quick`` shrinks everything to prove the script works; its numbers mean nothing. Writes
benchmarks/results/steer.json (steer_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time

from _util import ROOT, log, machine, write_json  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2" / "stsa.binary.train"
PROMPTS = ["The movie was", "I watched the film and", "This book is", "The story of the", "Overall, the show",
           "My friend said the play was", "The acting in this", "After the ending I felt"]


def sst2_sentences(n: int) -> tuple[list[str], list[str]]:
    pos, neg = [], []
    for line in SST2.read_text().splitlines():
        label, _, text = line.partition(" ")
        (pos if label == "1" else neg).append(text.strip())
    return pos[:n], neg[:n]


def perplexity(model, tok_ids: list[list[int]], prompt_lens: list[int]) -> float:
    """exp of the mean loss of the generated tokens (after each prompt) under ``model``."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, n in zip(tok_ids, prompt_lens):
            if len(ids) <= n:
                continue
            logp = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
            tgt = torch.tensor(ids[n:])
            nll -= float(logp[n - 1:len(ids) - 1].gather(1, tgt[:, None]).sum())
            count += len(ids) - n
    return math.exp(nll / count) if count else float("nan")


def share_positive(classifier: str, texts: list[str]) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(" ".join(t.split()) or "." for t in texts) + "\n")
    out = subprocess.run([sys.executable, "-m", "scalelm", "classify", classifier, "--input", f.name],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    labels = [json.loads(line)["label"] for line in out.splitlines() if line.strip()]
    positive = {"1", "positive", "pos"}
    return sum(str(lab).lower() in positive for lab in labels) / max(1, len(labels))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm", required=True, help="the language model (a model directory or RUN_DIR)")
    ap.add_argument("--classifier", required=True, help="a sentiment classifier (`scalelm finetune classify`)")
    ap.add_argument("--layer", type=int, help="default: the middle layer")
    ap.add_argument("--scales", default="-8,-4,0,2,4,8")
    ap.add_argument("--pairs", type=int, default=200, help="positive and negative sentences for the vector")
    ap.add_argument("--samples", type=int, default=96, help="generations per scale")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.samples, args.max_new_tokens, args.scales = 8, 8, 8, "0,4"
    sys.path.insert(0, str(ROOT))
    from scalelm.generate.generator import Generator
    from scalelm.generate.sampling import SamplingParams
    from scalelm.interp.steering import steer, steering_vector

    gen = Generator.from_checkpoint(args.lm)
    plain = gen.model  # the decoding copy: the unsteered model scores fluency with the same weights
    layer = args.layer if args.layer is not None else gen.cfg.n_layer // 2
    pos, neg = sst2_sentences(args.pairs)
    t = time.perf_counter()
    vec = steering_vector(gen, [gen.encode(s) for s in pos], [gen.encode(s) for s in neg], layer)
    log(f"vector at layer {layer} from {len(pos)}+{len(neg)} sentences, norm {float(vec.norm()):.3f} "
        f"({time.perf_counter() - t:.1f}s)")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.samples)]
    sampling = SamplingParams(temperature=1.0, top_k=50)
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        t = time.perf_counter()
        with steer(gen, vec, layer, scale):
            comps = [gen.generate(p, args.max_new_tokens, sampling=sampling, seed=1000 + i)[0]
                     for i, p in enumerate(prompts)]
        texts = [c.text for c in comps]
        ppl = perplexity(plain, [c.prompt_tokens + c.tokens for c in comps], [len(c.prompt_tokens) for c in comps])
        row = {"scale": scale, "positive_share": round(share_positive(args.classifier, texts), 4),
               "perplexity_unsteered_lm": round(ppl, 3), "seconds": round(time.perf_counter() - t, 1),
               "example": prompts[0] + texts[0]}
        log(f"scale {scale:+g}: positive {row['positive_share']:.1%}, perplexity {row['perplexity_unsteered_lm']:.2f}"
            f"  e.g. {row['example']!r}")
        rows.append(row)
    out = write_json("steer_quick.json" if args.quick else "steer.json", {"machine": machine(peaks=False), "lm": args.lm, "classifier": args.classifier, "layer": layer,
                     "pairs": len(pos), "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                     "rows": rows})
    print(f"{'scale':>6}  {'positive':>8}  {'perplexity':>10}")
    for r in rows:
        print(f"{r['scale']:>+6g}  {r['positive_share']:>8.1%}  {r['perplexity_unsteered_lm']:>10.2f}")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
