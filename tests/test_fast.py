"""nitro_ar.fast: swapping drop-ins in and out, parity with the reference, fallback, graph bookkeeping."""
import warnings

import pytest
import torch

import nitro_ar.fast as fast
from factories import TEXT_WIDTH, tiny_ar, tiny_e
from nitro_ar.mmdit import JointTransformerBlock

# One block per group keeps the interpreter runs short; all code paths are still taken.


def _text(batch, seed=0, length=16):
    return torch.randn(batch, length, TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-4):
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


def _same_samples(a, b, tol=1e-5):
    """Sampled latents agree to fp32 rounding, relative to their size (AR sampling feeds each
    step's rounding into the next steps, and random reduced models give large latents)."""
    error = ((a - b).norm() / b.norm()).item()
    assert error < tol, error


def test_accelerate_swaps_and_restore_brings_back():
    model = tiny_ar("gan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_types = [type(m) for m in model.modules()]
    assert fast.accelerate(model, backend="torch") is model
    assert fast.backend_of(model) == "torch"
    assert all(type(b) is fast.FastJointTransformerBlock for g in model.block_groups for b in g)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    fast.restore(model)
    assert [type(m) for m in model.modules()] == ref_types and not fast.is_accelerated(model)
    assert type(model.block_groups[0][0]) is JointTransformerBlock


def test_reference_backend_leaves_model_untouched():
    model = tiny_ar("gan")
    fast.accelerate(model, backend="reference")
    assert not fast.is_accelerated(model)


def test_accelerated_model_saves_the_reference_checkpoint(tmp_path):
    from safetensors.torch import load_file

    model = tiny_ar("joint_gan")
    model.save_official(tmp_path / "ref.safetensors")
    fast.accelerate(model, backend="torch")
    with torch.no_grad():
        model.backbone(torch.randn(1, 256, 32), _text(1))  # uses the fused q/k/v storage
    model.save_official(tmp_path / "fast.safetensors")
    ref, acc = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "fast.safetensors"))
    assert ref.keys() == acc.keys() and all(torch.equal(ref[k], acc[k]) for k in ref)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
@pytest.mark.parametrize("variant", ["gan", "joint_gan"])
def test_backbone_parity(backend, variant):
    model = tiny_ar(variant)
    tokens, text = torch.randn(2, 256, 32), _text(2)
    with torch.no_grad():
        ref = model.backbone(tokens, text)
        fast.accelerate(model, backend=backend)
        _close(model.backbone(tokens, text), ref)


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_nitro_e_parity_with_asa(backend):
    model = tiny_e(asa_pattern=((4, 1), (4, 4), (1, 1)))
    lat, text, t = torch.randn(2, 32, 16, 16), _text(2), torch.tensor([999.0, 3.5])
    with torch.no_grad():
        ref = model(lat, text, t)
        fast.accelerate(model, backend=backend)
        _close(model(lat, text, t), ref)


@pytest.mark.parametrize("variant,kwargs", [("gan", dict(ar_steps=4)), ("joint_gan", dict())])
def test_generate_equals_reference_torch_backend(variant, kwargs):
    model = tiny_ar(variant)
    text, uncond = _text(2), _text(1, seed=1)
    ref = model.generate(text, uncond, generator=torch.Generator().manual_seed(0), **kwargs)
    fast.accelerate(model, backend="torch")
    out = model.generate(text, uncond, generator=torch.Generator().manual_seed(0), **kwargs)
    _same_samples(out, ref)


def test_nitro_e_generate_equals_reference_torch_backend():
    model = tiny_e()
    text, uncond = _text(1), _text(1, seed=1)
    ref = model.generate(text, uncond, steps=3, generator=torch.Generator().manual_seed(0))
    fast.accelerate(model, backend="torch")
    _same_samples(model.generate(text, uncond, steps=3, generator=torch.Generator().manual_seed(0)), ref)


def test_training_gradients_match_reference():
    model = tiny_ar("gan")
    tokens, text = torch.randn(1, 256, 32), _text(1)
    model.backbone(tokens, text).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast.accelerate(model, backend="interpret")
    model.backbone(tokens, text).square().mean().backward()
    for name, grad in ref.items():
        _close(dict(model.named_parameters())[name].grad, grad, 1e-3)


