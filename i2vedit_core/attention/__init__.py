"""Attention control for I2VEdit: controller, sites, spatial matching, temporal selector (host-free maths;
the skip-interval forwards live in i2vedit_core/skip.py)."""

from .controller import AttentionController, AttentionPass, MatchSettings, StepBuffer
from .distance import chunked_row_distance, naive_row_distance, row_distance
from .maps import DifferenceMaps
from .matching import difference_mask, matched_attention, threshold_ramp
from .site import AttentionSite, BatchLayout
from .temporal import PRESETS, TemporalSelector

__all__ = ["AttentionController", "AttentionPass", "MatchSettings", "StepBuffer", "chunked_row_distance",
           "naive_row_distance", "row_distance", "DifferenceMaps", "difference_mask", "matched_attention",
           "threshold_ramp", "AttentionSite", "BatchLayout", "PRESETS", "TemporalSelector"]
