"""The trainer: ONE training loop, for pretraining now and fine-tuning/distillation later.

    scalelm train --preset baby --data data/shakespeare --out runs/baby [--section.key=value ...]

Each optimizer step sets the learning rate from the schedule and takes the step
(:class:`~scalelm.train.step.TrainStep`: forward and backward over the step's micro-batches,
gradients synchronised only on the last one, clipping, AdamW). Every ``log_every`` steps a
metrics record; every ``eval_every`` a validation pass (the best model is kept in
``RUN_DIR/best``); every ``save_every``, at the end, on SIGINT/SIGTERM and when the time budget
runs out, an atomic checkpoint that resumes bit for bit.
What a batch is and how its loss is computed are arguments (``batches``, ``loss_fn``), so
other objectives reuse this loop unchanged; what each argument must offer is written down in
:mod:`scalelm.train.protocols`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import CLOCK_STEPS, Config, ConfigError
from ..distributed.mesh import (
    ParallelContext,
    all_reduce_mean_loss,
    init_parallel,
)
from ..distributed.parallelize import parallelize
from ..errors import UserError
from ..model.build import build_model
from ..model.gpt import flops_per_token
from ..precision import DTYPES, resolve_precision
from . import state as ts
from .metrics import MetricsLogger, Progress, env_summary, peak_flops, peak_memory_mb
from .model_io import ModelIO
from .optim import lr_at, set_lr
from .protocols import Batches, CountedBatches, DataDir, ReportsStats, TrainData, backbone
from .step import TrainStep, default_loss


class OutOfMemory(UserError):
    """The step did not fit in memory; the message lists what to change."""


class Diverged(UserError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- batch geometry

def batch_geometry(cfg: Config, dp_world: int) -> tuple[int, int]:
    """(micro_batch_size per rank, grad_accum_steps) so that a step is the configured global batch."""
    t, T = cfg.train, cfg.model.block_size
    B = t.micro_batch_size
    glob = t.global_batch_size
    if t.global_batch_tokens is not None:
        if t.global_batch_tokens % T:
            raise ConfigError(f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
                              f"block_size {T}; use e.g. {max(1, round(t.global_batch_tokens / T)) * T}")
        glob = t.global_batch_tokens // T
    if glob is None:
        return B, t.grad_accum_steps
    per_step = B * dp_world
    if glob % per_step:
        lo = max(1, glob // per_step) * per_step
        raise ConfigError(f"a global batch of {glob} sequences is not a multiple of micro_batch_size {B} x "
                          f"{dp_world} data-parallel ranks = {per_step}; use {lo} or {lo + per_step}, "
                          f"or another --train.micro_batch_size")
    return B, glob // per_step


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in msg for s in ("out of memory", "can't allocate memory", "not enough memory", "bad_alloc"))


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap (no per-tensor mmap) and never trim it,
    so memory a step frees is reused by the next one instead of being unmapped and faulted in
    again (on this project's CPU a third of a 6x384 batch-64 step was kernel time before).
    Leaves alone a process whose allocator the user tuned (``MALLOC_*_`` or ``GLIBC_TUNABLES``)."""
    import ctypes
    import ctypes.util
    import os

    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, ctypes.c_int(2**30)) and mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)))


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """Owns the model, optimizer, data and run directory; :meth:`fit` is the training loop."""

    def __init__(self, cfg: Config, data: TrainData, run_dir: str | Path, *, ctx: Optional[ParallelContext] = None,
                 model: Optional[nn.Module] = None, resume_from: Optional[Path] = None,
                 batches: Optional[Batches] = None, loss_fn: Callable = default_loss,
                 evaluate_fn: Optional[Callable] = None, metric: str = "val_loss", higher_is_better: bool = False,
                 model_io: Optional[ModelIO] = None, base_dir: Optional[Path] = None,
                 wrap_model_io: Optional[Callable[[ModelIO], ModelIO]] = None,
                 show_metrics: Sequence[str] = ("val_loss", "val_bits_per_byte")):
        """``batches``/``loss_fn`` define a step (default: LM windows of ``data``, a ``DataDir``, and
        next-token CE); ``evaluate_fn(trainer) -> {name: value}`` a validation pass (default: LM loss
        on ``data``'s val split), logged as ``val_<name>``; ``metric`` (one of those, prefixed) picks
        ``best/``; ``show_metrics`` are the ones the progress line prints after an evaluation (those
        the evaluation gives). ``model_io`` writes and reads the model (default: a GPT model
        directory). ``model`` may be a ``WrapsGPT`` (a module around a GPT), whose ``gpt`` is where
        LoRA and parallelism are applied. ``base_dir``: the model directory ``model``'s weights came
        from (LoRA records it and its hash). ``wrap_model_io(io) -> io`` wraps the final one (after
        LoRA's adapter files), to add files to every saved model. ``CountedBatches`` (they count the
        real and the supervised tokens they served) get both, and their rates, in each training
        record."""
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        t = cfg.train
        self.ctx = ctx or init_parallel(cfg)
        self.device = self.ctx.device
        self.is_main = self.ctx.is_main
        if data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the data's vocabulary has {data.vocab_size} tokens but the model's vocab_size is "
                              f"{cfg.model.vocab_size}: leave model.vocab_size unset (it follows the data) or "
                              f"set --model.vocab_size={data.vocab_size} or more")
        if self.device.type == "cpu" and t.keep_freed_memory:
            keep_freed_memory()
        resolve_precision(t.precision, self.device)  # a precision the device lacks: refused before any work
        self.micro_batch, self.accum = batch_geometry(cfg, self.ctx.dp_world)
        self.seq_len = cfg.model.block_size
        self.tokens_per_step = self.micro_batch * self.accum * self.ctx.dp_world * self.seq_len

        if batches is None:
            data.check_window("train", self.seq_len)
        if t.eval_every > 0 and evaluate_fn is None:
            data.check_window("val", self.seq_len)
        self.evaluate_fn, self.metric, self.higher_is_better = evaluate_fn, metric, higher_is_better
        self.show_metrics = tuple(show_metrics)
        self.model_io = model_io or ModelIO()

        torch.manual_seed(t.seed)  # the same initial weights on every rank and layout
        self.raw_model = (model or build_model(cfg.model)).to(self.device)
        self.gpt = backbone(self.raw_model)  # a task model's GPT, or the model
        if cfg.lora.r > 0:  # adapters from outside, like parallelism: only they (and a task head) train
            from ..lora import LoRAFiles, apply_lora

            if cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
                raise ConfigError("LoRA trains under data parallelism (DDP, FSDP2: --parallel.dp_shard / "
                                  "--parallel.dp_replicate); drop --parallel.tp / --parallel.pp")
            apply_lora(self.gpt, cfg.lora)
            self.model_io = LoRAFiles(self.model_io, self.raw_model, base_dir)
        if wrap_model_io is not None:
            self.model_io = wrap_model_io(self.model_io)
        if cfg.model.arch != "gpt" and (cfg.parallel.pp > 1 or cfg.parallel.tp > 1):
            what = "the encoder-decoder" if cfg.model.arch == "encoder-decoder" else "an encoder"
            raise ConfigError(f"{what} trains with data parallelism (DDP / FSDP2: --parallel.dp_shard, "
                              "--parallel.dp_replicate); tensor and pipeline parallelism are built for the GPT only")
        if self.gpt is not self.raw_model and cfg.parallel.pp > 1:
            raise ConfigError("pipeline parallelism (--parallel.pp > 1) trains a plain language model; use "
                              "data or tensor parallelism (--parallel.dp_shard / --parallel.tp) for this task")
        self.model = parallelize(self.gpt, cfg, self.ctx, root=self.raw_model)
        # precision, master weights, AdamW, clipping: the step the probes time too (scalelm.train.probe)
        self.stepper = TrainStep(cfg, self.model, raw_model=self.raw_model, ctx=self.ctx, loss_fn=loss_fn)
        self.precision, self.autocast, self.scaler = self.stepper.precision, self.stepper.autocast, self.stepper.scaler
        self.master, self.optimizer, self.loss_fn = self.stepper.master, self.stepper.optimizer, loss_fn
        if self.ctx.dp_rank:  # dropout masks differ across data-parallel ranks
            torch.manual_seed(t.seed + self.ctx.dp_rank)

        if batches is None:
            from ..data.loader import BatchLoader

            batches = BatchLoader(data.tokens("train"), self.micro_batch, self.seq_len, self.accum,
                                  dp_rank=self.ctx.dp_rank, dp_world=self.ctx.dp_world, seed=t.seed,
                                  mode=cfg.data.sampling, device=self.device)
        self.batches = batches

        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.best_val, self.best_step, self.evals_since_best = self._worst(), None, 0
        self.last_saved = self.last_eval = None
        self.history: dict[str, float] = {}
        self._signal: Optional[int] = None
        self._t_start: Optional[float] = None  # when fit() started (elapsed() counts from it)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
                                     config=cfg)
        if resume_from is not None:
            self.load_checkpoint(Path(resume_from))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _full_precision(self):
        """Inside: the model's parameters are the fp32 masters (for saving and loading checkpoints)."""
        return self.stepper.full_precision()

    # ------------------------------------------------------------------ one optimizer step
    def forward_backward(self, micro_batches: list) -> torch.Tensor:
        """Accumulate gradients over the step's micro-batches; returns their mean loss (detached)."""
        return self.stepper.forward_backward(micro_batches)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the next ``accum`` micro-batches: (mean loss, gradient norm)."""
        return self.stepper([self.batches.next_batch() for _ in range(self.accum)])

    # ------------------------------------------------------------------ evaluation
    def _worst(self) -> float:
        return -math.inf if self.higher_is_better else math.inf

    def _improves(self, value: float) -> bool:
        return value > self.best_val if self.higher_is_better else value < self.best_val

    def evaluate(self) -> dict:
        """One validation pass: ``{name: value}`` (the LM's loss, perplexity, bits/byte, tokens by default)."""
        if self.evaluate_fn is not None:
            return self.evaluate_fn(self)
        from .validation import evaluate

        return evaluate(self.model, self.data, "val", self.micro_batch, self.seq_len, self.cfg.train.eval_iters,
                        self.device, self.autocast, dp_rank=self.ctx.dp_rank, dp_world=self.ctx.dp_world)

    def run_eval(self) -> bool:
        """Evaluate, log, keep the best model; True when early stopping says stop."""
        res = {f"val_{k}": v for k, v in self.evaluate().items()}
        if self.metric not in res:
            raise ConfigError(f"the evaluation gives {sorted(res)}, not {self.metric!r} (the metric that picks best/)")
        self.last_eval = self.step
        self.metrics.log({"step": self.step, **res})
        scalars = {k: v for k, v in res.items() if isinstance(v, (int, float)) and k != "val_tokens"}
        for k, v in scalars.items():
            self.history.setdefault(f"initial_{k}", v)
        self.history.update(scalars)
        shown = [k for k in self.show_metrics if k in res]
        msg = f"step {self.step}: " + ", ".join(f"{k[4:].replace('_', ' ')} {res[k]:.4f}" for k in shown)
        value = res[self.metric]
        if self._improves(value):
            self.best_val, self.best_step, self.evals_since_best = value, self.step, 0
            self.save_best()  # step 0 too: a run none of whose evaluations beats its start still has a best/
            msg += " (best)"
        else:
            self.evals_since_best += 1
        if self.is_main:
            self.progress.write(msg)
        patience = self.cfg.train.early_stop_patience
        return patience > 0 and self.evals_since_best >= patience

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "loader": self.batches.state_dict(),
                "scheduler": {"schedule": self.cfg.optim.schedule, "step": self.step},
                "best_val_loss": None if math.isinf(self.best_val) else self.best_val, "best_step": self.best_step,
                "best_metric": self.metric, "evals_since_best": self.evals_since_best, "last_eval_step": self.last_eval, "elapsed_s": self.elapsed(),
                "history": self.history, "grad_scaler": self.scaler.state_dict() if self.scaler else None}

    def save_checkpoint(self) -> Path:
        """Single process: ``RUN_DIR/ckpt-<step>``. Sharded (DCP) saves replace this under torchrun."""
        path = self.run_dir / ts.ckpt_name(self.step)
        if self.ctx.distributed:  # every rank writes its shards (torch.distributed.checkpoint)
            from .sharded_state import save_sharded_checkpoint

            path = save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer,
                                           self.data.tokenizer_json, self.state(), self.ctx,
                                           self.cfg.checkpoint.keep_last, extra=self.model_io.metadata(self.raw_model))
        elif self.is_main:
            with self._full_precision():
                path = ts.save_checkpoint(self.run_dir, self.step, self.raw_model, self.optimizer,
                                          self.data.tokenizer_json, self.state(), self.cfg.checkpoint.keep_last,
                                          model_io=self.model_io)
        self.last_saved = self.step
        return path

    def save_best(self) -> None:
        from ..runs import BEST

        extra = {"step": self.step, **({} if math.isinf(self.best_val) else {self.metric: self.best_val})}
        # (LoRA's and the templates' files are ModelIOs in shape only: they live below train/)
        plain_lm = isinstance(self.model_io, ModelIO) and self.model_io.plain_lm and self.gpt is self.raw_model
        if self.ctx.distributed and plain_lm:  # a GPT model directory: shards (or pipeline stages) gathered by rank 0
            from ..distributed.dcp import save_full_model_dir

            save_full_model_dir(self.model, self.run_dir / BEST, self.data.tokenizer_json, extra, self.ctx)
        elif self.ctx.distributed:  # a task model under DDP/FSDP2: its full state dict, gathered on rank 0
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.is_main:
                self.model_io.save(self.raw_model, sd, self.run_dir / BEST, self.data.tokenizer_json, extra)
            self.ctx.barrier()
        elif self.is_main:
            with self._full_precision():
                self.model_io.save(self.raw_model, self.raw_model.state_dict(), self.run_dir / BEST,
                                   self.data.tokenizer_json, extra)

    def load_checkpoint(self, ckpt: Path) -> None:
        ts.check_model_config(ckpt, self.cfg.model)
        if isinstance(self.data, DataDir):
            ts.check_tokenizer(ckpt, self.data.dir)
        from ..distributed.dcp import is_sharded_checkpoint
        from .sharded_state import (
            load_full_training_checkpoint,
            load_sharded_checkpoint,
        )

        if is_sharded_checkpoint(ckpt):  # written under torchrun: loads into any layout
            with self._full_precision():  # one process with master weights: DCP fills the fp32 masters
                st = load_sharded_checkpoint(ckpt, self.model, self.optimizer, self.ctx)
        elif self.ctx.distributed:  # a single-process checkpoint, sharded onto this layout
            st = load_full_training_checkpoint(ckpt, self.model, self.optimizer, model_io=self.model_io)
        else:
            with self._full_precision():  # fills the fp32 masters, then casts them into the model
                st = ts.load_checkpoint(ckpt, self.raw_model, self.optimizer, model_io=self.model_io)
        ts.check_state(st, ckpt / ts.STATE, ("step", "tokens_seen", "loader"))  # what is read below
        if self.ctx.distributed and self.is_main:
            print(f"resumed from {ckpt} at step {st['step']} on {self.ctx.layout.describe()}", file=sys.stderr)
        o = self.cfg.optim  # hyper-parameters follow the config (a resumed run may change them)
        for g in self.optimizer.param_groups:
            g.update(betas=(o.beta1, o.beta2), eps=o.eps)
            g["weight_decay"] = o.weight_decay if g.get("name") == "decay" else 0.0
        self.batches.load_state_dict(st["loader"])
        self.step, self.tokens_seen = int(st["step"]), int(st["tokens_seen"])
        self.elapsed_before = float(st.get("elapsed_s", 0.0))
        bv = st.get("best_val_loss")
        self.best_val = self._worst() if bv is None else float(bv)
        self.best_step, self.evals_since_best = st.get("best_step"), int(st.get("evals_since_best", 0))
        self.history = dict(st.get("history") or {})
        if self.scaler and st.get("grad_scaler"):
            self.scaler.load_state_dict(st["grad_scaler"])
        self.last_saved, self.last_eval = self.step, st.get("last_eval_step")
        self.metrics.truncate_after(self.step)

    # ------------------------------------------------------------------ stopping
    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t_start if self._t_start is not None else 0.0)

    def _agree_clock(self, flag: bool) -> tuple[bool, float]:
        """(any rank's ``flag``, the largest elapsed seconds of any rank): one all-reduce, so every rank
        stops at the same step and sets the same learning rate."""
        elapsed = self.elapsed()
        if not self.ctx.distributed:
            return flag, elapsed
        t = torch.tensor([1.0 if flag else 0.0, elapsed], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item()), float(t[1].item())

    def _served(self) -> Optional[tuple[int, int]]:
        """(real, supervised) tokens served so far, for batches that count them."""
        b = self.batches
        if not isinstance(b, CountedBatches):
            return None
        return int(b.tokens), int(b.supervised_tokens)

    def schedule_steps(self, elapsed: float) -> int:
        """The step count the learning-rate schedule decays over.

        ``max_steps``, unless a ``max_minutes`` budget ends the run sooner: then the step that the
        budget will stop at, projected from the steps per second so far, so that cosine and wsd reach
        ``min_lr`` when the time runs out instead of staying near the peak of a far-off ``max_steps``."""
        t = self.cfg.train
        if t.max_minutes is None or self.step == 0 or elapsed <= 0:
            return t.max_steps
        time_frac = elapsed / (60 * t.max_minutes)
        if time_frac <= self.step / t.max_steps:
            return t.max_steps
        return max(self.step + 1, min(t.max_steps, math.ceil(self.step / time_frac)))

    @property
    def clock_governs(self) -> bool:
        """A time budget with no step limit of its own (``max_steps`` left unset: CLOCK_STEPS)."""
        t = self.cfg.train
        return t.max_minutes is not None and t.max_steps >= CLOCK_STEPS

    def budget_scaled(self, value: int, projected: int) -> int:
        """``value`` (warmup, evaluation interval), at most a tenth of the run when the clock governs:
        a 2-minute run must reach its peak learning rate and see more than a few evaluations."""
        if not self.clock_governs or projected >= CLOCK_STEPS:
            return value
        return max(1, min(value, projected // 10))

    def _eval_due(self, projected: int) -> bool:
        t = self.cfg.train
        if t.eval_every <= 0:
            return False
        if not self.clock_governs:
            return self.step % t.eval_every == 0
        return self.step - (self.last_eval or 0) >= self.budget_scaled(t.eval_every, projected)

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # a second Ctrl-C: stop now (the last checkpoint is intact)
            raise KeyboardInterrupt
        self._signal = signum
        self.progress.write(f"caught {signal.Signals(signum).name}: saving a checkpoint after this step "
                            f"(press Ctrl-C again to quit without saving)")

    @contextlib.contextmanager
    def _signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        n_params = sum(p.numel() for p in {id(p): p for p in self.raw_model.parameters()}.values())
        n_train = sum(p.numel() for p in {id(p): p for p in self.raw_model.parameters() if p.requires_grad}.values())
        fpt = flops_per_token(cfg.model, self.seq_len)
        peak = peak_flops(self.device, DTYPES[self.precision])
        peak = peak * self.ctx.world_size if peak else peak  # tokens/s is the whole job's
        budget_s = 60 * t.max_minutes if t.max_minutes is not None else None
        self.progress = Progress(None if self.clock_governs else t.max_steps, self.step,
                                 cfg.log.progress and self.is_main, budget_s=budget_s)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            mode = " weights, fp32 masters" if self.master is not None else " autocast" if self.precision != "fp32" else ""
            trainable = f" ({n_train:,} trainable)" if n_train != n_params else ""
            print(f"model: {n_params:,} parameters{trainable} | precision: {self.precision}{mode} on {self.device} | batch: "
                  f"{self.micro_batch} x {self.accum} accum x {self.ctx.dp_world} ranks x {self.seq_len} = "
                  f"{self.tokens_per_step:,} tokens/step | steps {self.step} -> "
                  f"{f'{t.max_minutes:g} minutes' if self.clock_governs else t.max_steps}", file=sys.stderr)
        if self.step >= t.max_steps and self.is_main:
            print(f"the run is complete at step {self.step}: raise --train.max_steps to continue it", file=sys.stderr)
        self._t_start = time.perf_counter()
        stop = None
        try:
            with self._signals():
                if self.step == 0 and t.eval_every > 0:
                    self._guard(self.run_eval)
                mark, excluded, tokens_mark = time.perf_counter(), 0.0, self.tokens_seen
                served_mark = self._served()
                elapsed = self._agree_clock(False)[1]  # on resume too, every rank starts from the same clock
                while self.step < t.max_steps and stop is None:
                    projected = self.schedule_steps(elapsed)
                    lr = lr_at(self.step, cfg.optim, projected, self.budget_scaled(cfg.optim.warmup_steps, projected))
                    set_lr(self.optimizer, lr)
                    loss, norm = self._guard(self.train_step)
                    self.step += 1
                    self.tokens_seen += self.tokens_per_step
                    if self.step % t.log_every == 0 or self.step == t.max_steps:
                        loss_v = float(all_reduce_mean_loss(loss, self.ctx))
                        dt = time.perf_counter() - mark - excluded
                        tps = (self.tokens_seen - tokens_mark) / dt if dt > 0 else None
                        rec = {"step": self.step, "loss": loss_v, "lr": lr, "grad_norm": float(norm),
                               "tokens": self.tokens_seen, "tokens_per_s": tps,
                               "mfu": tps * fpt / peak if tps and peak and peak == peak else None,
                               "peak_mem_mb": peak_memory_mb(self.device), "elapsed_s": self.elapsed()}
                        served = self._served()
                        if served is not None:  # padded batches: what was real, and what had a loss
                            names = ("real_tokens", "supervised_tokens")
                            rec.update(zip(names, served))
                            rec.update({f"{k}_per_s": (n - n0) / dt if dt > 0 else None
                                        for k, n, n0 in zip(names, served, served_mark)})
                            rtps = rec["real_tokens_per_s"]  # padding does no useful work: MFU counts real tokens
                            rec["mfu"] = rtps * fpt / peak if rtps and peak and peak == peak else None
                        if isinstance(self.loss_fn, ReportsStats):  # e.g. preference tuning's rewards
                            rec.update(self.loss_fn.take_stats())
                        if not math.isfinite(loss_v):
                            raise Diverged(self._diverged_msg(loss_v))
                        self.metrics.log(rec)
                        self.history["train_loss"] = loss_v
                        self.progress.update(self.step, rec)
                        mark, excluded, tokens_mark = time.perf_counter(), 0.0, self.tokens_seen
                        served_mark = served
                    t0 = time.perf_counter()
                    if self._eval_due(projected) and self._guard(self.run_eval):
                        stop = "early_stop"
                    if self.step % t.save_every == 0 and self.step < t.max_steps:
                        self.save_checkpoint()
                    excluded += time.perf_counter() - t0
                    signalled, elapsed = self._agree_clock(self._signal is not None)
                    over_time = t.max_minutes is not None and elapsed >= 60 * t.max_minutes
                    if stop is None and (signalled or over_time):
                        stop = "signal" if signalled else "time_budget"
                if stop != "signal" and t.eval_every > 0 and self.last_eval != self.step:
                    self._guard(self.run_eval)
                if self.last_saved != self.step:
                    self.save_checkpoint()
                if self.best_step is None and self.step > 0:  # no evaluation ran: best/ is the final model
                    self.save_best()
        finally:
            self.progress.close()
            self.metrics.close()
        return self.summary(stop or "max_steps", n_params, n_train)

    def _guard(self, fn):
        """Run a step or an evaluation, turning out-of-memory into advice."""
        try:
            return fn()
        except Exception as e:
            if not is_oom(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise OutOfMemory(self._oom_msg(e)) from None

    def _oom_msg(self, e: BaseException) -> str:
        B, A, t = self.micro_batch, self.accum, self.cfg.train
        tips = []
        if B > 1:
            tips.append(f"halve the micro batch and double accumulation (same global batch): "
                        f"--train.micro_batch_size={B // 2} --train.grad_accum_steps={2 * A}")
        if not t.activation_checkpointing:
            tips.append("recompute activations: --train.activation_checkpointing=true")
        if self.precision == "fp32":
            tips.append("use mixed precision: --train.precision=bf16")
        tips.append(f"shorten the context: --model.block_size={max(1, self.seq_len // 2)}")
        tips.append("estimate memory first with `scalelm plan`")
        return (f"out of memory on {self.device} with micro_batch_size={B} x block_size={self.seq_len} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'allocation failed'}). "
                f"To fit: " + "; ".join(tips))

    def _diverged_msg(self, v: float) -> str:
        last = ts.ckpt_name(self.last_saved) if self.last_saved is not None else None
        where = (f"; resume from the last good checkpoint with --resume {self.run_dir / last} and a lower "
                 f"--optim.lr" if last else "; start again with a lower --optim.lr")
        return (f"the training loss became {v} at step {self.step} (lr {self.cfg.optim.lr:g}): lower the "
                f"learning rate, keep --optim.grad_clip=1.0, prefer bf16 to fp16{where}")

    def summary(self, stopped: str, n_params: int, n_train: Optional[int] = None) -> dict:
        elapsed = self.elapsed()
        return {"run_dir": str(self.run_dir), "stopped": stopped, "step": self.step, "params": n_params,
                "trainable_params": n_params if n_train is None else n_train, "best_metric": self.metric,
                "precision": self.precision, "master_weights": self.master is not None,  # bf16 weights, fp32 masters
                "tokens": self.tokens_seen, "elapsed_s": round(elapsed, 3),
                "best_value": None if math.isinf(self.best_val) else self.best_val, "best_step": self.best_step,
                # best_val_loss is the best validation loss only where the loss picks best/
                **({"best_val_loss": None if math.isinf(self.best_val) else self.best_val}
                   if self.metric == "val_loss" else {}),
                **self.history, "checkpoint": str(self.run_dir / ts.ckpt_name(self.step)), **env_summary()}
