"""Preference tuning (``scalelm finetune dpo``): DPO, IPO, conservative DPO and SimPO on pairs of replies."""
