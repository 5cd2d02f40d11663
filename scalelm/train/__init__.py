"""Training: the one loop (``trainer.Trainer``), AdamW and schedules (``optim``), checkpoints that
resume exactly (``state``, ``sharded_state``), bf16 master weights, metrics and the validation loss.

Every objective (pretraining now; classification, instruction tuning, distillation later) runs
through ``Trainer`` with its own ``batches`` and ``loss_fn``.
"""

__all__ = ["Trainer", "batch_geometry", "evaluate"]


def __getattr__(name):  # the trainer pulls in torch.distributed: import it on first use
    if name in ("Trainer", "batch_geometry"):
        from . import trainer

        return getattr(trainer, name)
    if name == "evaluate":
        from .validation import evaluate

        return evaluate
    raise AttributeError(f"module 'scalelm.train' has no attribute {name!r}")
