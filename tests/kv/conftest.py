"""kv tests: one intra-op thread (two shared cores; more threads only contend)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
