"""Stage 4 — apply: put a plan's scales into an optimizer.

Holds :func:`~.optim.attach` (per-parameter learning-rate multipliers through optimizer
hooks), the Adam/length mode (:mod:`.length`), the fused compiled step (:mod:`.fused`) and the
inductor pass that keeps its per-parameter updates in one loop (:mod:`.schedule`),
update tracking (:mod:`.tracking`), the optimizers' live handles (:mod:`.handles`) and plan
state save/restore (:mod:`.state`). It may import capture, analysis, runtime, measure and
:mod:`fxbackmatch.errors`; it takes the :class:`~fxbackmatch.plan.Plan` as an argument and
imports it only for type checking.
"""
