"""``scalelm eval RUN --memorization --data DATA_DIR``: how much of its training data a model repeats.

**Extractable memorization** (Carlini et al., "Quantifying Memorization Across Neural Language
Models", 2023): sample ``--samples`` windows of ``prefix + suffix`` tokens from the train split,
give the model the first ``prefix`` (32) tokens, decode ``suffix`` (32) tokens greedily and count
the windows whose suffix it reproduces exactly. The same measure on the val split (text the model
did not train on) is the baseline: a model that generalises continues common phrases there as well,
so memorization is the gap between the two. ``token_accuracy`` (the share of suffix tokens right at
their position) is a graded version of the same.

**Scrubbed placeholders, unprompted**: ``--unprompted`` samples of ``--max-new-tokens`` tokens drawn
(temperature 1) from the end-of-text token alone; the output counts the PII placeholders that
``prepare --scrub-pii`` writes (a model trained on scrubbed data learns to say ``<EMAIL_ADDRESS>``
where it would have said an address) and the strings that still look like PII to the scrubber.

Windows are sampled uniformly over the split's token stream (as training windows are, across
document boundaries), without replacement, with ``--seed``: the same model and data give the same
numbers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import UserError

PREFIX = SUFFIX = 32


def sample_windows(tokens: np.ndarray, samples: int, length: int, seed: int, split: str = "train") -> np.ndarray:
    """``(n, length)`` int64 windows of ``tokens`` at distinct random starts (n = min(samples, starts))."""
    starts = len(tokens) - length + 1
    if starts < 1:
        raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than one window of {length} "
                        f"(--prefix-tokens + --suffix-tokens): use shorter ones or more data")
    rng = np.random.default_rng(seed)
    at = np.sort(rng.choice(starts, size=min(samples, starts), replace=False))
    return np.stack([np.asarray(tokens[s:s + length], dtype=np.int64) for s in at])


def extraction(gen, windows: np.ndarray, prefix: int, batch_size: int) -> dict:
    """Greedy continuations of each window's first ``prefix`` tokens against its rest."""
    from ..generate.sampling import SamplingParams

    suffix = windows.shape[1] - prefix
    exact, right = 0, 0
    for lo in range(0, len(windows), batch_size):
        rows = windows[lo:lo + batch_size]
        comps = gen.generate([r[:prefix].tolist() for r in rows], suffix, sampling=SamplingParams(temperature=0.0),
                             ignore_eos=True, slide=False)
        for r, c in zip(rows, comps):
            got = np.asarray(c.tokens[:suffix], dtype=np.int64)
            want = r[prefix:]
            same = got == want[:len(got)]
            right += int(same.sum())
            exact += int(len(got) == suffix and same.all())
    n = len(windows)
    return {"samples": n, "extracted": exact, "extractable_rate": exact / n, "token_accuracy": right / (n * suffix)}


def unprompted(gen, samples: int, new_tokens: int, seed: int, batch_size: int, start: int) -> dict:
    """Sampled text from the token ``start`` (end-of-text) alone: PII placeholders and PII-like strings in it."""
    from ..data.clean.pii import KINDS, PLACEHOLDERS, scrub_counted
    from ..generate.sampling import SamplingParams

    texts, tokens = [], 0
    for lo in range(0, samples, batch_size):
        k = min(batch_size, samples - lo)
        comps = gen.generate([[start]] * k, new_tokens, sampling=SamplingParams(temperature=1.0),
                             seed=seed + lo, ignore_eos=True)
        texts += [gen.decode(c.tokens) for c in comps]
        tokens += sum(len(c.tokens) for c in comps)
    found = {kind: sum(t.count(PLACEHOLDERS[kind]) for t in texts) for kind in KINDS}
    like: dict = {kind: 0 for kind in KINDS}
    for t in texts:
        for kind, n in scrub_counted(t)[1].items():
            like[kind] += n
    return {"samples": samples, "tokens": tokens, "placeholders": {PLACEHOLDERS[k]: v for k, v in found.items()},
            "placeholders_total": sum(found.values()), "pii_like": like}


