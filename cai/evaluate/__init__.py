"""Evaluations: the labeler against known answers, and what a constitution edit changes."""
