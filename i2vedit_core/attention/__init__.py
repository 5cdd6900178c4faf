"""Attention control for I2VEdit: controller, sites, spatial matching, temporal selector, skip-interval."""

from .controller import AttentionController, AttentionPass, MatchSettings, StepBuffer
from .distance import chunked_row_distance, naive_row_distance, row_distance
from .maps import DifferenceMaps
from .matching import difference_mask, matched_attention, threshold_ramp
from .site import AttentionSite, BatchLayout
from .skip import KVSource, SkipInterval, capture_clip0_kv
from .temporal import PRESETS, TemporalSelector

__all__ = ["AttentionController", "AttentionPass", "MatchSettings", "StepBuffer", "chunked_row_distance",
           "naive_row_distance", "row_distance", "DifferenceMaps", "difference_mask", "matched_attention",
           "threshold_ramp", "AttentionSite", "BatchLayout", "KVSource", "SkipInterval", "capture_clip0_kv",
           "PRESETS", "TemporalSelector"]