def memorization(gen, data, samples: int = 100, prefix: int = PREFIX, suffix: int = SUFFIX, seed: int = 0,
                 batch_size: int = 8, unprompted_samples: int = 20, new_tokens: int = 256,
                 splits: tuple[str, ...] = ("train", "val")) -> dict:
    """The measures above for a :class:`~scalelm.generate.Generator` and a ``TokenData``."""
    if prefix < 1 or suffix < 1:
        raise UserError(f"--prefix-tokens and --suffix-tokens must be at least 1, got {prefix} and {suffix}")
    if prefix + suffix > gen.cfg.block_size:
        raise UserError(f"--prefix-tokens {prefix} + --suffix-tokens {suffix} is more than the model's context "
                        f"of {gen.cfg.block_size} tokens")
    if samples < 1 or batch_size < 1 or unprompted_samples < 0 or new_tokens < 1:
        raise UserError("--samples, --batch-size and --max-new-tokens must be at least 1 (--unprompted at least 0)")
    out: dict = {"prefix_tokens": prefix, "suffix_tokens": suffix, "seed": seed}
    for i, split in enumerate(splits):
        windows = sample_windows(data.tokens(split), samples, prefix + suffix, seed + i, split)
        out[split] = extraction(gen, windows, prefix, batch_size)
    if "train" in out and "val" in out:
        out["gap"] = out["train"]["extractable_rate"] - out["val"]["extractable_rate"]
    result: dict = {"memorization": out}
    if unprompted_samples:
        start = gen.bos_id if gen.bos_id is not None else data.eot_id
        result["unprompted"] = unprompted(gen, unprompted_samples, new_tokens, seed, batch_size, start)
    return result


def run_memorization(args, ckpt, data_dir: Optional[str] = None) -> dict:
    """``eval --memorization``: load the model and data, check they match, measure."""
    from ..cliargs import TORCH_NAMES
    from ..data.loader import DataError, TokenData
    from ..data.tokenizer import check_same_tokenizer
    from ..generate.generator import Generator
    from ..model.io import read_tokenizer_json

    data = TokenData(data_dir or args.data)
    for split in ("train", "val"):
        if split not in data.splits:
            raise DataError(f"{data.dir} has no split '{split}': --memorization compares train with val")
    gen = Generator.from_checkpoint(ckpt, device=args.device, dtype=TORCH_NAMES.get(args.dtype, args.dtype),
                                    verify=not args.no_verify)
    if data.vocab_size > gen.cfg.vocab_size:
        raise DataError(f"{data.dir} has a vocabulary of {data.vocab_size} tokens but the model in {ckpt} knows "
                        f"only {gen.cfg.vocab_size}: use data prepared with the model's tokenizer")
    check_same_tokenizer(data.dir, read_tokenizer_json(ckpt), what=f"the checkpoint {ckpt}")
    return memorization(gen, data, samples=args.samples, prefix=args.prefix_tokens, suffix=args.suffix_tokens,
                        seed=args.seed, batch_size=args.batch_size, unprompted_samples=args.unprompted,
                        new_tokens=args.max_new_tokens)


def add_memorization_args(p) -> None:
    g = p.add_argument_group("--memorization (with --data DATA_DIR; --max-new-tokens: each unprompted sample's length)")
    g.add_argument("--memorization", action="store_true",
                   help="extractable memorization: the share of train windows whose next --suffix-tokens the model "
                        "reproduces greedily from --prefix-tokens, beside val's; and PII placeholders it says "
                        "unprompted")
    g.add_argument("--samples", type=int, default=100, metavar="N", help="windows sampled per split (100)")
    g.add_argument("--prefix-tokens", type=int, default=PREFIX, metavar="N",
                   help=f"tokens given to the model ({PREFIX})")
    g.add_argument("--suffix-tokens", type=int, default=SUFFIX, metavar="N",
                   help=f"tokens it must reproduce exactly ({SUFFIX})")
    g.add_argument("--unprompted", type=int, default=20, metavar="N",
                   help="samples generated from end-of-text alone (20; 0: none)")
    g.add_argument("--seed", type=int, default=0, help="seed of the windows and the unprompted samples (0)")
