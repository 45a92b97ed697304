"""Microbenchmarks behind ``thunderkv bench ...``: measure, print a table, write JSON lines."""
