"""Stage 2 — analysis: walk the captured graph backwards and give every parameter its
back-matching factor as a symbolic expression.

Holds the walk (:mod:`.walk`) and what it does at an op with no rule (:mod:`.gaps`), the
rule API and registry (:mod:`.registry`, :mod:`.context`, :mod:`.records`), the symbolic
monomials (:mod:`.expr`), the variance estimator (:mod:`.variance`), the method table
(:mod:`.methods`), scale guards (:mod:`.guards`), the row-span and token tables
(:mod:`.span`, :mod:`.tokens`), the approximation conventions (:mod:`.conventions`:
:class:`~.conventions.Conventions`) and the built-in rules (:mod:`.rules`). It may import
:mod:`fxbackmatch.capture` and :mod:`fxbackmatch.errors` — never runtime, apply, measure,
report, train, cli or integrations.
"""
