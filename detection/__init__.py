"""SLaK in MMDetection 3.x: ``detection.slak`` registers the backbone and the optimizer
constructor; ``detection/configs`` holds the Cascade Mask R-CNN configs (see
docs/dense_prediction.md)."""
