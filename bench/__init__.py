"""Benchmarks (not tests): quality and throughput; their figures go to BENCHMARKS.md."""
