"""fer-swarm: real-time facial expression recognition on a swarm of small machines."""

__version__ = "0.1.0"
