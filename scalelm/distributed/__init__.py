"""Scale out on ``torch.distributed``: device mesh, DDP / FSDP2 / TP / PP / context parallelism
(ring attention) applied from outside the model, gradient sync for accumulation, clipping across
shards and stages, and (in ``dcp``) layout-free DCP state dicts with the ``scalelm export``
command. Imports ``model/``, never ``train/``: the trainer's sharded checkpoints are
``scalelm.train.sharded_state``.

The seam the trainer uses::

    ctx = init_parallel(cfg)                  # no process group at all in one process
    model = parallelize(GPT(cfg.model), cfg, ctx)
    with grad_sync(model, enabled=last_micro_step):
        loss = model(x, y)[1] / accum; loss.backward()
    clip_grad_norm(model, cfg.optim.grad_clip, ctx)
    destroy_parallel(ctx)
"""

from .context_parallel import apply_cp
from .dcp import (
                   add_export_parser,
                   is_sharded_checkpoint,
                   run_export,
                   save_full_model_dir,
                   training_state_dicts,
)
from .mesh import (
                   MESH_DIMS,
                   Layout,
                   LayoutError,
                   ParallelContext,
                   all_reduce_mean_loss,
                   destroy_parallel,
                   init_parallel,
                   resolve_layout,
)
from .parallelize import (
                   apply_ac,
                   apply_compile,
                   apply_ddp,
                   apply_fsdp,
                   apply_tp,
                   clip_grad_norm,
                   grad_norm,
                   grad_sync,
                   model_parts,
                   parallelize,
                   unwrap_model,
)

__all__ = [
    "add_export_parser", "is_sharded_checkpoint", "run_export", "save_full_model_dir", "training_state_dicts",
    "MESH_DIMS", "Layout", "LayoutError", "ParallelContext", "all_reduce_mean_loss", "apply_ac", "apply_cp",
    "apply_compile", "apply_ddp", "apply_fsdp", "apply_tp", "clip_grad_norm", "destroy_parallel", "grad_norm",
    "grad_sync", "init_parallel", "model_parts", "parallelize", "resolve_layout", "unwrap_model",
]
