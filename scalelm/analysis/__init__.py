"""Analysis: hardware peaks, the memory/FLOPs planner, plots, scaling sweeps and fits."""
