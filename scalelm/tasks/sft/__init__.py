"""Instruction tuning (``scalelm finetune sft``): chat templates, reply-only loss, packing."""
