"""Stage 1 — capture: turn a model into a ``torch.fx`` graph with shapes.

Holds fx symbolic tracing (:mod:`.tracing`), ``torch.export`` capture and ATen lowering
(:mod:`.aten`), the capture front end that picks fx, export or the hook-recording fallback
(:mod:`.graph`), fake-tensor shape propagation (:mod:`.shapes`), graph topology helpers
(:mod:`.topology`) and the forward pre-hooks a plan puts on the model (:mod:`.hooks`). It
may import only :mod:`fxbackmatch.errors`, torch and networkx — never analysis, runtime,
apply, measure, report, train, cli or integrations.
"""
