"""Processes and outputs: ``distributed`` (launch modes, collectives, the agreed stop flag), ``logs`` (per-rank log
files), ``metrics`` (the run folder's metric files and summary), ``trackers`` (W&B and MLflow, ``--log_to``),
``plot`` (curves.png), and ``io`` (atomic file writes, CPU cores, process pools: what every part shares with the
operating system).
"""
