"""Translation (``scalelm finetune translate``, ``scalelm translate``): a model behind a small interface."""
