"""Process groups and the device mesh: who this process is, and the layout it is part of.

One process without torchrun has no process group at all. Under torchrun the layout
``pp x dp_replicate x dp_shard x cp x tp`` is checked against the model and the world size
*before* any process group exists, then one ``DeviceMesh`` with those five named dimensions
(size-1 dimensions included, so slicing never needs a special case) is built. Context-parallel
ranks hold the same parameters and see different parts of the same sequences: for gradients
they are data-parallel ranks, so FSDP2 shards over ``dp_shard x cp`` (one flattened dimension).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, ModelConfig, ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost (slowest network) first


class LayoutError(ConfigError):
    """A parallel layout that cannot run: wrong product, or a model that does not split."""


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1  # last, so that positional Layout(pp, r, s, tp) keeps its meaning

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def fsdp(self) -> bool:
        """FSDP2 when sharding (over ``dp_shard x cp``), and for replication next to TP (DDP
        cannot hold DTensors); DDP when only ``dp_replicate`` is left."""
        return self.dp_shard * self.cp > 1 or (self.dp_replicate > 1 and self.tp > 1)

    def describe(self) -> str:
        return " x ".join(f"{n}={s}" for n, s in zip(MESH_DIMS, self.shape))


def virtual_stages(pc: ParallelConfig) -> int:
    """Pipeline model chunks per rank: interleaved schedules loop over 2 chunks per rank."""
    return 2 if pc.pp > 1 and pc.pp_schedule == "interleaved_1f1b" else 1


def resolve_layout(pc: ParallelConfig, mc: Optional[ModelConfig], world_size: int) -> Layout:
    """Fill in ``dp_shard=-1`` and reject layouts that cannot work, saying why and what to do."""
    for name in ("dp_replicate", "tp", "pp", "cp"):
        if getattr(pc, name) < 1:
            raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(pc, name)}")
    if pc.dp_shard == 0 or pc.dp_shard < -1:
        raise LayoutError(f"parallel.dp_shard must be >= 1, or -1 for 'the rest', got {pc.dp_shard}")
    fixed = pc.dp_replicate * pc.tp * pc.pp * pc.cp
    shard = pc.dp_shard
    if shard == -1:
        if world_size % fixed:
            cp = " x cp" if pc.cp > 1 else ""
            raise LayoutError(
                f"world size {world_size} is not divisible by dp_replicate x tp x pp{cp} = "
                f"{pc.dp_replicate} x {pc.tp} x {pc.pp}{f' x {pc.cp}' if cp else ''} = {fixed}; launch a "
                f"multiple of {fixed} processes (torchrun --nproc_per_node={fixed} -m scalelm train ...) or "
                f"change the layout")
        shard = world_size // fixed
    layout = Layout(pp=pc.pp, dp_replicate=pc.dp_replicate, dp_shard=shard, tp=pc.tp, cp=pc.cp)
    if layout.world_size != world_size:
        raise LayoutError(
            f"parallel layout {layout.describe()} needs {layout.world_size} processes but the world "
            f"size is {world_size} (torchrun --nnodes x --nproc_per_node); make the product match, "
            f"or set --parallel.dp_shard=-1 to use the rest for sharded data parallelism")
    if pc.sequence_parallel and pc.tp == 1:
        raise LayoutError("parallel.sequence_parallel splits norms over the tensor-parallel group: "
                          "it needs --parallel.tp > 1")
    if pc.cp > 1 and pc.pp > 1:
        raise LayoutError("context parallelism (parallel.cp) does not run inside a pipeline yet: use "
                          "--parallel.pp=1 with --parallel.cp")
    if pc.cp > 1 and pc.sequence_parallel:
        raise LayoutError("parallel.cp and parallel.sequence_parallel both split the sequence: use one of them")
    if pc.pp_microbatches is not None and pc.pp_microbatches < 1:
        raise LayoutError(f"parallel.pp_microbatches must be >= 1, got {pc.pp_microbatches}")
    if mc is not None:
        check_model_fits(layout, pc, mc)
    return layout


def check_model_fits(layout: Layout, pc: ParallelConfig, mc: ModelConfig) -> None:
    tp = layout.tp
    if tp > 1:
        if mc.n_head % tp:
            raise LayoutError(f"tensor parallelism splits attention heads: n_head={mc.n_head} is not "
                              f"divisible by tp={tp}")
        if mc.kv_heads % tp:
            raise LayoutError(f"tensor parallelism splits key/value heads: n_kv_head={mc.kv_heads} is "
                              f"not divisible by tp={tp}; use a tp that divides {mc.kv_heads}")
        if mc.ffn_dim % tp:
            raise LayoutError(f"tensor parallelism splits the MLP: its width {mc.ffn_dim} is not "
                              f"divisible by tp={tp}")
        if mc.qk_norm:  # each rank's heads would give its copy of the shared norm weight another gradient
            raise LayoutError("model.qk_norm (Qwen3, Gemma 3, OLMo 2) is not supported with tensor parallelism "
                              "yet: use --parallel.tp=1")
        if mc.norm_placement != "pre":  # the plan shards and replicates the pre-norms only
            raise LayoutError(f"model.norm_placement={mc.norm_placement} (Gemma, OLMo 2) is not supported with "
                              f"tensor parallelism yet: use --parallel.tp=1")
        if pc.sequence_parallel and mc.block_size % tp:
            raise LayoutError(f"sequence parallelism splits the sequence: block_size={mc.block_size} "
                              f"is not divisible by tp={tp}")
    if layout.cp > 1:
        check_model_fits_cp(layout.cp, mc)
    stages = layout.pp * virtual_stages(pc)
    if layout.pp > 1 and mc.n_layer % stages:
        what = f"pp={layout.pp} x 2 interleaved chunks" if stages != layout.pp else f"pp={layout.pp}"
        raise LayoutError(f"pipeline parallelism splits the layers into {stages} stages ({what}), "
                          f"but n_layer={mc.n_layer} is not divisible by {stages}")
    if mc.n_shared_blocks and mc.n_shared_blocks != mc.n_layer:
        if layout.pp > 1:
            raise LayoutError("model.n_shared_blocks (cross-layer sharing) cannot be split into "
                              "pipeline stages: the shared blocks would live on several stages")
        if layout.dp_shard > 1:
            raise LayoutError("model.n_shared_blocks (cross-layer sharing) runs a block several times "
                              "per step, which FSDP2 sharding does not support; use "
                              "--parallel.dp_replicate=N --parallel.dp_shard=1 (DDP) instead")


def check_model_fits_cp(cp: int, mc: ModelConfig) -> None:
    """Context parallelism splits each sequence into 2*cp chunks (see ``context_parallel``) and
    replaces causal attention with a ring: what else attention does must be position-free."""
    if mc.arch != "gpt":
        raise LayoutError("context parallelism (parallel.cp) is built for the decoder-only GPT")
    if mc.block_size % (2 * cp):
        raise LayoutError(f"context parallelism splits each sequence into 2 x cp = {2 * cp} chunks: "
                          f"block_size={mc.block_size} is not divisible by {2 * cp}")
    if mc.dropout > 0:
        raise LayoutError(f"context parallelism computes attention as a ring without dropout: set "
                          f"--model.dropout=0 (it is {mc.dropout}) or --parallel.cp=1")
    for name in ("sliding_window", "attn_softcap"):
        if getattr(mc, name, None) is not None:
            raise LayoutError(f"model.{name} is not supported with context parallelism: the ring computes "
                              f"plain causal attention; use --parallel.cp=1")


@dataclass
class ParallelContext:
    """Where this process sits. ``dp_*`` is the data-parallel position the batch loader needs."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    dp_rank: int = 0
    dp_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Optional[object] = None  # DeviceMesh over MESH_DIMS, None in a single process
    is_main: bool = True
    pp: int = 1
    pp_rank: int = 0
    tp: int = 1
    tp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0
    layout: Layout = field(default_factory=Layout)

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def dp_replicate(self) -> int:
        return self.layout.dp_replicate

    @property
    def dp_shard(self) -> int:
        return self.layout.dp_shard

    def submesh(self, *names: str):
        """The mesh over some dimensions (e.g. ``"dp_replicate", "dp_shard"``, or the flattened
        ``"dp_shard_cp"`` that exists when ``cp > 1``), or None."""
        if self.mesh is None:
            return None
        return self.mesh[names[0]] if len(names) == 1 else self.mesh[names]

    def group(self, name: str):
        return None if self.mesh is None else self.mesh.get_group(name)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _pick_device(spec: str, local_rank: int, multi: bool) -> torch.device:
    from ..precision import pick_device

    dev = pick_device(spec)
    if dev.type == "cuda":
        if multi:  # one GPU per process: the local rank picks it (cuda:N is ignored here)
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"local rank {local_rank} has no GPU: this node has "
                                  f"{torch.cuda.device_count()}; lower --nproc_per_node")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def world_from_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) as set by torchrun/SLURM launchers; (1, 0, 0) otherwise."""
    return (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)))


_STORE_SERVER = None  # rank 0's store of this attempt (see _attempt_store), alive while the group is


def _attempt_store(rank: int, world: int, timeout: timedelta):
    """A store of this attempt's own for the process group, under torchrun's agent store.

    The agents' store outlives a restart (``--max-restarts``) and still holds the dead workers'
    keys: a restarted worker may read a dead peer's address and fail to connect. Its restart
    count cannot name the attempt either: each node counts only the restarts its own workers
    caused, so after one node's failure the nodes disagree (pytorch/pytorch#135712; seen here
    with two agents: the healthy node's worker failed on a stale address and spent a restart).
    So rank 0 starts a fresh store on a free port and publishes ``"port nonce"`` in the agents'
    store; the other ranks connect to what is published until they reach a live store that holds
    that nonce (a dead attempt's entry names a closed port, or a server without its nonce). None
    when not under an agent store: plain ``env://``."""
    global _STORE_SERVER
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    host, key = os.environ["MASTER_ADDR"], "scalelm/attempt_store"
    agent = dist.TCPStore(host, int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    if rank == 0:
        nonce = uuid.uuid4().hex
        _STORE_SERVER = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        _STORE_SERVER.set("scalelm/nonce", nonce)
        agent.set(key, f"{_STORE_SERVER.port} {nonce}")
        return _STORE_SERVER
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, nonce = agent.get(key).decode().split()  # waits for the first publication
        try:
            socket.create_connection((host, int(port)), timeout=5).close()  # a dead attempt's port: refused at once
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))
            if store.get("scalelm/nonce").decode() == nonce:
                store.set_timeout(timeout)
                return store
        except (OSError, RuntimeError):  # a closed port, or a store without the nonce (timeout)
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no live process-group store at {host}: rank 0 of this attempt never "
                               f"published one (waited {timeout.total_seconds():.0f} s)")
        time.sleep(0.2)


