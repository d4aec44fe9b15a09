"""Gradient sources: where the per-task gradient information of one ``backward`` comes from."""
