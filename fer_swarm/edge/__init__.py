"""The edge client: frames in, labelled faces out, inference done by the pool.

``sources`` (camera, video, images) -> ``faces`` (detect, crop) -> ``client``
(one DEALER to the broker) -> ``pipeline`` (match replies, decide when a frame
is shown) -> ``draw`` -> outputs, wired together by ``app.run_edge``.
"""

from .app import EdgeSummary, run_edge
from .client import SwarmClient
from .pipeline import FaceOutcome, FramePipeline, ShownFrame
from .sources import CameraSource, Frame, ImageFolderSource, VideoSource, open_source

__all__ = [
    "EdgeSummary", "run_edge", "SwarmClient", "FaceOutcome", "FramePipeline", "ShownFrame",
    "CameraSource", "Frame", "ImageFolderSource", "VideoSource", "open_source",
]
