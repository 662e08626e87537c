"""The worker: one I/O thread on a DEALER socket, N inference threads each with its own interpreter."""

from .worker import Worker

__all__ = ["Worker"]
