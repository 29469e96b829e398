"""Graph-captured sampling: every phase of a sampling plan replayed from one CUDA/HIP graph.

At batch 1 a Nitro-AR image is thousands of small kernel launches; replaying captured graphs
removes the launch overhead. ``torch.cuda.CUDAGraph`` works on ROCm too (HIP graphs).

What is captured: the phases that :meth:`NitroAR.generate` and :meth:`NitroE.generate` run
through their session (:class:`nitro_ar.nitro_ar_model.EagerSession` is the eager one): the
index tensors of the plan; joint_gan's global token (its backbone pass and head loop); each AR
step whole (backbone on [uncond; cond], the head's whole Euler loop with CFG, the token
scatter); each Nitro-E Euler step. One cache entry per (model, plan, input shapes): a plan
fixes the batch and every step's shape, so each step is captured once per plan. Steps are
not padded to shared shapes: a GEMM over more rows may pick another kernel on the GPU and
round differently, and the results must not depend on whether graphs are on.

Lifetime by construction: a phase reads only its session's ``buffers`` (static inputs, the
schedules on the device, index tensors, phase outputs) and the model's parameters, and the
entry owns all of them (``GraphEntry.buffers``, ``GraphEntry.parameters``), so nothing a graph
reads or writes is freed while the entry lives. Phases write new buffers, never the ones they
read (the AR loop alternates two token buffers), so the warm-up runs before a capture leave the
state as it was. Random numbers are inputs, drawn in the reference order, so results match the
eager sampler.

Host work per image with graphs: one copy per input (text, orders, noise, the global token's
noise), one replay per phase (ar_steps + 1, + 1 for joint_gan's global token), and the final
copy out. The cache is least-recently-used, bounded by entry count and bytes (static buffers +
graph memory pool). A capture that fails (e.g. an op that synchronises with the host) makes
that entry run eagerly, with one warning.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["GraphCache", "GraphEntry", "GraphSession", "CudaGraphs", "HostSyncs", "enable_graphs", "disable_graphs",
           "tensor_key"]

aten = torch.ops.aten
# Ops whose result (or output size) the host must wait for: a host synchronisation on a GPU.
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default,
    aten.is_nonzero.default, aten.equal.default, aten.allclose.default, aten._unique2.default,
    aten.unique_consecutive.default, aten.unique_dim.default, aten.masked_scatter.default,
    aten.repeat_interleave.Tensor, aten.bincount.default,
}
# Ops that sync when one of their index tensors is boolean (the output size depends on data).
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostSyncs(TorchDispatchMode):
    """Counts the ops of a region that make the host wait for the device (``.item()``,
    ``int(tensor)``, ``nonzero``, ``masked_select``, indexing or ``index_put`` with a boolean
    mask, ...); with ``strict=True`` the first one raises ``AssertionError`` naming it.

    ``device``: count only ops reading a tensor on this device type (e.g. "cuda", or "meta"
    for a model run on the meta device), so host math on CPU tensors is not counted; None
    (the CPU tests) counts every op.
    """

    def __init__(self, strict: bool = False, device: Optional[str] = None):
        super().__init__()
        self.strict, self.device, self.syncs, self.ops = strict, device, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        syncs = func in SYNC_OPS or (func in INDEX_OPS and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in _indices(func, args, kwargs)))
        if syncs and self.device is not None:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            syncs = any(t.device.type == self.device for t in tensors)
        if syncs:
            self.syncs += 1
            self.ops.append(str(func))
            if self.strict:
                raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **kwargs)


def _indices(func, args, kwargs) -> Sequence:
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return [t for t in indices if t is not None]


def tensor_key(*tensors: torch.Tensor) -> Tuple:
    """The part of a cache key that a tensor input contributes: shape, dtype, device."""
    return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)


class CudaGraphs:
    """Captures the phases of one cache entry into CUDA/HIP graphs sharing one memory pool
    (they replay in capture order, so a later graph may reuse an earlier one's temporaries)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.pool = torch.cuda.graph_pool_handle()

    def warmup(self, fn: Callable[[], object]):
        """Run ``fn`` on a side stream (lazy initialisation happens outside the capture)."""
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            result = fn()
        current.wait_stream(stream)
        return result

    def capture(self, region: Callable[[], None]):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            region()
        return graph

    def memory(self) -> int:
        """Bytes the device's allocator holds (the pool's growth is measured around captures)."""
        return torch.cuda.memory_reserved(self.device)


class GraphEntry:
    """One captured sampling plan; owns every tensor its graphs read or write.

    ``buffers``: static inputs (copied into on each call), constants (schedules on the device),
    index tensors and phase outputs. ``parameters``: the model's parameters and buffers at
    capture time. ``graphs[i]`` replays phase i, which wrote ``outputs[i]``.
    """

    def __init__(self, buffers: Dict[str, torch.Tensor], parameters: List[torch.Tensor], recorder):
        self.buffers, self.parameters, self.recorder = buffers, parameters, recorder
        self.graphs: List[object] = []
        self.outputs: List[Tuple[str, ...]] = []
        self.pool_bytes = 0
        self.failed = False

    @property
    def nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.buffers.values()}
        return sum(storages.values()) + self.pool_bytes


