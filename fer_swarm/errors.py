"""The project's exceptions: one root, so callers can catch everything fer-swarm raises."""

from __future__ import annotations


class FerSwarmError(Exception):
    """Root of every error fer-swarm raises on purpose."""


class ConfigError(FerSwarmError):
    """A configuration file, environment variable or flag is wrong."""


class DatasetError(FerSwarmError):
    """A folder-per-class dataset is missing, empty or malformed."""


class ModelError(FerSwarmError):
    """A model file or its sidecar is missing, unreadable or inconsistent."""


class ProtocolError(FerSwarmError):
    """A message on the wire does not follow docs/protocol.md."""


class TransportError(FerSwarmError):
    """A socket operation failed (translated from zmq.ZMQError at the boundary)."""
