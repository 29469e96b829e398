"""A CPU stand-in for CUDA/HIP graphs, faithful where lifetime matters.

``capture(region)`` runs the region once under a dispatch mode that records every aten op.
Like a real graph, the recording holds no strong reference to a tensor that existed before the
capture (a CUDA graph holds raw addresses): those are weak references, and a replay that
meets a freed one raises. Temporaries are re-made at every replay. ``replay()`` runs with
dispatch modes disabled, so a launch counter sees one replay, not its ops.
"""
import weakref

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map


class _Made:
    """A tensor produced inside the region (re-made at replay)."""

    def __init__(self, slot):
        self.slot = slot


class _External:
    """A tensor from before the capture, held weakly (and its storage, for liveness checks)."""

    def __init__(self, tensor):
        self.ref = weakref.ref(tensor)
        self.storage = StorageWeakRef(tensor.untyped_storage())
        self.storage_ptr = tensor.untyped_storage().data_ptr()

    def get(self):
        tensor = self.ref()
        if tensor is None or self.storage.expired():
            raise RuntimeError("graph replay reads a tensor freed since the capture")
        return tensor


class _Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.external, self._made, self._keep = [], [], {}, []

    def _encode(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        slot = self._made.get(id(value))
        if slot is not None:
            return _Made(slot)
        external = _External(value)
        self.external.append(external)
        return external

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        encoded = tree_map(self._encode, (args, kwargs))
        out = func(*args, **kwargs)
        slots = []
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._made[id(value)] = len(self._keep)
                slots.append(len(self._keep))
                self._keep.append(value)  # ids stay unique until the capture ends
        self.ops.append((func, encoded, slots))
        return out


class StandInGraph:
    replays = 0  # every replay of every stand-in graph (a test resets it)

    def __init__(self, recording: _Recording):
        self.ops, self.external, self.slots = recording.ops, recording.external, len(recording._keep)

    def replay(self):
        StandInGraph.replays += 1
        values = [None] * self.slots

        def decode(value):
            if isinstance(value, _Made):
                return values[value.slot]
            return value.get() if isinstance(value, _External) else value

        with _disable_current_modes():
            for func, encoded, slots in self.ops:
                args, kwargs = tree_map(decode, encoded)
                out = [v for v in tree_flatten(func(*args, **kwargs))[0] if isinstance(v, torch.Tensor)]
                for slot, value in zip(slots, out):
                    values[slot] = value


class StandInGraphs:
    """Recorder with the interface of :class:`nitro_ar.fast.graphs.CudaGraphs`."""

    def __init__(self, device):
        self.device = device
        self.graphs = []

    def warmup(self, fn):
        return fn()

    def capture(self, region):
        recording = _Recording()
        with recording:
            region()
        graph = StandInGraph(recording)
        self.graphs.append(weakref.ref(graph))
        return graph

    def memory(self):
        return 0
