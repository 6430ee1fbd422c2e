"""Peak dense bf16 FLOP/s per chip (SPEC section 7) and lookup from a JAX device."""

from __future__ import annotations

PEAK_BF16_FLOPS = {
    "a100": 312e12,
    "h100": 989e12,
    "h100-pcie": 756e12,
    "h800": 989e12,
    "h200": 989e12,
    "v4": 275e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
}

# Substrings of jax Device.device_kind, most specific first.
_KIND_PATTERNS = (
    ("h100 pcie", "h100-pcie"),
    ("h100", "h100"),
    ("h800", "h800"),
    ("h200", "h200"),
    ("a100", "a100"),
    ("tpu v4", "v4"),
    ("tpu v5 lite", "v5e"),
    ("tpu v5e", "v5e"),
    ("tpu v5p", "v5p"),
    ("tpu v5", "v5p"),
    ("tpu v6", "v6e"),
)


def hardware_name(device_kind: str) -> str | None:
    kind = device_kind.lower()
    for pattern, name in _KIND_PATTERNS:
        if pattern in kind:
            return name
    return None


def peak_flops_for(device, override: float = 0.0) -> float | None:
    """Per-device peak; None where unknown (e.g. CPU), so MFU is reported as null rather than invented."""
    if override and override > 0:
        return float(override)
    name = hardware_name(getattr(device, "device_kind", ""))
    return PEAK_BF16_FLOPS.get(name) if name else None
