"""Planning a scaling sweep: a one-parameter model family and a grid of runs that fits a budget.

The family fixes the shape so that size is the only thing that varies: width ``d`` is a
multiple of ``head_dim`` (32 by default) and depth is ``round(d / aspect)`` but at least 2
(aspect 32 by default, so 32 and 64 wide have 2 layers, 128 has 4, 256 has 8). Kaplan et al.
(2020, section 3.1) found loss depends only weakly on the aspect ratio at fixed N; 32 is
nanoGPT's CPU "baby" shape (128 wide, 4 layers). Two layers at least, because one-layer models
cannot form induction heads and scale differently (``scalelm.train.scaling``: ``--preset auto``
searches the same family). N is the non-embedding parameter count
(Kaplan's convention); FLOPs are exact (``scalelm.model.flops_per_token``: 6N + attention +
LM head) so C = flops_per_token * D.

The grid has two parts (Hoffmann et al. 2022): IsoFLOP profiles (approach 2): ``levels``
compute levels ``level_ratio`` apart, each with ``per_level`` sizes spread around the size
that would see ~20 tokens per parameter; and a fixed-size grid (approach 3 data): a few sizes
each trained to several lengths. Together they fit the budget.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

from ...config import ConfigError, ModelConfig
from ...errors import UserError
from ...model.gpt import flops_per_token
from ...train.scaling import ASPECT, HEAD_DIM, family_config, kaplan_lr  # shared with --preset auto


class PlanError(UserError):
    """A sweep that cannot be planned as asked (budget too small, bad size list, ...)."""


# ----------------------------------------------------------------------------- numbers

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str, what: str = "count") -> float:
    """``"50k"``, ``"1.5M"``, ``"2e6"``, ``"3B"`` -> float."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", str(text), re.I)
    if not m:
        raise PlanError(f"cannot read {what} {text!r}: use a number like 50k, 1.5M, 2e6")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def human(x: float, digits: int = 3) -> str:
    for s, v in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.{digits}g}{s}"
    return f"{x:.{digits}g}"


# ----------------------------------------------------------------------------- the family

@dataclass(frozen=True)
class Member:
    width: int
    n_layer: int
    n_head: int
    params: int  # non-embedding (Kaplan's N)
    params_total: int  # with the token/position embeddings (a tied head counts once)
    flops_per_token: int  # training FLOPs per token at the sweep's sequence length

    @property
    def shape(self) -> str:
        return f"{self.n_layer}x{self.width}"


