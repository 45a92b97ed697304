"""The plain-torch reference as a backend (any device; slow, exact by definition)."""

from __future__ import annotations

import torch

from .. import reference
from ..format import FormatSpec


def available(device: torch.device) -> str | None:
    return None


def quantize_into(x, packed, scale, minimum, spec: FormatSpec) -> None:
    p, s, m = reference.quantize(x, spec)
    packed.copy_(p)
    scale.copy_(s)
    minimum.copy_(m)


def dequantize_into(packed, scale, minimum, out, spec: FormatSpec) -> None:
    out.copy_(reference.dequantize(packed, scale, minimum, spec))
