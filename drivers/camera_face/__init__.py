"""Camera with on-device face matching against a watchlist (OpenCV YuNet + TFLite)."""

from drivers.camera_face.config import CameraFaceConfig
from drivers.camera_face.driver import CameraFaceDriver

__all__ = ["CameraFaceConfig", "CameraFaceDriver"]