@lru_cache(maxsize=4096)
def _block_params(cfg_items: tuple) -> tuple[int, int]:
    """(one block, final norm) parameter counts, from modules built on the meta device."""
    import torch

    from ...model.gpt import Block, make_norm

    cfg = ModelConfig(**dict(cfg_items))
    with torch.device("meta"):
        return (sum(p.numel() for p in Block(cfg).parameters()),
                sum(p.numel() for p in make_norm(cfg).parameters()))


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(non-embedding, total) parameters, as ``GPT.num_params`` counts them, without building a GPT."""
    block, norm = _block_params(tuple(sorted(dataclasses.asdict(dataclasses.replace(cfg, n_layer=1)).items())))
    emb = cfg.vocab_size * cfg.n_embd + (cfg.block_size * cfg.n_embd if cfg.pos_embedding == "learned" else 0)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd  # an untied head is not an embedding
    non_emb = (cfg.n_shared_blocks or cfg.n_layer) * block + norm + head
    return non_emb, non_emb + emb


class Family:
    """Models sharing every setting of ``base`` but width, depth and heads."""

    def __init__(self, base: ModelConfig, aspect: float = ASPECT, head_dim: int = HEAD_DIM, max_width: int = 4096):
        if head_dim <= 0 or aspect <= 0:
            raise PlanError("--head-dim and --aspect must be positive")
        self.base, self.aspect, self.head_dim, self.max_width = base, float(aspect), int(head_dim), max_width

    def to_dict(self) -> dict:
        return {"aspect": self.aspect, "head_dim": self.head_dim, "max_width": self.max_width,
                "base": dataclasses.asdict(self.base)}

    @classmethod
    def from_dict(cls, d: dict) -> "Family":
        return cls(ModelConfig(**d["base"]), d["aspect"], d["head_dim"], d.get("max_width", 4096))

    def config(self, width: int, n_layer: Optional[int] = None) -> ModelConfig:
        if width % self.head_dim:
            raise PlanError(f"width {width} is not a multiple of the head dimension {self.head_dim}")
        cfg = family_config(self.base, width, n_layer, self.aspect, self.head_dim)
        try:
            cfg.validate()
        except ConfigError as e:
            raise PlanError(f"family member {n_layer}x{width}: {e}") from None
        return cfg

    def member(self, width: int, n_layer: Optional[int] = None) -> Member:
        cfg = self.config(width, n_layer)
        params, total = count_params(cfg)
        return Member(width, cfg.n_layer, cfg.n_head, params, total, flops_per_token(cfg, cfg.block_size))

    def members(self, max_width: Optional[int] = None) -> list[Member]:
        top = max_width or self.max_width
        return [self.member(w) for w in range(self.head_dim, top + 1, self.head_dim)]

    def nearest(self, n_params: float) -> Member:
        return min(self.members(), key=lambda m: abs(math.log(m.params / n_params)))

    def parse_size(self, item: str) -> Member:
        """``128`` (a width), ``4x128`` (layers x width) or ``300k`` / ``1.5M`` (nearest N)."""
        s = item.strip().lower()
        if re.fullmatch(r"\d+x\d+", s):
            layers, width = map(int, s.split("x"))
            return self.member(width, layers)
        if re.fullmatch(r"\d+", s):
            return self.member(int(s))
        return self.nearest(parse_count(s, "model size"))


# ----------------------------------------------------------------------------- runs

@dataclass
class RunSpec:
    name: str
    width: int
    n_layer: int
    n_head: int
    params: int
    params_total: int
    flops_per_token: int
    steps: int
    tokens: int
    flops: float
    groups: list[str] = field(default_factory=list)  # "iso0".."isoK", "fixed", "grid"
    lr: Optional[float] = None
    warmup: int = 0
    est_seconds: Optional[float] = None

    @classmethod
    def make(cls, m: Member, steps: int, tokens_per_step: int, group: str) -> "RunSpec":
        tokens = steps * tokens_per_step
        return cls(name=f"w{m.width}-l{m.n_layer}-s{steps}", width=m.width, n_layer=m.n_layer, n_head=m.n_head,
                   params=m.params, params_total=m.params_total, flops_per_token=m.flops_per_token,
                   steps=steps, tokens=tokens, flops=float(m.flops_per_token) * tokens, groups=[group])

    @property
    def member(self) -> Member:
        return Member(self.width, self.n_layer, self.n_head, self.params, self.params_total, self.flops_per_token)


@dataclass
class GridSettings:
    levels: int = 3
    per_level: int = 4
    level_ratio: float = 3.0
    spread: float = 2.0  # N ratio between neighbouring sizes of a level
    center_tokens_per_param: float = 20.0  # Chinchilla's rule, the middle of each IsoFLOP profile
    iso_fraction: float = 0.75  # the rest goes to the fixed-size grid
    fixed_sizes: int = 3
    fixed_lengths: int = 3
    length_ratio: float = 2.0
    min_steps: int = 20


def _merge(runs: list[RunSpec]) -> list[RunSpec]:
    """One run per (shape, steps): a run in two groups is trained once and counted in both."""
    out: dict[str, RunSpec] = {}
    for r in runs:
        if r.name in out:
            out[r.name].groups += [g for g in r.groups if g not in out[r.name].groups]
        else:
            out[r.name] = r
    return list(out.values())


def _pick_around(members: list[Member], center: Member, count: int, spread: float) -> list[Member]:
    """``count`` distinct members near log-spaced targets around ``center`` (by N)."""
    targets = [center.params * spread ** (j - (count - 1) / 2) for j in range(count)]
    chosen: list[Member] = []
    for t in targets:
        free = [m for m in members if m not in chosen]
        if free:
            chosen.append(min(free, key=lambda m: abs(math.log(m.params / t))))
    return sorted(chosen, key=lambda m: m.params)


def isoflop_runs(candidates: list[Member], levels: Sequence[float], tokens_per_step: int, g: GridSettings,
                 all_sizes: bool = False) -> list[RunSpec]:
    runs = []
    for i, c in enumerate(levels):
        fits = [m for m in candidates if round(c / (m.flops_per_token * tokens_per_step)) >= g.min_steps]
        if not fits:
            continue
        if all_sizes:
            chosen = fits
        else:
            center = min(fits, key=lambda m: abs(math.log(c / m.flops_per_token / m.params / g.center_tokens_per_param)))
            chosen = _pick_around(fits, center, g.per_level, g.spread)
        for m in chosen:
            steps = round(c / (m.flops_per_token * tokens_per_step))
            runs.append(RunSpec.make(m, steps, tokens_per_step, f"iso{i}"))
    return runs


def check_token_counts(token_counts: Sequence[float], tokens_per_step: int, min_steps: int) -> None:
    """Refuse explicit ``--tokens`` shorter than ``min_steps`` steps (they would be stretched silently)."""
    smallest = min_steps * tokens_per_step
    short = [d for d in token_counts if round(d / tokens_per_step) < min_steps]
    if short:
        raise PlanError(f"--tokens {human(min(short))} is {round(min(short) / tokens_per_step)} steps of "
                        f"{tokens_per_step:,} tokens, fewer than --min-steps {min_steps}: the smallest token "
                        f"count that works is {human(smallest)} ({smallest:,}); raise --tokens, or lower "
                        f"--min-steps, --train.micro_batch_size or --model.block_size")


def fixed_runs(sizes: list[Member], token_counts: Sequence[float], tokens_per_step: int, min_steps: int,
               group: str = "fixed") -> list[RunSpec]:
    runs = []
    for m in sizes:
        for d in token_counts:
            steps = max(min_steps, round(d / tokens_per_step))
            runs.append(RunSpec.make(m, steps, tokens_per_step, group))
    return runs


def auto_grid(family: Family, budget: float, tokens_per_step: int, g: GridSettings,
              sizes: Optional[list[Member]] = None, tokens: Optional[list[float]] = None) -> list[RunSpec]:
    """IsoFLOP levels plus a fixed-size grid whose total FLOPs come close to ``budget``."""
    candidates = sizes or family.members()
    r = g.level_ratio
    fixed_budget = (1 - g.iso_fraction) * budget if g.fixed_sizes and (g.fixed_lengths or tokens) else 0.0
    iso_budget = budget - fixed_budget
    per = len(candidates) if sizes else g.per_level
    # levels c0 * r^i, each costing ~per * c: sum = per * c0 * (r^K - 1)/(r - 1)
    c0 = iso_budget / (per * sum(r ** i for i in range(g.levels)))
    levels = [c0 * r ** i for i in range(g.levels)]
    iso = isoflop_runs(candidates, levels, tokens_per_step, g, all_sizes=sizes is not None)
    if not iso:
        small = min(candidates, key=lambda m: m.flops_per_token)
        need = small.flops_per_token * tokens_per_step * g.min_steps * per * sum(r ** i for i in range(g.levels))
        raise PlanError(f"a budget of {budget:.3g} FLOPs is too small for IsoFLOP profiles: the smallest "
                        f"model ({small.shape}) needs {g.min_steps} steps per run; give at least "
                        f"~{need / max(g.iso_fraction, 1e-9):.2g} FLOPs (or more --minutes)")
    need = min(3, per)  # a parabola needs three sizes
    thin = [i for i in range(g.levels) if len({r.width for r in iso if r.groups == [f"iso{i}"]}) < need]
    if thin:
        raise PlanError(f"a budget of {budget:.3g} FLOPs leaves IsoFLOP level(s) {', '.join(map(str, thin))} with "
                        f"fewer than {need} model sizes of at least {g.min_steps} steps: raise the budget, or "
                        f"lower --levels, --per-level, --min-steps or --model.block_size")
    fixed: list[RunSpec] = []
    if fixed_budget > 0:
        centers = _level_centers(iso, g.center_tokens_per_param)
        chosen = _around(centers, [x.member for x in iso], g.fixed_sizes)
        if tokens:
            lengths = tokens
        else:
            rel = [g.length_ratio ** j for j in range(g.fixed_lengths)]
            d0 = fixed_budget / (sum(m.flops_per_token for m in chosen) * sum(rel))
            lengths = [d0 * q for q in rel]
        fixed = fixed_runs(chosen, lengths, tokens_per_step, g.min_steps)
    return _merge(iso + fixed)


def _level_centers(iso: list[RunSpec], ratio: float) -> list[Member]:
    """The size nearest ``ratio`` tokens per parameter at each IsoFLOP level."""
    by_level: dict[str, list[RunSpec]] = {}
    for r in iso:
        by_level.setdefault(r.groups[0], []).append(r)
    return [min(rs, key=lambda x: abs(math.log(x.tokens / x.params / ratio))).member for rs in by_level.values()]


def _around(seed: list[Member], pool: list[Member], count: int) -> list[Member]:
    """``seed`` grown (or thinned) to ``count`` members, adding the pool's nearest sizes by N."""
    chosen = sorted(set(seed), key=lambda m: m.params)
    rest = sorted(set(pool) - set(chosen), key=lambda m: m.params)
    while len(chosen) < count and rest:
        lo, hi = chosen[0].params, chosen[-1].params
        best = min(rest, key=lambda m: min(abs(math.log(m.params / lo)), abs(math.log(m.params / hi))))
        chosen = sorted(chosen + [best], key=lambda m: m.params)
        rest.remove(best)
    return _spread_pick(chosen, count)


def _spread_pick(members: list[Member], count: int) -> list[Member]:
    uniq = sorted(set(members), key=lambda m: m.params)
    if len(uniq) <= count:
        return uniq
    idx = sorted({round(i * (len(uniq) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [len(uniq) // 2]
    return [uniq[i] for i in idx]


def assign_schedule(runs: list[RunSpec], lr: Optional[float], warmup: Optional[int]) -> None:
    """Per-run learning rate (Kaplan's rule unless fixed) and warmup (10% of the steps, at most 100)."""
    for r in runs:
        r.lr = lr if lr is not None else round(kaplan_lr(r.params), 6)
        r.warmup = warmup if warmup is not None else max(1, min(100, r.steps // 10))


def total_flops(runs: list[RunSpec]) -> float:
    return float(sum(r.flops for r in runs))
