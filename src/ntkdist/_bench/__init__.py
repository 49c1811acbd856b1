"""Benchmarks: ``ntkdist bench`` (:mod:`._main`, one module per section), the
engine benchmark (:mod:`._engine`) and the regression benchmark
(:mod:`._regression`). Never imported by the engine."""
