"""The benchmark: scFedVI against per-site, pooled and classical baselines (``scfedvi benchmark``).

- :mod:`~scfedvi.benchmark.task`: data sets, partitions, the genes and cells every method uses;
- :mod:`~scfedvi.benchmark.methods` and :mod:`~scfedvi.benchmark.baselines`: one function per
  method, returning an embedding in the pooled cell order;
- :mod:`~scfedvi.benchmark.plan`, :mod:`~scfedvi.benchmark.runner`,
  :mod:`~scfedvi.benchmark.cache`: the grid, its jobs and their cache;
- :mod:`~scfedvi.benchmark.evaluate`: LISI and scIB metrics; :mod:`~scfedvi.benchmark.report`:
  results.csv, report.md, report.html; :mod:`~scfedvi.benchmark.cli`: the command.

Nothing is imported here: scvi-tools, scanpy and scib-metrics load only when a method needs them.
"""
