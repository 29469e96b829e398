"""nitro_ar.fast.graphs on CPU, with a stand-in graph (tests/graph_standin.py) that, like a
CUDA graph, keeps nothing alive: replay equals eager bit for bit, the cache entry owns every
tensor its graphs touch, LRU eviction, host launches per image, capture failure fallback."""
import gc

import pytest
import torch

from factories import TEXT_WIDTH, tiny_ar, tiny_e
from graph_standin import StandInGraph, StandInGraphs
from nitro_ar.fast.counting import count_launches
from nitro_ar.fast.graphs import GraphCache, disable_graphs, enable_graphs

SHORT = dict(block_groups=(1, 1, 1), sample_size=8)  # 64 tokens: every code path, fast on CPU


def _text(batch, seed=0, length=16):
    return torch.randn(batch, length, TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


def _generate(model, **kwargs):
    return model.generate(_text(1), _text(1, seed=1), generator=torch.Generator().manual_seed(0), **kwargs)


CASES = [("gan", dict(ar_steps=3, head_steps=2)), ("joint_gan", dict(ar_steps=2, head_steps=2, cfg=2.0))]


@pytest.mark.parametrize("variant,kwargs", CASES, ids=[c[0] for c in CASES])
def test_replay_equals_eager_and_captures_once_per_phase(variant, kwargs):
    model = tiny_ar(variant, **SHORT)
    eager = _generate(model, **kwargs)
    cache = enable_graphs(model, GraphCache(StandInGraphs))
    first = _generate(model, **kwargs)
    # Phases: index tensors, starting tokens (joint_gan: the global token), one per AR step.
    phases = 2 + kwargs["ar_steps"]
    assert cache.captures == phases and len(cache.entries) == 1
    second = _generate(model, **kwargs)
    assert cache.captures == phases and cache.replays == 2 * phases
    assert torch.equal(first, eager) and torch.equal(second, eager)
    disable_graphs(model)
    assert "sampling_runner" not in model.__dict__ and not cache.entries


def test_nitro_e_steps_replay():
    model = tiny_e(**SHORT)
    text = _text(1)
    eager = model.generate(text, steps=2, cfg=1.0, generator=torch.Generator().manual_seed(0))
    cache = enable_graphs(model, GraphCache(StandInGraphs))
    for _ in range(2):
        assert torch.equal(model.generate(text, steps=2, cfg=1.0, generator=torch.Generator().manual_seed(0)), eager)
    assert cache.captures == 2 and cache.replays == 4


@pytest.mark.parametrize("variant,kwargs", CASES, ids=[c[0] for c in CASES])
def test_entry_owns_every_tensor_its_graphs_touch(variant, kwargs):
    model = tiny_ar(variant, **SHORT)
    cache = enable_graphs(model, GraphCache(StandInGraphs))
    _generate(model, **kwargs)
    (entry,) = cache.entries.values()
    owned = {t.untyped_storage().data_ptr() for t in list(entry.buffers.values()) + entry.parameters}
    touched = [ext for graph in entry.graphs for ext in graph.external]
    assert touched and all(ext.storage_ptr in owned for ext in touched)
    schedule = entry.buffers[f"sigmas{kwargs['head_steps']}"].untyped_storage().data_ptr()
    assert schedule in {ext.storage_ptr for ext in touched}  # the head's schedule is read on the device
    # Nothing outside the entry keeps anything alive: not the model, inputs or the plan.
    del model
    gc.collect()
    assert all(not ext.storage.expired() for ext in touched)
    for graph in entry.graphs:
        graph.replay()  # reads only what the entry holds (raises on a freed tensor)
    cache.clear()
    del entry, graph
    gc.collect()
    assert [ext.storage_ptr for ext in touched if not ext.storage.expired()] == []


def test_lru_eviction_by_count_and_bytes():
    model = tiny_ar("gan", **SHORT)
    cache = enable_graphs(model, GraphCache(StandInGraphs, max_entries=2))
    for steps in (1, 2, 3):
        _generate(model, ar_steps=steps, head_steps=1)
    assert len(cache.entries) == 2 and cache.evictions == 1
    assert [len(key[0][1].steps) for key in cache.entries] == [2, 3]
    _generate(model, ar_steps=2, head_steps=1)  # a hit moves the entry to the end
    _generate(model, ar_steps=1, head_steps=1)
    assert [len(key[0][1].steps) for key in cache.entries] == [2, 1]
    one_entry = cache.nbytes // 2
    cache.max_bytes = one_entry + one_entry // 2
    _generate(model, ar_steps=3, head_steps=1)
    assert len(cache.entries) == 1 and cache.evictions == 4  # one by count, then one by bytes


def test_new_parameter_storage_is_captured_anew():
    model = tiny_ar("gan", **SHORT)
    cache = enable_graphs(model, GraphCache(StandInGraphs))
    _generate(model, ar_steps=2, head_steps=1)
    with torch.no_grad():
        model.x_proj.weight.data = model.x_proj.weight.data * 2  # new storage: old graphs would read the old one
    out = _generate(model, ar_steps=2, head_steps=1)
    assert len(cache.entries) == 2
    disable_graphs(model)
    eager_after = _generate(model, ar_steps=2, head_steps=1)
    assert torch.equal(out, eager_after)


@pytest.mark.parametrize("variant,kwargs", [("gan", dict(ar_steps=4, head_steps=3)),
                                            ("joint_gan", dict(ar_steps=1, head_steps=2))], ids=["gan", "joint_gan"])
def test_host_launches_per_image_with_graphs(variant, kwargs):
    """With graphs, the host issues one replay per AR step plus a handful of launches (input
    copies, the output copy); the random draws (CPU generator) are host work and counted apart."""
    model = tiny_ar(variant, **SHORT)
    enable_graphs(model, GraphCache(StandInGraphs))
    _generate(model, **kwargs)  # captures
    StandInGraph.replays = 0
    total = count_launches(lambda: _generate(model, **kwargs), "cpu")
    plan = model.sampling_plan(1, **kwargs)
    draws = count_launches(lambda: model._draw(plan, torch.Generator().manual_seed(0), "cpu"), "cpu")
    host = total - draws + StandInGraph.replays
    assert StandInGraph.replays == kwargs["ar_steps"] + 2  # index tensors, starting tokens, each AR step
    # The rest: [uncond; cond] text, the input copies (text, orders, noise, global noise) and
    # the conversions of the drawn numbers, the output copy.
    assert host - StandInGraph.replays <= 8, host


def test_capture_failure_falls_back_to_eager():
    class Failing(StandInGraphs):
        def capture(self, region):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = tiny_ar("joint_gan", **SHORT)
    eager = _generate(model, ar_steps=1, head_steps=2)
    enable_graphs(model, GraphCache(Failing))
    with pytest.warns(RuntimeWarning, match="graph capture failed"):
        out = _generate(model, ar_steps=1, head_steps=2)
    assert torch.equal(out, eager)
    assert torch.equal(_generate(model, ar_steps=1, head_steps=2), eager)
