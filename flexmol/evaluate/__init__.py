"""Metrics of the fine-tuning protocol and of conformation generation."""
