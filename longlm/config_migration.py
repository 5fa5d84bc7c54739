"""Keys of older `config.json` files (and older YAML/preset kwargs) mapped onto today's config.

Until the plug-contract change, two mixers had their own per-layer keys: `knn_layers` (Memorizing
Transformer) and `routing_layers` (Routing Transformer) listed the layers that used that mixer instead of
`mixer`, and `mixer` itself could be a per-layer list. Today one list, `layer_mixers` (Hugging Face's
`layer_types` idea), gives every layer's mixer. This module is the only place that knows the old forms; the config core calls `migrate_config_dict` before anything else.
"""
from __future__ import annotations

from typing import Any

from longlm.options import is_int

# old key -> the mixer it put in the layers it listed
LEGACY_LAYER_KEYS = {"knn_layers": "knn", "routing_layers": "routing"}


def migrate_mixer_list(config: Any) -> bool:
    """A per-layer list given as `mixer` (accepted before `layer_mixers` existed) moves to `layer_mixers`, so
    `mixer` is always one name (the first layer's) and `layer_mixers` the one place per-layer choice lives."""
    names = config.mixer
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(name, str) for name in names):
        return False  # a name, or a bad value the core check names
    if config.layer_mixers is not None and list(config.layer_mixers) != list(names):
        raise ValueError(
            f"LongLMConfig got mixer={list(names)} and layer_mixers={list(config.layer_mixers)}; expected the "
            "per-layer list in layer_mixers alone."
        )
    config.layer_mixers = list(names)
    config.mixer = names[0]
    return True


def migrate_config_dict(kwargs: dict[str, Any], config: Any) -> dict[str, Any]:
    """`kwargs` without the legacy keys, with `config.layer_mixers` set from them or from a list-valued `mixer`
    (one sentence per bad value)."""
    moved = migrate_mixer_list(config)
    legacy = {key: kwargs.pop(key) for key in list(kwargs) if key in LEGACY_LAYER_KEYS}
    legacy = {key: value for key, value in legacy.items() if value}  # None / [] put no mixer anywhere
    if not legacy:
        return kwargs
    layers = config.num_hidden_layers
    if config.layer_mixers is not None and not moved:
        raise ValueError(
            f"LongLMConfig got both layer_mixers and {sorted(legacy)}; expected layer_mixers alone (one mixer per layer)."
        )
    if not (is_int(layers) and layers > 0) or not isinstance(config.mixer, str):
        return kwargs  # the core check names the bad num_hidden_layers / mixer
    types = list(config.layer_mixers) if moved else [config.mixer] * layers
    if len(types) != layers:
        return kwargs  # the core check names the mismatch
    claimed: dict[int, str] = {}
    for key, indices in legacy.items():
        if not isinstance(indices, (list, tuple)) or not all(is_int(i) for i in indices):
            raise ValueError(f"LongLMConfig.{key} must be None or a list of layer indices, got {indices!r}.")
        for index in indices:
            if not 0 <= index < layers:
                raise ValueError(f"LongLMConfig.{key} holds {index!r}, not a layer index in [0, {layers}).")
            if index in claimed:
                raise ValueError(
                    f"LongLMConfig.{claimed[index]} and {key} name the same layer {index}; a layer has one mixer."
                )
            claimed[index] = key
            types[index] = LEGACY_LAYER_KEYS[key]
    config.layer_mixers = types
    return kwargs
