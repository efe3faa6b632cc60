"""The receive-side replay window (paper section 5.4.6, RFC 6479's bitmap scheme).

Transport counters may arrive out of order, so a receiver keeps a bitmap of the counters seen
near the greatest one. The bitmap is a ring of 64-bit blocks: moving forward zeroes the blocks
passed over instead of shifting the whole map, so an in-order packet costs a few integer ops.
Call `validate` only after the packet has been authenticated: it records the counter.
"""

from __future__ import annotations

from podwire.agent.engine import constants

# Implementation constants: 8192 bits as the kernel's COUNTER_BITS_TOTAL; one block of the ring
# is always being reused, so the usable window is one block smaller.
BLOCK_BITS = 64
TOTAL_BITS = 8192
BLOCKS = TOTAL_BITS // BLOCK_BITS
WINDOW_SIZE = TOTAL_BITS - BLOCK_BITS

_BLOCK_SHIFT = BLOCK_BITS.bit_length() - 1
_BLOCK_MASK = BLOCK_BITS - 1
_RING_MASK = BLOCKS - 1


class ReplayWindow:
    __slots__ = ("_blocks", "_top")

    def __init__(self) -> None:
        # _top is the greatest counter seen plus one, so that 0 can mean "none yet".
        self._top = 0
        self._blocks = [0] * BLOCKS

    def validate(self, counter: int, limit: int = constants.REJECT_AFTER_MESSAGES) -> bool:
        """True if `counter` is fresh (and record it); False for a replay, a counter that fell
        out of the window, or one at or beyond `limit`."""
        if counter >= limit:
            return False
        shifted = counter + 1
        top = self._top
        if shifted + WINDOW_SIZE < top:
            return False
        blocks = self._blocks
        index = shifted >> _BLOCK_SHIFT
        if shifted > top:
            current = top >> _BLOCK_SHIFT
            if index > current:  # blocks passed over are cleared; most packets pass none
                for i in range(current + 1, current + 1 + min(index - current, BLOCKS)):
                    blocks[i & _RING_MASK] = 0
            self._top = shifted
        bit = 1 << (shifted & _BLOCK_MASK)
        slot = index & _RING_MASK
        block = blocks[slot]
        if block & bit:
            return False
        blocks[slot] = block | bit
        return True
