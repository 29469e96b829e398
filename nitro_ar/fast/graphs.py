"""Graph-captured sampling: replay the backbone pass and each head sampling loop from CUDA/HIP graphs.

At batch 1 a Nitro-AR image is thousands of small kernel launches; replaying captured graphs
removes the launch overhead. ``torch.cuda.CUDAGraph`` works on ROCm too (HIP graphs).

What is captured: :meth:`NitroAR.backbone` per (tokens, text) shape and dtype, and the head's
whole Euler loop (``sample_head``) per (conditions, noise) shape, dtype, schedule and guidance
weight. Random numbers are drawn outside the graphs, in the reference order (the noise is an
input), so results match the eager sampler. Python control flow of the AR loop (masks, which
rows are predicted) stays eager between replays. A capture that fails (e.g. an op that
synchronises with the host) falls back to eager execution for that key, with one warning.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch
from torch import nn

from ..schedules import FlowSchedule

__all__ = ["GraphCache", "enable_graphs", "disable_graphs", "tensor_key"]


def tensor_key(*tensors: torch.Tensor) -> Tuple:
    """The part of a cache key that a tensor input contributes: shape, dtype, device."""
    return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)


@dataclass
class _Entry:
    replay: Callable[[], None]
    inputs: List[torch.Tensor]
    output: torch.Tensor


def _cuda_capture(fn: Callable[..., torch.Tensor], inputs: List[torch.Tensor], warmup: int = 2) -> _Entry:
    """Capture ``fn(*inputs)`` into a CUDA/HIP graph after a few warm-up runs on a side stream."""
    stream = torch.cuda.Stream(inputs[0].device)
    stream.wait_stream(torch.cuda.current_stream(inputs[0].device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*inputs)
    torch.cuda.current_stream(inputs[0].device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(*inputs)
    return _Entry(graph.replay, inputs, output)


@dataclass
class GraphCache:
    """Captured graphs keyed by what changes their shape or constants.

    ``capture`` builds an entry from (fn, static inputs); the default captures a CUDA/HIP graph.
    Tests pass a capture that runs eagerly, to check the bookkeeping on CPU.
    """

    capture: Callable[[Callable[..., torch.Tensor], List[torch.Tensor]], _Entry] = _cuda_capture
    entries: Dict[Hashable, Optional[_Entry]] = field(default_factory=dict)
    captures: int = 0
    replays: int = 0

    def run(self, key: Hashable, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        """``fn(*args)`` through the graph of ``key`` (captured at first use)."""
        if key not in self.entries:
            static = [a.detach().clone() for a in args]
            try:
                self.entries[key] = self.capture(fn, static)
                self.captures += 1
            except RuntimeError as err:  # e.g. a host synchronisation inside fn
                warnings.warn(f"nitro_ar.fast: graph capture failed ({err}); running eagerly for this shape", RuntimeWarning)
                self.entries[key] = None
        entry = self.entries[key]
        if entry is None:
            return fn(*args)
        for buffer, value in zip(entry.inputs, args):
            buffer.copy_(value)
        entry.replay()
        self.replays += 1
        return entry.output.clone()

    def clear(self) -> None:
        self.entries.clear()


def _schedule_on(schedule: FlowSchedule, device: torch.device) -> FlowSchedule:
    # Host-to-device copies are not allowed inside a capture: move the schedule first.
    return FlowSchedule(schedule.timesteps.to(device), schedule.sigmas.to(device))


def _graphed_method(cache: GraphCache, name: str, eager: Callable):
    """A tensor-in, tensor-out method replayed from a graph per input shape (eager with grads)."""

    def method(*args: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return eager(*args)
        return cache.run((name,) + tensor_key(*args), eager, *args)

    return method


def _graphed_sample(cache: GraphCache, net: nn.Module, eager_sample: Callable):
    def sample(z: torch.Tensor, noise: torch.Tensor, schedule: FlowSchedule, cfg: float) -> torch.Tensor:
        if torch.is_grad_enabled():
            return eager_sample(z, noise, schedule, cfg)
        noise = noise.to(device=z.device, dtype=z.dtype)
        on_device = _schedule_on(schedule, z.device)
        key = ("head", id(net), float(cfg), tuple(schedule.timesteps.tolist())) + tensor_key(z, noise)
        return cache.run(key, lambda zz, nn_: eager_sample(zz, nn_, on_device, cfg), z, noise)

    return sample


# Per model class: the tensor-in, tensor-out method that runs the network once.
_GRAPHED_METHODS = {"NitroAR": ("backbone", "global_backbone"), "NitroE": ("forward",)}


def enable_graphs(model: nn.Module, cache: Optional[GraphCache] = None) -> GraphCache:
    """Route the network passes (``NitroAR.backbone`` / ``NitroE.forward``) and the heads'
    sampling loops through captured graphs.

    Instance attributes shadow the methods, so :func:`disable_graphs` simply removes them.
    """
    from ..heads import euler_sample

    disable_graphs(model)
    cache = cache or GraphCache()
    model._nitro_graphs = cache
    for name in _GRAPHED_METHODS.get(type(model).__name__, ()):
        setattr(model, name, _graphed_method(cache, name, types.MethodType(getattr(type(model), name), model)))
    for holder in ("diffloss", "diffloss_global"):
        head = getattr(model, holder, None)
        if head is None:
            continue
        net = head.net
        own = getattr(type(net), "sample", None)
        eager = types.MethodType(own, net) if own is not None else (lambda z, noise, s, cfg, _n=net: euler_sample(_n, z, noise, s, cfg))
        net.sample = _graphed_sample(cache, net, eager)
    return cache


def disable_graphs(model: nn.Module) -> None:
    """Remove the graph routing (and free the captured graphs)."""
    cache = model.__dict__.pop("_nitro_graphs", None)
    if cache is not None:
        cache.clear()
    for name in _GRAPHED_METHODS.get(type(model).__name__, ()):
        model.__dict__.pop(name, None)
    for holder in ("diffloss", "diffloss_global"):
        head = getattr(model, holder, None)
        if head is not None:
            head.net.__dict__.pop("sample", None)
