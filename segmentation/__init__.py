"""SLaK in MMSegmentation 1.x: ``segmentation.slak`` registers the backbone and the optimizer
constructor; ``segmentation/configs`` holds the UperNet configs (see docs/dense_prediction.md)."""
