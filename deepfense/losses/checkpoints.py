"""Loading classifier-head weights trained with other toolkits into our heads.

Where each toolkit keeps the head's class weights (the names and shapes its own state dicts use):

    ===============  ===========================================  =========================  ==================
    toolkit          key                                          shape                      head
    ===============  ===========================================  =========================  ==================
    wespeaker        ``projection.weight`` (ArcMarginProduct,     [C, D]; sub-centre heads   ArcFace, AMSoftmax
                     AddMarginProduct, ..._subcenter)             [C*K, D], class-major
    speechbrain      ``classifier.weight`` (ECAPA_TDNN            [C, D]                     ArcFace, AMSoftmax
                     ``Classifier``; ``weight`` in classifier.ckpt)
    insightface      ``weight`` (Partial FC; one file per rank,   [C_r, D] per rank          CombinedMargin
                     ranks split as ``class_slice``)
    pml              ``W`` (ArcFaceLoss, CosFaceLoss,             [D, C] / [D, C*K]          ArcFace, AMSoftmax,
                     SubCenterArcFaceLoss, SphereFaceLoss)                                   ASoftmax
    ===============  ===========================================  =========================  ==================

Ours is ``mapper.weight`` [D, C*K] (a class's K sub-centre columns adjacent, as WeSpeaker's and
pytorch-metric-learning's), so [C, D] weights are transposed. A prefix such as ``module.`` or ``model.`` is found by
matching the key's end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence, Union

import torch

_KEYS = {"wespeaker": ("projection.weight",), "speechbrain": ("classifier.weight", "weight"),
         "insightface": ("weight",), "pml": ("W",)}
_CLASS_MAJOR = {"wespeaker": True, "speechbrain": True, "insightface": True, "pml": False}


def _find(state: Mapping, toolkit: str, key: Optional[str]) -> torch.Tensor:
    """The head weight in `state`: the exact key, else the one key ending in '.' + key."""
    for name in ((key,) if key else _KEYS[toolkit]):
        if name in state:
            return state[name]
        found = [k for k in state if isinstance(k, str) and k.endswith("." + name)]
        if len(found) > 1:
            raise KeyError(f"{toolkit}: several keys end in {name!r}: {found}; pass key= to choose one")
        if found:
            return state[found[0]]
    raise KeyError(f"{toolkit}: no head weight found under {(key,) if key else _KEYS[toolkit]} (keys: "
                   f"{sorted(map(str, state))[:8]}...); pass key= to name it")


def load_head_weight(head, state: Union[Mapping, Sequence[Mapping]], toolkit: str, *, key: Optional[str] = None):
    """Copy a toolkit's classifier weight into `head.mapper.weight` (in place, no gradient) and return `head`.

    Args:
        head: an `ArcFace`, `CombinedMargin` or `AMSoftmax` (any head with `mapper.weight` [D, C*K]). A head built
            with a process_group takes its own `rank_slice` of the classes from a full weight.
        state: the toolkit's state dict (model or head), or for insightface the per-rank Partial FC state dicts in
            rank order (their slices are concatenated; a sharded head with as many ranks takes its own slice).
        toolkit: 'wespeaker' | 'speechbrain' | 'insightface' | 'pml'.
        key: the weight's key when it is not the toolkit's usual one.

    Raises:
        KeyError: no (or an ambiguous) weight key. ValueError: the shape does not fit the head (the message gives
        both, with the sub-centre count).
    """
    if toolkit not in _KEYS:
        raise ValueError(f"toolkit must be one of {tuple(_KEYS)}, got {toolkit!r}")
    target = head.mapper.weight
    group = getattr(head, "process_group", None)
    k = getattr(head, "sub_centers", 1)
    if isinstance(state, Mapping):
        parts = [_find(state, toolkit, key)]
    else:
        parts = [_find(s, toolkit, key) for s in state]
    parts = [p.detach().t() if _CLASS_MAJOR[toolkit] else p.detach() for p in parts]  # -> [D, cols]
    if group is not None and len(parts) > 1 and len(parts) == torch.distributed.get_world_size(group):
        weight = parts[torch.distributed.get_rank(group)]
    else:
        weight = torch.cat(parts, 1)
        if group is not None and weight.shape[1] == head.n_classes * k:
            from ..distributed import rank_slice
            start, stop = rank_slice(head.n_classes, group)
            weight = weight[:, start * k: stop * k]
    if tuple(weight.shape) != tuple(target.shape):
        raise ValueError(f"{toolkit} head weight gives [D, C*K] = {list(weight.shape)} but {type(head).__name__} "
                         f"holds {list(target.shape)} (embedding_dim {target.shape[0]}, sub_centers {k})")
    with torch.no_grad():
        target.copy_(weight)
    return head