class GraphSession:
    """The graph-replaying counterpart of :class:`nitro_ar.nitro_ar_model.EagerSession`:
    phase i is captured at its first use and replayed afterwards."""

    def __init__(self, cache: "GraphCache", entry: GraphEntry):
        self.cache, self.entry, self.position = cache, entry, 0

    @property
    def buffers(self) -> Dict[str, torch.Tensor]:
        return self.entry.buffers

    def phase(self, fn: Callable[[Dict[str, torch.Tensor]], object], out: Union[str, Sequence[str]], *,
              fresh: bool = False):
        """``fn(buffers)`` stored under ``out`` (replayed, or captured now); ``fresh`` returns
        copies (buffers are overwritten by the next call)."""
        single = isinstance(out, str)
        names = (out,) if single else tuple(out)
        entry, index = self.entry, self.position
        self.position += 1
        if not entry.failed and index < len(entry.graphs):
            if entry.outputs[index] != names:
                raise RuntimeError(f"phase {index} writes {names}, captured as {entry.outputs[index]}")
            entry.graphs[index].replay()
            self.cache.replays += 1
        elif not entry.failed:
            try:
                self._capture(fn, names, single)
            except RuntimeError as err:  # e.g. a host synchronisation inside fn
                warnings.warn(f"nitro_ar.fast: graph capture failed ({err}); running eagerly for this plan",
                              RuntimeWarning)
                entry.failed, entry.graphs, entry.outputs = True, [], []
                self._eager(fn, names, single)
        else:
            self._eager(fn, names, single)
        results = tuple(entry.buffers[name] for name in names)
        results = tuple(t.clone() for t in results) if fresh else results
        return results[0] if single else results

    def _eager(self, fn, names, single: bool) -> None:
        results = fn(self.entry.buffers)
        self.entry.buffers.update(zip(names, (results,) if single else results))

    def _capture(self, fn, names, single: bool) -> None:
        entry = self.entry
        before = entry.recorder.memory()
        first = entry.recorder.warmup(lambda: fn(entry.buffers))
        first = (first,) if single else tuple(first)
        for name, value in zip(names, first):  # static outputs, allocated outside the graph's pool
            held = entry.buffers.get(name)
            if held is None:
                entry.buffers[name] = torch.empty(value.shape, dtype=value.dtype, device=value.device)
            elif (held.shape, held.dtype) != (value.shape, value.dtype):  # earlier graphs use the one held
                raise RuntimeError(f"phase output {name!r} {tuple(value.shape)} {value.dtype} does not fit its "
                                   f"buffer {tuple(held.shape)} {held.dtype}")
        del first

        def region() -> None:
            results = fn(entry.buffers)
            for name, value in zip(names, (results,) if single else results):
                entry.buffers[name].copy_(value)

        graph = entry.recorder.capture(region)
        entry.graphs.append(graph)
        entry.outputs.append(names)
        entry.pool_bytes += max(0, entry.recorder.memory() - before)
        self.cache.captures += 1
        graph.replay()
        self.cache.replays += 1
        self.cache.evict()


class GraphCache:
    """Captured sampling plans, least recently used first out.

    Args:
        recorder: ``recorder(device)`` makes an entry's graph recorder (``warmup(fn)``,
            ``capture(region) -> graph with replay()``, ``memory()``); default
            :class:`CudaGraphs`. Tests pass a CPU stand-in.
        max_entries, max_bytes: bounds; the least recently used entries are dropped beyond
            them (the entry in use is kept even when it alone exceeds ``max_bytes``).
    """

    def __init__(self, recorder: Callable[[torch.device], object] = CudaGraphs, *, max_entries: int = 8,
                 max_bytes: int = 4 << 30):
        self.recorder, self.max_entries, self.max_bytes = recorder, max_entries, max_bytes
        self.entries: "OrderedDict[Hashable, GraphEntry]" = OrderedDict()
        self.captures = self.replays = self.evictions = 0

    def session(self, model: nn.Module, key: Hashable, inputs: Dict[str, torch.Tensor],
                constants: Callable[[], Dict[str, torch.Tensor]]) -> GraphSession:
        """The session of ``key`` for these inputs: copies them into the entry's static buffers
        (a new entry is made, with ``constants()``, for a new key, shape or parameter storage)."""
        tensors = list(model.parameters()) + list(model.buffers())
        key = (key, tuple(inputs), tensor_key(*inputs.values()), tuple(t.data_ptr() for t in tensors))
        entry = self.entries.get(key)
        if entry is None:
            device = next(iter(inputs.values())).device
            buffers = {name: value.clone() for name, value in inputs.items()}
            buffers.update(constants())
            entry = self.entries[key] = GraphEntry(buffers, tensors, self.recorder(device))
        else:
            self.entries.move_to_end(key)
            for name, value in inputs.items():
                entry.buffers[name].copy_(value)
        self.evict()
        return GraphSession(self, entry)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def evict(self) -> None:
        """Drop least recently used entries until both bounds hold (the newest always stays)."""
        while len(self.entries) > 1 and (len(self.entries) > self.max_entries or self.nbytes > self.max_bytes):
            self.entries.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        self.entries.clear()


def enable_graphs(model: nn.Module, cache: Optional[GraphCache] = None) -> GraphCache:
    """Run the sampling phases of ``model.generate`` (``NitroAR`` / ``NitroE``) through
    captured graphs: sets ``model.sampling_runner`` (the model's methods are untouched)."""
    disable_graphs(model)
    model.sampling_runner = cache or GraphCache()
    return model.sampling_runner


def disable_graphs(model: nn.Module) -> None:
    """Back to eager sampling (the captured graphs are freed)."""
    cache = model.__dict__.pop("sampling_runner", None)
    if cache is not None:
        cache.clear()