def test_unsupported_dtype_falls_back_with_one_warning():
    model = tiny_ar("gan").double()
    tokens, text = torch.randn(1, 256, 32, dtype=torch.float64), _text(1).double()
    with torch.no_grad():
        ref = model.backbone(tokens, text)
        fast.accelerate(model, backend="interpret")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.backbone(tokens, text)
            model.backbone(tokens, text)
    messages = [str(w.message) for w in caught if "falls back to torch" in str(w.message)]
    assert messages and all("float64" in m for m in messages)
    assert len(messages) == len(set(messages))  # once per op and reason
    _close(out, ref, 1e-9)


def test_works_without_triton_installed():
    """`import nitro_ar.fast` and the torch backend need no Triton (it is an optional dependency)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, nitro_ar.fast\n"
        "from factories import tiny_ar, tiny_e\n"
        "for model, kw in ((tiny_ar('gan'), dict(ar_steps=2)), (tiny_e(), dict(steps=2))):\n"
        "    nitro_ar.fast.accelerate(model, backend='triton')\n"
        "    assert nitro_ar.fast.backend_of(model) == 'torch'\n"
        "    model.generate(torch.randn(1, 16, 48), torch.randn(1, 16, 48), **kw)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                            env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_fused_norm_promotes_mixed_dtypes_as_eager_pytorch():
    """bf16 autocast: an fp32 residual stream meets bf16 branch outputs and modulations. The
    fused norm promotes like eager PyTorch (fp32 here) instead of refusing the mix."""
    from nitro_ar.fast import ops
    from nitro_ar.kernels import reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=g)
    residual, gate, shift, scale = (torch.randn(2, 5, 48, generator=g).bfloat16() for _ in range(4))
    norm = torch.nn.LayerNorm(48, eps=1e-6)
    x_new, out = ops.modulated_norm(x, norm, backend="interpret", residual=residual, gate=gate, shift=shift, scale=scale)
    want_x, want = reference.modulated_norm(x, norm="layer", eps=1e-6, weight=norm.weight, bias=norm.bias, shift=shift,
                                            scale=scale, residual=residual, gate=gate)
    assert x_new.dtype == out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(x_new, want_x, rtol=1e-2, atol=1e-2)  # eager rounds gate * residual to bf16 first
    torch.testing.assert_close(out, want, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("gemm", ["fused", "library"])
@pytest.mark.parametrize("variant", ["gan", "joint_gan", "nitro_e"])
def test_both_gemm_paths_match_the_reference(variant, gemm, monkeypatch):
    """``NITRO_AR_GEMM=library`` keeps the structure with library GEMMs (the one training uses);
    unset, sampling runs the fused-GEMM launches: both give the reference's numbers."""
    from nitro_ar.kernels.backend import ENV_GEMM

    monkeypatch.setenv(ENV_GEMM, gemm)
    if variant == "nitro_e":
        model = tiny_e()
        inputs = (torch.randn(2, 32, 16, 16), _text(2), torch.tensor([999.0, 3.5]))
        run = model
    else:
        model = tiny_ar(variant)
        inputs = (torch.randn(2, 256, 32), _text(2))
        run = model.backbone
    with torch.no_grad():
        ref = run(*inputs)
        fast.accelerate(model, backend="interpret")
        _close(run(*inputs), ref)


def test_kernels_per_image_meet_the_targets():
    """Counted on the meta device at full size, batch 1, the released sampling settings: the
    fused-GEMM path runs a gan image in <= 5,000 kernels, joint_gan in <= 700, a Nitro-E Euler
    step in <= 300; the library-GEMM path runs more; no host sync in either."""
    from nitro_ar.fast.counting import work_per_image

    targets = {"gan": ("kernels_per_image", 5000), "joint_gan": ("kernels_per_image", 700),
               "nitro_e": ("kernels_per_step", 300)}
    for family, (figure, target) in targets.items():
        fused = work_per_image(family, "fast-fused")
        assert fused["backend"] == "triton" and fused[figure] <= target, (family, fused)
        assert fused["host_syncs_per_image"] == 0
    library = work_per_image("joint_gan", "fast-library")
    assert library["kernels_per_image"] > work_per_image("joint_gan", "fast-fused")["kernels_per_image"]
