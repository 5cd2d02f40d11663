"""Control for the baby benchmark: nanoGPT's own training loop around scalelm's GPT.

    python benchmarks/nanogpt_loop.py [SEED]

Re-implements nanoGPT's ``train.py`` for its CPU "baby" run (torch.randint batches, its LR
function, AdamW decaying every 2-D tensor, bias=False, fp32) without scalelm's trainer, on the
data ``bench_quality.py`` prepared. If this loop and ``scalelm train --preset baby`` land at the
same validation loss, the trainer loses nothing. Prints nanoGPT's 20-random-batch estimate and
the fixed validation set ``scalelm`` reports, every 250 steps.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scalelm.config import ModelConfig  # noqa: E402
from scalelm.data.loader import TokenData, eval_batches  # noqa: E402
from scalelm.model import GPT  # noqa: E402

B, T, STEPS, WARMUP, LR, MIN_LR = 12, 64, 2000, 100, 1e-3, 1e-4


def main() -> None:
    torch.manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1337)
    data = TokenData(ROOT / "runs" / "bench" / "shakespeare_char")  # made by bench_quality.py
    train = torch.from_numpy(data.tokens("train").astype(np.int64))
    val = torch.from_numpy(data.tokens("val").astype(np.int64))
    model = GPT(ModelConfig(vocab_size=data.vocab_size, block_size=T, n_layer=4, n_head=4, n_embd=128,
                            dropout=0.0, bias=False))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.99))

    def batch(split):
        ix = torch.randint(len(split) - T, (B,))
        return torch.stack([split[i:i + T] for i in ix]), torch.stack([split[i + 1:i + 1 + T] for i in ix])

    def lr_at(it):
        if it < WARMUP:
            return LR * (it + 1) / (WARMUP + 1)
        return MIN_LR + 0.5 * (1 + math.cos(math.pi * (it - WARMUP) / (STEPS - WARMUP))) * (LR - MIN_LR)

    @torch.no_grad()
    def estimate():
        model.eval()
        out = {name: float(torch.stack([model(*batch(s))[1] for _ in range(20)]).mean())
               for name, s in (("train", train), ("val", val))}
        fixed = [model(x, y)[1] for x, y in eval_batches(data.tokens("val"), B, T, 20)]
        out["val_fixed"] = float(torch.stack(fixed).mean())
        model.train()
        return out

    for it in range(STEPS + 1):
        if it % 250 == 0:
            print(json.dumps({"step": it, **estimate()}), flush=True)
        if it == STEPS:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = batch(train)
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
