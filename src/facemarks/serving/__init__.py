"""From a photo to points: face detection, crop inference, ONNX export and runtime, the model registry."""
