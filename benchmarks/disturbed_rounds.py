"""Whether a benchmark entry's rounds were disturbed: its median far above its fastest round.

Why: on a shared machine a group can be timed while something else runs, and its median then lands in the slow
mode of two. On the AVX2 EPYC (2026-12-06) the 1.5B bf16 8-row ``decode_linear`` group's native rounds took 9.4
ms and then 24-27.5 ms: median 24.4 ms, 2.6x its fastest, where every other entry of that whole-suite run was
within 1.32x. A median alone reads as the kernel's speed, so the summary flags such an entry instead of hiding or
dropping it; rerun the group (``-k``) or trust its interleaved figure.
"""

from __future__ import annotations

# Median over fastest round from which an entry is flagged, read off one whole-suite run's spread (every entry but
# the disturbed one at 1.00-1.32 on the AVX2 EPYC): 1.5 leaves room for a noisy but undisturbed group. The flag only
# adds a warning to the summary; no figure is dropped or changed.
DISTURBED_MEDIAN_OVER_FASTEST = 1.5
MIN_ROUNDS = 3  # with fewer rounds the median is one of at most two times and says nothing of a spread


def disturbed_rounds_note(median: float, fastest: float, rounds: int) -> str | None:
    """A warning for the summary line of an entry whose ``median`` (s) is at least 1.5x its ``fastest`` round
    over ``rounds`` rounds, else None."""
    if rounds < MIN_ROUNDS or fastest <= 0 or median < DISTURBED_MEDIAN_OVER_FASTEST * fastest:
        return None
    return (f"DISTURBED: median {median / fastest:.1f}x its fastest round ({fastest * 1e3:.2f} ms), "
            f"rerun this group")
