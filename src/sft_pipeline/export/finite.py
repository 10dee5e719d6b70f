"""The last gate before weights ship: a merged or exported tensor must hold only finite values.

Training stops at the first non-finite step (`sft_pipeline.trainer.guard`), but an adapter or a
full model can still arrive with NaN or infinite weights (trained elsewhere, or a base that
already held them); merging or exporting them would ship a model that answers nothing.
"""

from __future__ import annotations

from typing import Any

from sft_pipeline.common.errors import NonFiniteWeightsError

_BLOCK = 1 << 22  # elements per finiteness check


def require_finite(tensor: Any, name: str, where: str) -> None:
    """Raise `NonFiniteWeightsError` naming `name` (in `where`) when `tensor` (torch or numpy)
    holds NaN or +-inf; integer tensors (quantization codes) pass."""
    import numpy as np

    if hasattr(tensor, "is_floating_point"):
        if not tensor.is_floating_point():
            return
        import torch

        # In blocks: `isfinite` makes temporaries of its input's size, and the merge checks a
        # tensor at a time to keep its peak memory at about one tensor.
        flat = tensor.reshape(-1)
        blocks = flat.split(_BLOCK)
        if all(bool(torch.isfinite(b).all()) for b in blocks):
            return
        nan = sum(int(torch.isnan(b).sum()) for b in blocks)
        bad = sum(int((~torch.isfinite(b)).sum()) for b in blocks)
    else:
        array = np.asarray(tensor)
        if not np.issubdtype(array.dtype, np.floating):
            return
        finite = np.isfinite(array)
        if finite.all():
            return
        nan = int(np.isnan(array).sum())
        bad = int((~finite).sum())
    raise NonFiniteWeightsError(
        f"{where}: tensor {name!r} holds {bad} non-finite value(s) ({nan} NaN, {bad - nan} "
        "infinite); refusing to write a model with them. Retrain from a finite base (the "
        "training guard stops a run whose loss or gradients turn non-finite), or check the "
        "base model's weights"
    )


def require_finite_model(model: Any, where: str) -> None:
    """`require_finite` over every parameter and buffer of a loaded model."""
    for name, tensor in model.state_dict().items():
        require_finite(tensor, name, where)
