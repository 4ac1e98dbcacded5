"""Key-step schedules: which denoising steps run the full UNet.

Everything here is a pure function of integers. A *key step* runs the encoder and refreshes the
cache; the steps between two key steps form a *group* that reuses the first one's features.
Step indices count the UNet calls of one sampling run, from 0.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "FASTER_DIFFUSION_KEY_STEPS",
    "NAMED_SCHEDULES",
    "key_steps",
    "decoder_groups",
]

#: Non-uniform key steps published with Faster Diffusion (Li et al., 2023,
#: https://arxiv.org/abs/2312.09608) for DDIM-50 and DPM-Solver++-20, by number of steps.
FASTER_DIFFUSION_KEY_STEPS: dict[int, tuple[int, ...]] = {
    50: (0, 1, 2, 3, 5, 10, 15, 25, 35),
    20: (0, 1, 2, 3, 5, 10, 15),
}

NAMED_SCHEDULES = ("uniform", "faster-diffusion")


def key_steps(
    num_steps: int,
    *,
    stride: int | None = None,
    steps: Sequence[int] | None = None,
    schedule: str = "uniform",
    always_key_first: int = 0,
) -> list[int]:
    """The sorted key-step indices for a run of ``num_steps`` UNet calls.

    Exactly one of the three sources is used: an explicit ``steps`` list, ``schedule=
    "faster-diffusion"`` (the published lists; defined for 20 and 50 steps), or a uniform
    ``stride`` (``0, k, 2k, ...``; "FD-k"). ``always_key_first=n`` additionally makes steps
    ``0..n-1`` key. Step 0 is always key.

    Raises:
        ValueError: a stride below 1, a list that does not start at 0 or leaves ``[0, num_steps)``,
            an unknown schedule name, or a published schedule asked for another step count.

    Example:
        >>> key_steps(10, stride=4)
        [0, 4, 8]
        >>> key_steps(50, schedule="faster-diffusion")
        [0, 1, 2, 3, 5, 10, 15, 25, 35]
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if always_key_first < 0:
        raise ValueError(f"always_key_first must be >= 0, got {always_key_first}")
    if steps is not None:
        keys = sorted(set(int(s) for s in steps))
        if not keys or keys[0] != 0:
            raise ValueError(f"key steps must start at step 0, got {list(steps)}")
        if keys[-1] >= num_steps:
            raise ValueError(
                f"key step {keys[-1]} is out of range for {num_steps} steps; allowed are 0..{num_steps - 1}"
            )
    elif schedule == "faster-diffusion":
        if num_steps not in FASTER_DIFFUSION_KEY_STEPS:
            raise ValueError(
                f"the published Faster Diffusion schedule exists for {sorted(FASTER_DIFFUSION_KEY_STEPS)} "
                f"steps, not {num_steps}; pass an explicit key-step list or a uniform stride instead"
            )
        keys = list(FASTER_DIFFUSION_KEY_STEPS[num_steps])
    elif schedule == "uniform":
        if stride is None:
            raise ValueError("a uniform schedule needs stride=k (k >= 1)")
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
        keys = list(range(0, num_steps, int(stride)))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; allowed are {NAMED_SCHEDULES}")
    keys = sorted(set(keys) | set(range(min(always_key_first, num_steps))))
    return keys


def decoder_groups(
    keys: Sequence[int], num_steps: int, max_parallel_steps: int | None
) -> list[list[int]]:
    """Split the steps into batches whose decoders run together.

    Each key step starts a batch holding itself and the non-key steps after it; a batch holds at
    most ``max_parallel_steps`` steps (``None``: no cap), and a longer group continues in further
    batches that start at a non-key step and reuse the same cached features.

    Example:
        >>> decoder_groups([0, 5], 8, max_parallel_steps=3)
        [[0, 1, 2], [3, 4], [5, 6, 7]]
    """
    if max_parallel_steps is not None and max_parallel_steps < 1:
        raise ValueError(f"max_parallel_steps must be >= 1 or None, got {max_parallel_steps}")
    bounds = list(keys) + [num_steps]
    batches: list[list[int]] = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        group = list(range(start, end))
        cap = len(group) if max_parallel_steps is None else max_parallel_steps
        batches += [group[i : i + cap] for i in range(0, len(group), cap)]
    return batches
