"""GaLore+'s sparse residual (Algorithm 2): an exact (or the paper's) Adam update at a fixed sparse index set I.

:mod:`.index` chooses and stores I, :mod:`.values` computes the new weight values at I, :mod:`.step` is the
residual's part of one optimizer step (its state, and writing p at I).
"""
