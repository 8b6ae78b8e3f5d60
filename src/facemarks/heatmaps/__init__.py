"""Keypoints <-> Gaussian heatmaps: the codec, its decoders and the encode stage's arrays."""
