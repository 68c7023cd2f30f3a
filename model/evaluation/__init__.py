"""Scoring and reports: metrics, baselines tuned with the truth in hand, quality reports.

The node never imports it.
"""
