"""Offline tools that need no TensorFlow: ``fer-swarm eval`` and ``fer-swarm dataset crop``."""
