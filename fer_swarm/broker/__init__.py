"""The broker: ROUTER frontend for edge clients, ROUTER backend for workers, credit-based dispatch."""

from .scheduler import Scheduler
from .server import Broker

__all__ = ["Broker", "Scheduler"]
