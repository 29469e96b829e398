"""Device-side index width: the one ``@triton.jit`` helper every kernel widens its offsets with."""
import triton
import triton.language as tl


@triton.jit
def widen(index, INDEX_64: tl.constexpr):
    """``index`` as int64 when the launch plan asks for 64-bit offsets, else unchanged (int32).

    Applied to the row / batch / position indices before they meet a stride, so every product
    ``index * stride`` (and sum of them) is computed in the plan's width.
    """
    if INDEX_64:
        index = index.to(tl.int64)
    return index
