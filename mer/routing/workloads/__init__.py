"""Benchmark workloads: routing decisions drawn step by step (markov, uniform, skewed) or replayed."""
