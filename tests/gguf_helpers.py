"""Small GGUF files built in the test: a valid header, one F32 tensor, its data."""

from __future__ import annotations

import struct
from pathlib import Path

ALIGNMENT = 32


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(*, version: int = 3, tensors: int = 1, elements: int = 8, magic: bytes = b"GGUF") -> bytes:
    """A GGUF file holding `tensors` F32 tensors of `elements` values each, with a small vocabulary."""
    vocab = ["<s>", "</s>", "你", "好"]
    metadata = [
        _string("general.architecture") + struct.pack("<I", 8) + _string("llama"),
        _string("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", ALIGNMENT),
        _string("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, len(vocab))
        + b"".join(_string(t) for t in vocab),
    ]
    header = magic + struct.pack("<IQQ", version, tensors, len(metadata)) + b"".join(metadata)
    size = elements * 4
    stride = -(-size // ALIGNMENT) * ALIGNMENT
    for i in range(tensors):
        header += _string(f"blk.{i}.weight") + struct.pack("<IQIQ", 1, elements, 0, i * stride)
    header += b"\0" * (-len(header) % ALIGNMENT)
    data = b"".join(
        struct.pack(f"<{elements}f", *([0.5] * elements)).ljust(stride, b"\0") for _ in range(tensors)
    )
    return header + data


def write_gguf(path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.write_bytes(gguf_bytes(**kwargs))
    return path
