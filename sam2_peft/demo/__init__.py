"""A local web page to see what fine-tuning changed: the base model's and an adapter's masks side by side.

    pip install 'sam2-peft[demo]'
    sam2-peft demo --model facebook/sam2.1-hiera-tiny --adapter ct=runs/ct/final [--host 127.0.0.1] [--port 7860]

`predictor` holds the models and the numbers (no UI), `app` the Gradio page and its `segment` API endpoint,
`launch` the command line. Only `app` imports Gradio.
"""

from sam2_peft.demo.launch import DESCRIPTION, main
from sam2_peft.demo.predictor import Comparison, DemoInputError, DemoPredictor, LoadedImage, Prompt

__all__ = ["DESCRIPTION", "Comparison", "DemoInputError", "DemoPredictor", "LoadedImage", "Prompt", "main"]
