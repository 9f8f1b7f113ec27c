"""Pieces of ``benchmarks/paper_claims.py``: experiments, the result store, the worker pool, the plots and
the markdown report."""
