"""Interpretability and control: read and replace activations by name, inspect a model on a text,
trace which activations carry a prediction (activation patching), steer generation with vectors.

    from scalelm import capture, patch
    with capture(model, "blocks.*.resid_post") as cache:
        model(idx)

See docs/interpretability.md for the names, the commands (`scalelm inspect`, `scalelm trace`,
`scalelm steer`) and the steering extensions of `generate` and `serve`.
"""

from .hooks import ActivationCache, HookPoint, capture, hook_names, patch

__all__ = ["ActivationCache", "HookPoint", "capture", "hook_names", "patch"]