def init_parallel(cfg: Config) -> ParallelContext:
    """Validate the layout, then (under torchrun with >1 process) join the process group."""
    world, rank, local_rank = world_from_env()
    layout = resolve_layout(cfg.parallel, cfg.model, world)
    device = _pick_device(cfg.train.device, local_rank, world > 1)
    if world == 1:
        return ParallelContext(device=device, layout=layout)
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        store = _attempt_store(rank, world, timeout)
        if store is not None:
            kw.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend, timeout=timeout, **kw)
    mesh = init_device_mesh(device.type, layout.shape, mesh_dim_names=MESH_DIMS)
    if layout.cp > 1:  # gradients are reduced over data-parallel and context-parallel ranks together
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    coord = dict(zip(MESH_DIMS, mesh.get_coordinate()))
    return ParallelContext(
        world_size=world, rank=rank, local_rank=local_rank,
        dp_rank=coord["dp_replicate"] * layout.dp_shard + coord["dp_shard"], dp_world=layout.dp,
        device=device, mesh=mesh, is_main=rank == 0, pp=layout.pp, pp_rank=coord["pp"],
        tp=layout.tp, tp_rank=coord["tp"], cp=layout.cp, cp_rank=coord["cp"], layout=layout)


def destroy_parallel(ctx: Optional[ParallelContext] = None) -> None:
    """Leave the process group. The barrier first lets in-flight point-to-point work (pipeline
    sends) finish everywhere: tearing gloo down under it aborts the process."""
    global _STORE_SERVER
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:  # not while an error unwinds: the other ranks may never arrive
            dist.barrier()
        dist.destroy_process_group()
    _STORE_SERVER = None


def all_reduce_mean_loss(loss: Optional[torch.Tensor], ctx: ParallelContext) -> torch.Tensor:
    """The global mean of a per-rank loss (a float tensor), for logging, on every rank.

    Every data-parallel replica's last pipeline stage holds a loss; tensor-parallel peers hold
    copies of it; context-parallel peers hold the losses of equal parts of the same sequences.
    One all-reduce over the whole world, with those weights, gives the mean.
    """
    if not ctx.distributed:
        return loss.detach()
    if loss is None:  # a pipeline stage before the last has no loss
        loss = torch.zeros(())
    last_stage = ctx.pp_rank == ctx.pp - 1
    w = 1.0 / (ctx.dp_world * ctx.cp * ctx.tp) if last_stage else 0.0
    t = (loss.detach().to(torch.float64) * w).to(ctx.device).reshape(())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
