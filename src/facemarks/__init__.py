"""facemarks: 68-point facial keypoints by pixelwise classification."""
__version__ = "0.1.0"
