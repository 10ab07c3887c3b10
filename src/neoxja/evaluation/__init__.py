"""Measuring a model: sliding-window perplexity and lm-evaluation-harness integration."""
