"""Judging a candidate against a golden: ``tolerances`` (per stage and dtype, calibrated),
``classify`` (one array pair: verdict and metrics; routing as expert sets; the row and expert
rules), ``compare`` (two cases stage by stage in computation order, coverage, the report value)
and ``report`` (the table, JSON and HTML).

May import: :mod:`moesnap.store.case` (the :class:`Case` value), :mod:`moesnap.errors`,
:mod:`moesnap.stages`, :mod:`moesnap.util`; never a forward, a store, a use case or the CLI.
"""
