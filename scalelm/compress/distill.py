"""``scalelm distill``: train a student on a teacher's next-token distributions (knowledge distillation).

    scalelm distill --teacher MODEL_DIR (--student MODEL_DIR | --preset NAME | --model.KEY=V ...) \\
        --data DATA_DIR --out RUN_DIR [--kd.loss forward_kl|reverse_kl|jsd] [--kd.temperature T] \\
        [--kd.alpha A] [--kd.hidden W]

The loss of a batch is ``alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE(student)``
(Hinton et al. 2015: both distributions softened by temperature T, the T^2 keeps the gradient scale),
with D the forward KL (mean-seeking, the classic choice), the reverse KL (mode-seeking, MiniLLM) or
the Jensen-Shannon divergence (symmetric, bounded), averaged over tokens. ``kd.hidden > 0`` adds
``hidden * MSE(P h_student, h_teacher)`` on the final (normalised) hidden states, through a learned
projection P (identity-initialised when the widths match) that trains and checkpoints with the
student; ``best/`` and every checkpoint stay plain model directories of the student.

It runs through the one ``Trainer`` with a ``loss_fn``: resume, the time budget, DDP/FSDP2 and
every other training option work as for ``scalelm train``. The teacher lives in the loss closure,
outside every module the trainer sees (so it is in no state dict, optimizer or checkpoint), in
eval mode without gradients, and in bf16 when the run trains in bf16 (the default where the
hardware has it). Without ``--student`` or ``--preset`` the student starts from the teacher's
architecture with the ``--model.*`` overrides applied (``--model.n_layer=3``: a half-depth student).
A pruned model (``scalelm prune``) is a student as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataclasses import dataclass

from ..checkpoint.names import DISTILL_RECORD, KD_PROJECTION
from ..config import ConfigError, KDConfig
from ..errors import UserError
from ..model.gpt import GPT
from ..model.loss import IGNORE_INDEX, cross_entropy
from ..train.model_io import ModelIO
from ..train.recipe import Plan, Recipe, resolve_run_config, run_recipe

RECORD = DISTILL_RECORD  # RUN_DIR/distill.json: the teacher, so a resume needs no --teacher
PROJECTION = KD_PROJECTION  # in training checkpoints only (kd.hidden > 0)
CHUNK_BYTES = {"cpu": 32 * 2**20}  # fp32 logits per divergence chunk (its softmaxes are recomputed in backward)
DEFAULT_CHUNK_BYTES = 512 * 2**20


# ----------------------------------------------------------------------------- the losses

def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
               temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence between the softened distributions of (rows, V) logits, in fp32."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":  # KL(teacher || student)
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl":  # KL(student || teacher)
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":  # (KL(t || m) + KL(s || m)) / 2, m the mixture
        m = torch.logaddexp(s, t) - math.log(2.0)
        return 0.5 * ((t.exp() * (t - m)).sum(-1) + (s.exp() * (s - m)).sum(-1))
    raise ConfigError(f"kd.loss must be forward_kl, reverse_kl or jsd, got {kind!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            kind: str = "forward_kl", temperature: float = 1.0) -> torch.Tensor:
    """Mean divergence over the tokens whose target counts, a few rows at a time: each chunk's
    softmaxes are recomputed in the backward instead of kept (memory: the logits, not 5 copies)."""
    V = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    valid = (targets.reshape(-1) != IGNORE_INDEX).float()
    rows = max(1, CHUNK_BYTES.get(s.device.type, DEFAULT_CHUNK_BYTES) // (4 * V))
    total = torch.zeros((), device=s.device)
    for i in range(0, s.shape[0], rows):
        sl = slice(i, i + rows)
        if s.requires_grad and s.shape[0] > rows:
            d = torch.utils.checkpoint.checkpoint(divergence, s[sl], t[sl], kind, temperature, use_reentrant=False)
        else:
            d = divergence(s[sl], t[sl], kind, temperature)
        total = total + (d * valid[sl]).sum()
    return total / valid.sum()


class KDStudent(nn.Module):
    """The student with the hidden-state projection (``kd.hidden > 0``): the trainer's model.

    ``forward(x, y)`` is the plain LM (validation); ``forward(x, with_hidden=True)`` returns the
    logits and the projected final hidden states, so DDP sees every parameter used."""

    def __init__(self, gpt: GPT, teacher_width: int):
        super().__init__()
        self.gpt, self.cfg = gpt, gpt.cfg
        self.proj = nn.Linear(gpt.cfg.n_embd, teacher_width, bias=False)
        if teacher_width == gpt.cfg.n_embd:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(teacher_width))

    def forward(self, idx, targets=None, *, with_hidden: bool = False):
        if not with_hidden:
            return self.gpt(idx, targets)
        h = self.gpt.hidden_states(idx)
        return self.gpt.head_logits(h), self.proj(h)  # (soft-capped where the model caps its logits)


class KDStudentFiles(ModelIO):
    """Checkpoints of a :class:`KDStudent`: the student's model directory plus the projection
    (``kd_projection.safetensors``, training checkpoints only: ``best/`` is the plain student)."""

    def save(self, model, state_dict, out_dir, tokenizer_json, extra, manifest=True) -> None:
        from safetensors.torch import save_file

        from ..model.io import save_state_dir

        gpt = {k[len("gpt."):]: v for k, v in state_dict.items() if k.startswith("gpt.")}
        save_state_dir(model.gpt.cfg, gpt, out_dir, tokenizer_json, extra={**self.metadata(model), **extra},
                       manifest=manifest)
        if not manifest:  # a checkpoint being staged (its manifest is written after): add the projection
            proj = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("gpt.")}
            save_file(proj, str(Path(out_dir) / PROJECTION), metadata={"format": "pt"})

    def weights(self, ckpt) -> dict[str, torch.Tensor]:
        from ..model.io import load_weights

        p = Path(ckpt) / PROJECTION
        if not p.is_file():
            raise UserError(f"{ckpt} has no {PROJECTION}: it was not written by a distillation with kd.hidden > 0; "
                            f"resume with the run's own settings (--kd.hidden=0 if it had none)")
        return {**{f"gpt.{k}": v for k, v in super().weights(ckpt).items()}, **load_weights(p)}

    def load(self, model, ckpt) -> None:
        from ..model.io import load_state_dict_into

        w = self.weights(ckpt)
        load_state_dict_into(model.gpt, {k[4:]: v for k, v in w.items() if k.startswith("gpt.")}, source=str(ckpt))
        model.proj.load_state_dict({k[len("proj."):]: v for k, v in w.items() if k.startswith("proj.")})


class DistillLoss:
    """``loss_fn(model, (x, y))`` for the Trainer. The teacher is a plain attribute of this
    object, not a submodule of anything the trainer owns: no state dict, optimizer or checkpoint
    holds it, and no gradient reaches it."""

    def __init__(self, teacher: GPT, kd: KDConfig):
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd = kd

    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            h = self.teacher.hidden_states(x)
            return self.teacher.head_logits(h), h

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        kd = self.kd
        if kd.hidden > 0:
            logits, hidden = model(x, with_hidden=True)
        else:
            logits, hidden = model(x)[0], None
        loss = torch.zeros((), device=logits.device)
        if kd.alpha < 1:
            loss = loss + (1 - kd.alpha) * cross_entropy(logits, y)
        if kd.alpha > 0 or hidden is not None:
            t_logits, t_hidden = self.teacher_outputs(x)
            if kd.alpha > 0:
                loss = loss + kd.alpha * kd.temperature ** 2 * kd_loss(logits, t_logits, y, kd.loss, kd.temperature)
            if hidden is not None:
                valid = (y != IGNORE_INDEX).float()
                mse = F.mse_loss(hidden.float(), t_hidden.float(), reduction="none").mean(-1)
                loss = loss + kd.hidden * (mse * valid).sum() / valid.sum()
        return loss


# ----------------------------------------------------------------------------- checks

def check_kd(kd: KDConfig) -> None:
    if not kd.temperature > 0:
        raise ConfigError(f"kd.temperature must be positive, got {kd.temperature} (e.g. --kd.temperature=2)")
    if not 0 <= kd.alpha <= 1:
        raise ConfigError(f"kd.alpha must be in [0, 1] (the weight of the distillation term), got {kd.alpha}")
    if not kd.hidden >= 0:
        raise ConfigError(f"kd.hidden must be zero (off) or positive, got {kd.hidden}")


def _tokenizer_desc(where: str, tok_json: Optional[str]) -> tuple[str, Optional[int]]:
    from ..data.tokenizer import tokenizer_sha256, vocab_size_of

    if tok_json is None:
        return f"{where} (no tokenizer.json)", None
    try:
        from tokenizers import Tokenizer

        n = vocab_size_of(Tokenizer.from_str(tok_json))
    except Exception:
        n = None
    return f"{where} ({n if n is not None else '?'} tokens, sha256 {tokenizer_sha256(tok_json)[:12]})", n


def _same_json(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return json.loads(a) == json.loads(b)  # formatting differences do not matter
    except json.JSONDecodeError:
        return False


def check_shared_tokenizer(teacher_where: str, teacher_tok: Optional[str], teacher_vocab: int,
                           student_where: str, student_tok: Optional[str], student_vocab: int) -> None:
    """Teacher and student must share a tokenizer (and a vocabulary): else a UserError naming both."""
    t_desc, _ = _tokenizer_desc(teacher_where, teacher_tok)
    s_desc, _ = _tokenizer_desc(student_where, student_tok)
    differ = teacher_tok is not None and student_tok is not None and not _same_json(teacher_tok, student_tok)
    if differ or teacher_vocab != student_vocab:
        raise UserError(
            f"the teacher and the student do not share a tokenizer: teacher {t_desc}, model vocab_size "
            f"{teacher_vocab}; student {s_desc}, model vocab_size {student_vocab}. Distillation matches their "
            f"next-token distributions id by id, so both must use the same tokenizer and vocabulary: use a "
            f"student trained with the teacher's tokenizer, or start one from scratch (--preset NAME or "
            f"--model.* overrides) on data prepared with `scalelm prepare ... --tokenizer TEACHER_DIR`")


def read_record(run_dir: Path) -> Optional[dict]:
    p = Path(run_dir) / RECORD
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is corrupt ({e}): pass --teacher MODEL_DIR (the run's teacher) to rewrite it") from None


def load_teacher(path: Path, device: torch.device, precision: str) -> GPT:
    """The teacher on ``device``, frozen, in bf16 when the run is (its matmuls then need no casts)."""
    from ..model.io import load_model_dir

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return load_model_dir(path, device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- CLI

def add_distill_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="the teacher: a model directory or RUN_DIR (default: the run's, on resume)")
    p.add_argument("--student", help="start the student from this model directory (e.g. a pruned model)")
    p.add_argument("--preset", help="a new student of this preset (see `scalelm presets`)")
    p.add_argument("--config", help="a TOML config file (same keys as the dotted overrides)")
    p.add_argument("--data", help="a DATA_DIR prepared with the teacher's tokenizer")
    p.add_argument("--out", required=True, help="the run directory (checkpoints, metrics.jsonl, best/)")
    p.add_argument("--resume", help="resume from this checkpoint or RUN_DIR instead of --out's latest")
    p.epilog = ("Any config field is an override: --kd.loss=jsd --kd.temperature=2 --kd.alpha=0.5 "
                "--train.max_steps=2000 --model.n_layer=3 ...")
    p.set_defaults(accepts_overrides=True)


@dataclass
class DistillPlan(Plan):
    teacher_dir: Optional[Path] = None
    teacher_cfg: object = None
    student_dir: Optional[Path] = None
    teacher: Optional[GPT] = None  # loaded when the run opens, on its device


class DistillRecipe(Recipe):
    command = "distill"

    def prepare(self, args, out: Path, saved) -> DistillPlan:
        from ..checkpoint.kinds import FLOAT_LANGUAGE_MODELS, LANGUAGE_MODELS, require_kind
        from ..data.loader import TokenData
        from ..data.tokenizer import check_same_tokenizer
        from ..model.io import read_model_config, read_tokenizer_json
        from ..runs import resolve_checkpoint
        from ..train import state as ts

        record = read_record(out) if saved is not None else None
        teacher_arg = args.teacher or (record or {}).get("teacher")
        if not teacher_arg:
            raise UserError("no teacher: pass --teacher MODEL_DIR (a model directory or a RUN_DIR)")
        if args.student and args.preset:
            raise UserError("--student starts from a model directory, --preset from a new model of that shape: "
                            "give one")
        teacher_dir = resolve_checkpoint(teacher_arg)
        require_kind(teacher_dir, "scalelm distill --teacher", LANGUAGE_MODELS)
        if record and args.teacher and Path(record.get("teacher", "")) != teacher_dir.resolve():
            print(f"warning: {out} was distilled from {record.get('teacher')}; continuing from {teacher_dir}",
                  file=sys.stderr)
        teacher_cfg = read_model_config(teacher_dir)
        student_dir = resolve_checkpoint(args.student) if args.student else None
        if student_dir is not None:
            require_kind(student_dir, "scalelm distill --student", FLOAT_LANGUAGE_MODELS)
        student_cfg = read_model_config(student_dir) if student_dir is not None else None
        # the student starts from --student's shape, or the teacher's with the --model.* overrides applied
        cfg = resolve_run_config(args, saved, preset=args.preset,
                                 model=None if args.preset else copy.deepcopy(student_cfg or teacher_cfg),
                                 vocab_size=teacher_cfg.vocab_size, check_vocab=False)
        if args.data:
            cfg.data.path = args.data
        if not cfg.data.path:
            raise UserError("no training data: pass --data DATA_DIR (prepared with the teacher's tokenizer)")
        cfg.validate()
        check_kd(cfg.kd)
        for who, c in (("teacher", teacher_cfg), ("student", cfg.model)):
            arch = getattr(c, "arch", "gpt")
            if arch != "gpt":
                raise ConfigError(f"distillation here is between decoder-only language models: the {who} is {arch}")
        if cfg.lora.r > 0:
            raise ConfigError("distillation trains the whole student: --lora.r is not supported by `scalelm distill` "
                              "(distill into a smaller student, e.g. a pruned one, instead)")
        if student_dir is not None:  # its weights start the run: its shape is the run's
            ts.check_model_config(student_dir, cfg.model)
        data = TokenData(cfg.data.path)
        teacher_tok = read_tokenizer_json(teacher_dir)
        student_where, student_tok = ((f"{student_dir}", read_tokenizer_json(student_dir)) if student_dir is not None
                                      else (f"the data {data.dir}", data.tokenizer_json))
        check_shared_tokenizer(f"{teacher_dir}", teacher_tok, teacher_cfg.vocab_size, student_where, student_tok,
                               cfg.model.vocab_size)
        check_same_tokenizer(data.dir, teacher_tok, what=f"the teacher {teacher_dir}")
        if cfg.model.block_size > teacher_cfg.block_size:
            raise UserError(f"the student's block_size {cfg.model.block_size} exceeds the teacher's "
                            f"{teacher_cfg.block_size}: the teacher cannot score windows that long; set "
                            f"--model.block_size={teacher_cfg.block_size} or less")
        return DistillPlan(cfg, data, files={RECORD: json.dumps({
            "teacher": str(teacher_dir.resolve()), "teacher_params": _n_params(teacher_cfg),
            "student_init": str(student_dir.resolve()) if student_dir is not None else
            (record or {}).get("student_init"),
            "teacher_dtype": "torch.bfloat16" if _precision(cfg) == "bf16" else "torch.float32",
        }, indent=2) + "\n"}, teacher_dir=teacher_dir, teacher_cfg=teacher_cfg, student_dir=student_dir)

    def build_model(self, plan: DistillPlan, ctx, resume_from):
        from ..model.io import load_model_dir

        plan.teacher = load_teacher(plan.teacher_dir, ctx.device, _precision(plan.cfg, ctx.device))
        model = None
        if plan.student_dir is not None and resume_from is None:
            model = load_model_dir(plan.student_dir, allow_quantized=False)
        if plan.cfg.kd.hidden > 0:
            if model is None:
                torch.manual_seed(plan.cfg.train.seed)  # the initial weights a plain run would have
                model = GPT(plan.cfg.model)
            model = KDStudent(model, plan.teacher_cfg.n_embd)
        return model, None

    def loss_fn(self, plan: DistillPlan):
        return DistillLoss(plan.teacher, plan.cfg.kd)

    def model_io(self, plan: DistillPlan):
        return KDStudentFiles() if plan.cfg.kd.hidden > 0 else None

    def summary(self, plan: DistillPlan, trainer, batches, summary: dict) -> dict:
        return {"teacher": str(plan.teacher_dir)}


def _precision(cfg, device=None) -> str:
    from ..precision import pick_device, resolve_precision

    return resolve_precision(cfg.train.precision, device or pick_device(cfg.train.device))


def _n_params(model_cfg) -> int:
    """The teacher's parameter count, from its config (a tied head counts once, as ``num_params``)."""
    with torch.device("meta"):
        return GPT(model_cfg).num_params()


def run_distill(args: argparse.Namespace) -> int:
    return run_recipe(DistillRecipe(), args)
