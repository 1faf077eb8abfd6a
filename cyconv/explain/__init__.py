"""Explaining a model: Grad-CAM heat maps and feature maps, at any named layer."""
from cyconv.explain.drawing import overlay, put_label, softmax
from cyconv.explain.feature_maps import feature_grid, features
from cyconv.explain.gradcam import GradCAMResult, default_layer, gradcam, upsample
from cyconv.explain.layers import describe, execution_order, resolve

__all__ = ["GradCAMResult", "default_layer", "describe", "execution_order", "feature_grid",
           "features", "gradcam", "overlay", "put_label", "resolve", "softmax", "upsample"]
