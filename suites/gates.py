"""Quality and memory gates: every threshold that can fail a run lives here.

Each threshold sits just above (or below) the value measured on the default model with its
uncertainty; the measured value is written beside it, so a regression fails the run. Gates are
two-sided where a result can be too good to be true: a K4/V2 cache whose KLD is at the noise
floor is not compressing.
"""

from __future__ import annotations

# ---- memory (ratio of bytes held to an fp16 cache of the same tokens) -------------------------
# Plain K4/V2 (no sinks, no window), head_dim 64 or 128: 52/256 = 0.2031 measured at every context.
PLAIN_K4V2_RATIO = (0.19, 0.21)


def check_memory(config, ratio: float, context: int) -> None:
    if config.sinks == 0 and config.window == 0 and (config.bits_k, config.bits_v) == (4, 2):
        lo, hi = PLAIN_K4V2_RATIO
        assert lo <= ratio <= hi, f"plain K4/V2 holds {ratio:.4f} x fp16, expected {lo}..{hi}"
