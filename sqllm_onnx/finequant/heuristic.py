"""FineQuant's adaptive granularity: one block size per weight matrix, chosen from the weights alone.

The rule (docs/finequant.md explains the choice of thresholds, measured on SmolLM2-135M, Gaussian,
heavy-tailed and planted-outlier matrices):

1. Candidates: the powers of two from `min_block` to `max_block` (default 32..128; MatMulNBits
   takes 16..256 on ORT 1.31's CPU, and its CUDA 4-bit GEMV takes 16..128).
2. Start coarse: the candidate that stores the matrix in the fewest bytes (codes, including the
   padding of a last partial block, plus one scale and one zero point per block), the coarsest on
   ties. For K a multiple of `max_block` that is `max_block`; for K = 576 it is 64 (block 128 would
   pad 576 to 640 values per row and be both larger and less accurate).
3. Refine: with e(B) the relative RTN error ||W - Q_B(W)||_F / ||W||_F at block size B, halve B
   while B > min_block and e(B) > `halving_gain` * e(B / 2).

Why the halving gain: on outlier-free weights the error of min-max RTN grows with a block's range,
which grows only like sqrt(2 ln B) for Gaussian-like values, so halving the block cuts the error
by ~10-16 % (e(B)/e(B/2) ~ 1.10-1.16 at B = 128..32, both for int4 and int8, and 1.08-1.23 on every
SmolLM2-135M projection). When a few outliers set the range of the blocks they fall into, halving
the block frees half of those blocks' weights from the outlier, and the gain approaches
sqrt(2) ~ 1.41 (1.26-1.38 with 0.1-1 % of the weights planted at 20 sigma). The default threshold
1.25 sits between the two regimes (near their geometric mean). Block 16 is not a default candidate:
at int4 it spends 1.25 bits per weight on scales and zero points (0.625 more than block 32), more
than the largest possible gain (sqrt(2), half a bit of error) is worth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sqllm_onnx.finequant.quantize import BLOCK_SIZES, relative_error

DEFAULT_MIN_BLOCK = 32
DEFAULT_MAX_BLOCK = 128
DEFAULT_HALVING_GAIN = 1.25
SCALE_BITS = 16  # scales are stored in fp16 for GPU exports (fp32 on CPU exports: the choice uses fp16 costs)


@dataclass
class BlockChoice:
    block_size: int
    start: int  # the coarse starting block (step 2)
    errors: dict[int, float] = field(default_factory=dict)  # e(B) for every B evaluated
    reason: str = "adaptive"  # "adaptive" or "fixed"


def candidates(min_block: int = DEFAULT_MIN_BLOCK, max_block: int = DEFAULT_MAX_BLOCK) -> list[int]:
    if min_block not in BLOCK_SIZES or max_block not in BLOCK_SIZES or min_block > max_block:
        raise ValueError(f"min_block and max_block must be in {BLOCK_SIZES} with min_block <= max_block "
                         f"(got {min_block}, {max_block})")
    return [b for b in BLOCK_SIZES if min_block <= b <= max_block]


def storage_bits_per_row(K: int, bits: int, block_size: int) -> int:
    """Bits one row of a [N, K] matrix takes: padded codes, one scale and one zero point per block."""
    n_blocks = -(-K // block_size)
    return n_blocks * (block_size * bits + SCALE_BITS + bits)


def coarse_start(K: int, bits: int, blocks: list[int]) -> int:
    """Step 2: the candidate with the smallest storage, the coarsest on ties."""
    return min(sorted(blocks, reverse=True), key=lambda b: storage_bits_per_row(K, bits, b))


def choose_block_size(W: torch.Tensor, bits: int, min_block: int = DEFAULT_MIN_BLOCK,
                      max_block: int = DEFAULT_MAX_BLOCK, halving_gain: float = DEFAULT_HALVING_GAIN) -> BlockChoice:
    """The block size FineQuant uses for W [N, K] (an nn.Linear weight) at `bits` (4 or 8)."""
    if not halving_gain > 1:
        raise ValueError(f"halving_gain must be > 1 (got {halving_gain!r})")
    blocks = candidates(min_block, max_block)
    W = W.detach().to(torch.float32)
    start = coarse_start(int(W.shape[1]), bits, blocks)
    errors: dict[int, float] = {}

    def e(b: int) -> float:
        if b not in errors:
            errors[b] = relative_error(W, bits, b)
        return errors[b]

    block = start
    while block // 2 >= blocks[0] and e(block) > halving_gain * e(block // 2):
        block //= 2
    e(block)
    return BlockChoice(block_size=block, start=start, errors=dict(sorted(errors.items())))


__all__ = ["BlockChoice", "choose_block_size", "candidates", "coarse_start", "storage_bits_per_row",
           "DEFAULT_MIN_BLOCK", "DEFAULT_MAX_BLOCK", "DEFAULT_HALVING_GAIN"]
