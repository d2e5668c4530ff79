"""Which engine class runs a loaded bundle: ``KeymapEngine`` when the bundle's encoder is a key map, else
``pipeline.Engine`` (FaceAnonyMixer layer mixing). No I/O: what the bundle's manifest says (the ``EngineConfig``) is
read by ``worker.bundle_config`` and passed in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from worker.algorithm.config import EngineConfig
    from worker.algorithm.engine_base import EngineBase


def build_engine(
    bundle: Any,
    config: EngineConfig | None = None,
    device: torch.device | str | None = None,
) -> EngineBase:
    """The engine for ``bundle`` (a loaded ``worker.models.bundle.ModelBundle``) under ``config`` on ``device``."""
    from worker.algorithm.keymap import KeyMapModel

    if isinstance(getattr(bundle, "encoder", None), KeyMapModel):
        from worker.algorithm.keymap_engine import KeymapEngine

        return KeymapEngine(bundle, config, device)
    from worker.algorithm.pipeline import Engine

    return Engine(bundle, config, device)
