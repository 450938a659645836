"""monosemantic: sparse autoencoders and monosemantic features, as a reproducible research book."""

import os

# OpenMP threads that sleep between parallel regions instead of spinning. Set before anything imports torch
# (its OpenMP runtime reads it once). With the default (spinning) policy, two torch processes on a 2-core
# machine starve each other: beside other busy processes SmolLM2's forward (8 x 256 tokens, bf16, 2 threads)
# ran at 218-456 tokens/s spinning against 1,091-1,188 with PASSIVE (alone on the machine: ~2,200).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
