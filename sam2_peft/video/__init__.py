"""Video and volumes: SAM2's memory path trained with gradients, and tracking with an adapter.

    segmenter = VideoSegmenter(load_sam2("tiny-random", video=True))      # the memory forward (segmenter.py)
    tracking = track_video(model, "frames/", boxes=[(10, 10, 60, 60)])    # label maps per frame (tracking.py)

`training.py` holds the training step's parts (`ClipSegmenter`, `video_loss`, `validate_clips`), `evaluation.py`
`evaluate_video` (`sam2-peft eval --task video`).
"""

from sam2_peft.video.frames import FrameFeatures, FrameOutput
from sam2_peft.video.segmenter import VideoSegmenter
from sam2_peft.video.tracking import Tracking, logits_at_original_size, track_clip, track_video

__all__ = ["FrameFeatures", "FrameOutput", "Tracking", "VideoSegmenter", "logits_at_original_size", "track_clip",
           "track_video"]
