"""Sampler presets of the released models (SPEC section 4)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    guidance: float

    @property
    def use_cfg(self) -> bool:
        """Guidance 1 is the conditional velocity alone: no unconditional pass (one model row per image)."""
        return self.guidance != 1.0


PRESETS: dict[str, Preset] = {
    "lens": Preset("lens", 20, 5.0),
    "turbo": Preset("turbo", 4, 1.0),
    "base": Preset("base", 50, 5.0),
}
DEFAULT_PRESET = "lens"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
