"""The training stages and precisions: names the CLI offers at parse time, without importing
torch, and the trainer acts on."""

from __future__ import annotations

STAGES = ("backbone", "liff", "residual", "joint", "filter")
PRECISIONS = ("fp32", "bf16")
