"""``scalelm eval MODEL --task preference --data PAIRS [--ref-model MODEL_DIR|none]``: pairwise accuracy.

The share of pairs the model prefers the chosen reply in, and the mean margin, for any language
model: with a reference, the implicit reward of DPO (the chosen reply's log-probability gain over the
reference, less the rejected one's: ``(pc - rc) - (pr - rr)``); without one, the average
log-probability per reply token (``pc/nc - pr/nr``, SimPO's reward). A DPO model's reference is the
base recorded in its ``config.json`` (``--ref-model none`` scores it reference-free). Pairs are
rendered with the model's own chat template (plain text without one) and cut to its context as in
training.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--task preference")
    g.add_argument("--ref-model", metavar="MODEL_DIR", help="the reference of the implicit reward (default: a DPO "
                   "model's recorded base; none: the average log-probability, reference-free)")


def _score(model, pairs, batch_size, device, autocast):
    from .objective import reference_logps

    return reference_logps(model, pairs, batch_size, device, autocast)  # (n, 2): chosen, rejected


def _grown(ref, ref_dir, gen, ckpt):
    """The reference as the run had it: the base with the tokens the run added (its chat template's) at
    the mean of the old rows. Refused unless the model's tokenizer extends the reference's."""
    import dataclasses

    from ...errors import UserError
    from ...model.gpt import GPT
    from ...model.io import load_state_dict_into, model_state_dict, read_tokenizer_json
    from ..sft.vocab import grow_vocab
    from tokenizers import Tokenizer

    old = Tokenizer.from_str(read_tokenizer_json(ref_dir)).get_vocab(with_added_tokens=True)
    new = gen.tokenizer.get_vocab(with_added_tokens=True)
    if any(new.get(t) != i for t, i in old.items()):
        raise UserError(f"the reference {ref_dir} has another tokenizer than {ckpt} (not one the run extended): give "
                        f"the model's own base as --ref-model")
    added = sorted(i for t, i in new.items() if t not in old)
    cfg = dataclasses.replace(ref.cfg, vocab_size=gen.cfg.vocab_size)
    grown = GPT(cfg).to(next(ref.parameters()).device)
    load_state_dict_into(grown, grow_vocab(model_state_dict(ref), ref.cfg, cfg.vocab_size, added, len(old)),
                         source=f"{ref_dir} (vocabulary grown to {cfg.vocab_size})")
    return grown.eval()


def run_eval_preference(args: argparse.Namespace) -> int:
    import numpy as np

    from ...checkpoint.model_dir import read_config
    from ...data.chat_template import ChatTemplate
    from ...errors import UserError
    from ...fileio import json_safe
    from ...generate.chat import checkpoint_template
    from ...generate.generator import Generator
    from ...model.io import load_model_dir
    from ...precision import autocast_context, pick_device, resolve_precision
    from ...runs import resolve_checkpoint
    from ..sft.encode import Encoder
    from ..sft.template import PLAIN
    from .encode import encode_pairs
    from .pairs import read_pairs

    if not args.data:
        raise UserError("--task preference scores pairs: --data FILE (prompt/chosen/rejected JSONL, chat pairs or "
                        "HH dialogues)")
    ckpt = resolve_checkpoint(args.model)
    task = read_config(ckpt).get("task")
    task = task if isinstance(task, dict) else {}
    ref_spec = args.ref_model if args.ref_model is not None else task.get("reference")
    if ref_spec in ("none", ""):
        ref_spec = None
    pairs = read_pairs(args.data)
    if args.limit is not None:
        pairs = pairs[:max(1, int(args.limit * len(pairs)) if args.limit < 1 else int(args.limit))]
    device = pick_device(args.device)
    gen = Generator.from_checkpoint(ckpt, device=str(device), verify=not args.no_verify)
    if gen.tokenizer is None:
        raise UserError(f"{ckpt} has no tokenizer.json: --task preference needs the model's tokenizer")
    template = checkpoint_template(gen, ckpt) or \
        ChatTemplate(PLAIN, eos_token=gen.decode([min(gen.eos_ids)]) if gen.eos_ids else "", name="plain")
    encoded, rep = encode_pairs(Encoder(gen.tokenizer, template, gen.cfg.block_size), pairs)
    if not encoded:
        raise UserError(f"no pair of {args.data} has a reply token within the model's context of "
                        f"{gen.cfg.block_size} tokens")
    autocast = autocast_context(resolve_precision(args.dtype, device), device)
    print(f"scoring {len(encoded)} pairs of {args.data} with {ckpt}"
          f"{f' against {ref_spec}' if ref_spec else ' (reference-free)'} on {device}", file=sys.stderr)
    model = load_model_dir(ckpt, device=device, verify=False)
    pol = _score(model, encoded, args.batch_size, device, autocast)
    n = np.array([[p.chosen.n_supervised, p.rejected.n_supervised] for p in encoded], dtype=np.float64)
    res = {"pairs": len(encoded), "dropped_pairs": len(rep.dropped), "truncated_pairs": rep.truncated}
    if ref_spec:
        from ..base import hub_base_dir

        ref_dir = hub_base_dir(ref_spec)[0] if ref_spec.startswith("hf:") else resolve_checkpoint(ref_spec)
        ref_model = load_model_dir(ref_dir, device=device, verify=False)
        if ref_model.cfg.vocab_size < gen.cfg.vocab_size:  # a base whose vocabulary the run grew (template tokens)
            ref_model = _grown(ref_model, ref_dir, gen, ckpt)
        ref = _score(ref_model, encoded, args.batch_size, device, autocast)
        margin = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
        res.update(reward="log-probability gain over the reference (DPO)", reference=str(ref_dir),
                   kl_chosen=float((pol[:, 0] - ref[:, 0]).mean()), kl_rejected=float((pol[:, 1] - ref[:, 1]).mean()))
    else:
        margin = pol[:, 0] / n[:, 0] - pol[:, 1] / n[:, 1]
        res.update(reward="average log-probability per reply token (reference-free)", reference=None)
    res.update(accuracy=float((margin > 0).mean()), mean_margin=float(margin.mean()),
               logps_chosen=float(pol[:, 0].mean()), logps_rejected=float(pol[:, 1].mean()),
               chosen_tokens=float(n[:, 0].mean()), rejected_tokens=float(n[:, 1].mean()))
    print(json.dumps(json_safe(res), allow_nan=False))
    return 0
