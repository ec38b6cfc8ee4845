"""Benchmarks behind `npr bench SUITE`: one module per suite, shared helpers in common.py."""
