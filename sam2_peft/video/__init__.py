"""Video and volumes: SAM2's memory path trained with gradients, tracking with an adapter."""

from sam2_peft.video.segmenter import FrameFeatures, FrameOutput, VideoSegmenter

__all__ = ["FrameFeatures", "FrameOutput", "VideoSegmenter"]
