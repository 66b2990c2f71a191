"""Benchmarks and self-checks behind `python -m deepfense bench | check | list`.

cases (losses, shapes, byte/FLOP counts) -> providers (the registry of implementations) -> measure (time, memory,
errors, ceilings) -> runner (the loop) -> report (table, scaling fits, files) -> cli. The pytest-benchmark suites in
bench/ use the same cases, providers and measurement helpers.
"""
