"""Benchmarks: Hamal's engine and workers against peers measured in the same run.

Not tests: they print numbers and ratios and assert nothing. See bench/README.md.
"""
