"""Analysis: the memory model and planner, the memory probe, plots, scaling sweeps and fits."""
