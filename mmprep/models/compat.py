"""Calling transformers across its versions: from_pretrained's dtype argument, and its log level for a block.

The bottom of `models/`: it imports no other mmprep module, so every module that loads or builds a model
(the families, `builtin`, `source`) can use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """Lower transformers' log level to errors for a block: its load report while loading a part of a checkpoint
    (we check missing keys ourselves), its backend notes while building a builtin model."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
