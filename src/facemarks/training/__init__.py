"""The heatmap network and its training loop."""
