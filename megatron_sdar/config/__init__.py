"""Hydra configuration: the YAML config groups beside this file, the ``algo`` group made from the
objective's presets, and the typed schema (:mod:`megatron_sdar.config.schema`)."""
from megatron_sdar.config.schema import register_algo_presets

register_algo_presets()
