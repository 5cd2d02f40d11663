"""Task fine-tuning recipes (classification, instruction tuning, translation) on the one Trainer."""
