"""``tq_core.patch(model, ...)`` / ``tq_core.unpatch(model)`` for transformers and mlx-lm models."""

from __future__ import annotations

import sys

from ..config import CacheConfig

_ATTR = "_tq_patched"


def _integration(model):
    """The integration module of ``model``'s host library; one TypeError for anything else (a
    tokenizer, a layer, a base model without its head, ...)."""
    if "mlx.core" in sys.modules and _is_mlx(model):
        from . import mlx_lm

        return mlx_lm
    if "transformers" in sys.modules:
        from . import hf

        if hf.is_model(model):
            return hf
    raise TypeError(f"model must be a transformers PreTrainedModel or an mlx-lm model, "
                    f"got {type(model).__module__}.{type(model).__name__}")


def _is_mlx(model) -> bool:
    import mlx.nn as nn

    return isinstance(model, nn.Module)


def patch(model, bits_k: int = 4, bits_v: int = 2, *, config: CacheConfig | str | None = None, **fields):
    """Make the host library's normal generate use a compressed cache, with attention over its codes.

    Args:
        model: a transformers ``PreTrainedModel`` or an mlx-lm model.
        bits_k, bits_v, **fields: the ``CacheConfig`` (sinks, window, seed, method, ...); or
        config: a ``CacheConfig`` or its label (e.g. ``"K4V2+s4w128"``) instead.
    Returns the model. Patching a patched model replaces its config. Anything that is not a model
    that generates (a tokenizer, a layer, a base model without its head) is refused with a
    TypeError, and a config the model's head size cannot take with a ValueError, before anything
    is changed.
    """
    unknown = sorted(set(fields) - set(CacheConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"patch() got {unknown[0]!r}, which is not a CacheConfig field "
                        f"(fields: {', '.join(CacheConfig.__dataclass_fields__)})")
    if config is None:
        config = CacheConfig(bits_k=bits_k, bits_v=bits_v, **fields)
    elif fields or (bits_k, bits_v) != (4, 2):
        raise TypeError("give either config= or the CacheConfig fields, not both")
    elif isinstance(config, str):
        config = CacheConfig.parse(config)
    elif not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a CacheConfig or its label, got {type(config).__name__}")
    integration = _integration(model)
    integration.check_model(model, config)  # before anything changes: a refused patch keeps the old one
    if getattr(model, _ATTR, None) is not None:
        unpatch(model)
    state = integration.patch(model, config)
    object.__setattr__(model, _ATTR, (config, state))
    return model


def unpatch(model):
    """Undo :func:`patch`; a model that is not patched is returned unchanged."""
    patched = getattr(model, _ATTR, None)
    if patched is None:
        return model
    _integration(model).unpatch(model, patched[1])
    object.__delattr__(model, _ATTR)
    return model


def patched_config(model) -> CacheConfig | None:
    """The ``CacheConfig`` a model is patched with, or ``None``."""
    patched = getattr(model, _ATTR, None)
    return None if patched is None else patched[0]
