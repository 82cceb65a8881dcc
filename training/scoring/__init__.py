"""Scoring: the challenge metrics (ours and the official code's), evaluations, comparisons and studies."""
