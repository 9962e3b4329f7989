"""Sharded parameters (FSDP2's DTensors): recognizing them, their local part, their group."""
from __future__ import annotations

import torch

__all__ = ["group_of", "is_dtensor", "local_part"]

_DTENSOR: list = []  # DTensor's class (None without it), imported at the first question


def _dtensor_type() -> type | None:
    """DTensor's class, or ``None`` where torch has none (cached in a list, not by
    ``functools.cache``: dynamo traces this inside compiled steps and warns about caches)."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor or a Parameter holding one."""
    dtensor = _dtensor_type()
    if dtensor is None:  # pragma: no cover
        return False
    if isinstance(t, dtensor):
        return True
    # a Parameter holding a DTensor (``.data`` makes a new alias: only for Parameters)
    return isinstance(t, torch.nn.Parameter) and isinstance(t.data, dtensor)


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local tensor and the number of shards it is one of (1 when not sharded)."""
    if not is_dtensor(t):
        return t, 1
    from torch.distributed.tensor import Shard

    shards = 1
    for mesh_dim, pl in enumerate(t.placements):
        if isinstance(pl, Shard):
            shards *= t.device_mesh.size(mesh_dim)
    return t.to_local(), shards


def group_of(t) -> tuple[object, int]:
    """The process group a DTensor's 1-D mesh spans (``None`` on a larger mesh), and its size."""
    mesh = t.device_mesh
    return (mesh.get_group() if mesh.ndim == 1 else None), mesh.size()
