"""The paper's experimental section regenerated from runs: ``python -m analysis.report <sweep dir | wandb:GROUP> ...``.

Modules: ``runs`` (run directories -> RunRecord), ``wandb_source`` (W&B API -> RunRecord), ``artifacts`` (the optional
per-run files of the method evaluations: PCA data, aligned tokens), ``paper`` (the paper's numbers in ``data/``),
``tables`` and ``figures`` (what the report shows), ``render`` (files on disk), ``dashboard`` (the W&B panel set),
``report`` (the command).
"""
