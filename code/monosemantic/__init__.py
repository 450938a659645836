"""monosemantic: sparse autoencoders and monosemantic features, as a reproducible research book."""

import os

# OpenMP threads that sleep between parallel regions instead of spinning. Set before anything imports torch
# (its OpenMP runtime reads it once). With the default (spinning) policy, two torch processes on a 2-core
# machine starve each other: SmolLM2's forward fell from 2,200 to ~220 tokens/s beside one other busy
# process, against ~1,100 tokens/s with PASSIVE; alone, the policy changes nothing measurable (chapter 04).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
