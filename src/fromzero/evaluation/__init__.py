"""Evaluation: classification and language-model metrics, cross-validation summaries,
metrics.json reports and plots (confusion matrix).

- :mod:`fromzero.evaluation.metrics` — numbers (scikit-learn does the counting).
- :mod:`fromzero.evaluation.plots` — pictures (matplotlib, Agg backend).
"""
