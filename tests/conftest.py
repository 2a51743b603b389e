"""Test session setup: Triton kernels run on the CPU interpreter when there is no GPU. The variable
must be set before anything imports triton, hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
