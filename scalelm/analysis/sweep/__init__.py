"""Scaling-law sweeps: plan a grid for a budget (``plan``, ``calibrate``), run it (``runner``,
``system``), fit and report (``report``, ``plots``, ``text``); ``cli`` has ``sweep`` and ``report``."""
