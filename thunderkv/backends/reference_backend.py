"""The plain-torch reference as a backend (any device; slow, exact by definition)."""

from __future__ import annotations

import torch

from .. import reference


def available(device: torch.device) -> str | None:
    return None


def quantize_into(x, packed, scale, minimum, bits: int, group_size: int) -> None:
    codes, s, m = reference.quantize_groups(x, bits, group_size)
    packed.copy_(reference.pack_codes(codes, bits))
    scale.copy_(s)
    minimum.copy_(m)


def dequantize_into(packed, scale, minimum, out, bits: int, group_size: int) -> None:
    codes = reference.unpack_codes(packed, bits)
    out.copy_(reference.dequantize_groups(codes, scale, minimum, group_size))
