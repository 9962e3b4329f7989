"""Reporting: a plan's per-layer table as rich text, a dict or JSON (:mod:`.render`).
It may import every stage below it (capture, analysis, runtime, measure); it takes the
:class:`~fxbackmatch.plan.Plan` as an argument and imports it only for type checking. Only
the top level (plan, cli, train) imports it.
"""
