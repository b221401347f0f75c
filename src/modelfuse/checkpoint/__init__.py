"""Reading and writing checkpoints, lazily and atomically.

Reading: :func:`open_checkpoint` opens a safetensors file, a sharded
safetensors checkpoint, a Hugging Face model folder or a PyTorch
``.bin``/``.pt`` file, reading headers only; :meth:`Checkpoint.read` then
reads one tensor at a time.

Writing: :class:`CheckpointWriter` lays out safetensors shards for a known
list of tensors, writes each tensor as it arrives, and moves the finished
folder into place atomically.

Examples
--------
>>> import tempfile, torch
>>> from pathlib import Path
>>> from modelfuse.checkpoint import CheckpointWriter, open_checkpoint
>>> out = Path(tempfile.mkdtemp()) / "out"
>>> with CheckpointWriter(out, [("w", (2, 2), torch.float16)]) as writer:
...     writer.write("w", torch.eye(2, dtype=torch.float16))
...     _ = writer.commit()
>>> with open_checkpoint(out) as ckpt:
...     ckpt.keys(), ckpt.info("w").nbytes
(['w'], 8)
"""

from __future__ import annotations

from modelfuse.checkpoint.base import Checkpoint, TensorInfo
from modelfuse.checkpoint.reader import open_checkpoint
from modelfuse.checkpoint.safetensors_format import SafetensorsCheckpoint
from modelfuse.checkpoint.sizes import parse_size
from modelfuse.checkpoint.torch_format import TorchCheckpoint
from modelfuse.checkpoint.writer import DEFAULT_SHARD_SIZE, CheckpointWriter

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "Checkpoint",
    "CheckpointWriter",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "TorchCheckpoint",
    "open_checkpoint",
    "parse_size",
]
