"""Shared foundations: typed params, atomic writes, hashing, file formats, the 68-point markup, MLflow tracking, the machine."""
