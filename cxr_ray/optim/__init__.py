"""Optimisation: optimizers, lr policies (pure functions of the step), the LR range test, the study's tables."""
