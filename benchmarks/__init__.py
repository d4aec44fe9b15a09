"""Benchmarks for gradsurgery: data generators (``benchmarks.problems``) and the runners built on them."""
