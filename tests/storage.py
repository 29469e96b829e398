"""Storage layouts for the kernel tests: the same values in other memory, differentiable back."""
import torch

LAYOUTS = ("strided", "expanded", "nan-padded")


def in_storage(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``tensor`` in another storage, differentiable back to it:

    - ``strided``: every other slice of a twice-as-long buffer along the first dim (a 1-D
      parameter then has stride 2 over its only dim);
    - ``expanded``: the first slice broadcast with stride 0 along the first dim (values repeat);
    - ``nan-padded``: the middle of a NaN-filled buffer one element larger on every side
      (three on the last dim), so any read outside the view shows.
    """
    if layout == "expanded":
        return tensor[:1].expand_as(tensor)
    if layout == "strided":
        buffer = torch.full((2 * tensor.shape[0], *tensor.shape[1:]), float("nan"), dtype=tensor.dtype,
                            device=tensor.device)
        buffer[::2] = tensor
        return buffer[::2]
    if layout != "nan-padded":
        raise ValueError(f"layout={layout!r} is not accepted: expected one of {LAYOUTS}")
    buffer = torch.full([size + 2 for size in tensor.shape[:-1]] + [tensor.shape[-1] + 4], float("nan"),
                        dtype=tensor.dtype, device=tensor.device)
    middle = tuple(slice(1, 1 + size) for size in tensor.shape)
    buffer[middle] = tensor
    return buffer[middle]
