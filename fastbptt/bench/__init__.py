"""Benchmark harness: speed and memory of fastbptt against torch.nn and torch.compile."""
