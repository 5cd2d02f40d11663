"""LoRA adapters, applied to a plain GPT from outside (like parallelize), merged, exported to PEFT."""
