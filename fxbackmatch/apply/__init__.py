"""Stage 4 — apply: put a plan's scales into an optimizer.

Holds :func:`~.optim.attach` (per-parameter learning-rate multipliers through optimizer
hooks), the Adam/length mode (:mod:`.length`), the fused compiled step (:mod:`.fused`), its
updates (:mod:`.updates`), the inductor pass that keeps them one loop per parameter
(:mod:`.schedule`), its SGD update as generated C++ on the CPU (:mod:`.cpu_update`) and as
torch's fused kernel behind the graphed scales on CUDA (:mod:`.cuda_update`),
update tracking (:mod:`.tracking`), the optimizers' live handles (:mod:`.handles`) and plan
state save/restore (:mod:`.state`). It may import capture, analysis, runtime, measure and
:mod:`fxbackmatch.errors`; it takes the :class:`~fxbackmatch.plan.Plan` as an argument and
imports it only for type checking.
"""
