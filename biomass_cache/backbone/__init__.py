"""The frozen DINOv3 backbone: offline loading, multi-layer patch tokens, the view policy and numeric precision."""
