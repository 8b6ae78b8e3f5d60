"""File hashing: the SHA-256 that names a photo (teacher cache, training-photo overlap), pins a download and ties an
exported ONNX file to the ``model.pt`` it came from."""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["file_sha256"]
