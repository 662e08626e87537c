"""Benchmarks: load generation and real swarm processes on loopback (``bench/`` scripts, ``fer-swarm bench``)."""
