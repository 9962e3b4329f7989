"""Measured factors: run the model on real batches and replace symbolic moments with
measured ones (:mod:`.factors`; the own factors of ops no rule covers: :mod:`.local`), and fit a plan's runtime multipliers to the current batch
(:mod:`.batch`). It may import capture, analysis, runtime and :mod:`fxbackmatch.errors` —
never apply, report, train, cli or integrations.
"""
