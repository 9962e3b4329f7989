"""Stage 3 — runtime: evaluate the analysis' expressions every step.

Holds the code generator that compiles the factor expressions into one function
(:mod:`.codegen`), its human-readable rendering (:mod:`.explain`), the per-step chain that
reads weight norms and turns them into scales (:mod:`.chain`), its CUDA graphs
(:mod:`.graphs`), host values moved to the device without a sync (:mod:`.transfer`), the norm
kernels (:mod:`.norms`), the eager reference evaluator (:mod:`.reference`) and the plan builder
that runs capture → analysis → codegen (:mod:`.build`). It may import capture, analysis and
:mod:`fxbackmatch.errors` — never apply, report, train, cli or integrations.
"""
