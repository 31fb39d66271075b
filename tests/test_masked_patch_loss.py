"""fastssl.masked_patch_loss (MAE's pixel loss) vs fastssl.reference.masked_patch_loss and an
fp64 truth; C++ and Triton (interpreter) kernels."""
import pytest
import torch

import fastssl
from fastssl import _ext, reference
from family_helpers import DTYPES
from helpers import assert_close_to_truth, kernels

needs_cpp = pytest.mark.skipif(not _ext.available(), reason=f"no _C: {_ext.why_unavailable()}")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]

# (B, C, H, W, p): B = 1 and 3, C = 1 and 3, p = 1 / 4 / 16 / 32, H != W; p·p·C = 3, 16,
# 768 (> 256, not a power of two) and 3072 (the Triton kernel's chunked path, > 2048).
SHAPES = [(1, 3, 3, 5, 1), (3, 1, 8, 12, 4), (3, 3, 32, 16, 16), (1, 3, 32, 64, 32)]


def _inputs(b, c, h, w, p, *, ratio=0.6, dtype=torch.float64):
    n_patches = (h // p) * (w // p)
    images = torch.randn(b, c, h, w, dtype=dtype) * 2 + 0.5
    pred = torch.randn(b, n_patches, p * p * c, dtype=dtype)
    mask = torch.rand(b, n_patches) < ratio
    mask[0, 0] = True  # at least one predicted patch
    return pred, images, mask


def _run(fn, pred, images, mask, dtype, pred_dtype=None):
    """(loss, dpred) of fn on the fp64 masters cast to dtype (pred to pred_dtype if given)."""
    p = pred.detach().to(pred_dtype or dtype).requires_grad_()
    loss = fn(p, images.to(dtype), mask)
    (g,) = torch.autograd.grad(loss, p)
    return loss, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_vs_fp64_truth(shape, dtype, norm_pix, backend):
    *_, p = shape
    pred, images, mask = _inputs(*shape)
    # Cast the masters once so truth, plain PyTorch and the fused op see the same values.
    pred, images = pred.to(dtype).double(), images.to(dtype).double()
    fused = _run(lambda a, x, m: fastssl.masked_patch_loss(a, x, m, patch_size=p,
                                                           norm_pix=norm_pix, backend=backend),
                 pred, images, mask, dtype)
    ref = lambda a, x, m: reference.masked_patch_loss(a, x, m, patch_size=p,  # noqa: E731
                                                      norm_pix=norm_pix)
    truth = _run(ref, pred, images, mask, torch.float64)
    lowp = _run(ref, pred, images, mask, dtype)
    assert fused[0].dtype == dtype and fused[1].dtype == dtype
    assert_close_to_truth("loss", fused[0], truth[0], lowp[0], dtype)
    assert_close_to_truth("dpred", fused[1], truth[1], lowp[1], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_bf16_pred_fp32_images(backend):
    # MAE under autocast: the decoder's prediction in bf16, the images in fp32.
    pred, images, mask = _inputs(2, 3, 16, 24, 8)
    pred = pred.to(torch.bfloat16).double()
    images = images.float().double()
    loss, g = _run(lambda a, x, m: fastssl.masked_patch_loss(a, x, m, patch_size=8,
                                                             backend=backend),
                   pred, images, mask, torch.float32, pred_dtype=torch.bfloat16)
    truth = _run(lambda a, x, m: reference.masked_patch_loss(a, x, m, patch_size=8),
                 pred, images, mask, torch.float64)
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert_close_to_truth("loss", loss, truth[0], None, torch.float32)
    assert_close_to_truth("dpred", g, truth[1], None, torch.bfloat16)


@needs_cpp
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw"])
def test_cpp_equals_triton_equals_reference(norm_pix):
    pred, images, mask = _inputs(3, 3, 16, 8, 4, dtype=torch.float32)
    out = {}
    for backend in ("cpp", "triton", "reference"):
        with kernels(backend):
            out[backend] = _run(lambda a, x, m: fastssl.masked_patch_loss(
                a, x, m, patch_size=4, norm_pix=norm_pix, backend=backend),
                pred, images, mask, torch.float32)
    for backend in ("cpp", "triton"):
        torch.testing.assert_close(out[backend][0], out["reference"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[backend][1], out["reference"][1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["cpp"][1], out["triton"][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_order_is_maes(backend):
    """Predicting exactly MAE's patchified (normalised) target gives 0: the kernel reads
    the patches in reference.patchify's order, which is checked against the einsum-free
    definition here."""
    b, c, h, w, p = 2, 3, 8, 12, 4
    images = torch.randn(b, c, h, w)
    by_hand = torch.stack([
        torch.stack([images[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0)
                     .reshape(-1) for i in range(h // p) for j in range(w // p)])
        for n in range(b)])
    assert torch.equal(reference.patchify(images, p), by_hand)
    mask = torch.ones(b, (h // p) * (w // p), dtype=torch.bool)
    raw = fastssl.masked_patch_loss(by_hand, images, mask, patch_size=p, norm_pix=False,
                                    backend=backend)
    assert raw.item() == 0.0
    t = by_hand.double()
    normed = ((t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()).float()
    assert fastssl.masked_patch_loss(normed, images, mask, patch_size=p,
                                     backend=backend).item() < 1e-10
    # ... and a prediction off by 1 in one value of one patch costs exactly 1 / (n · #masked).
    off = by_hand.clone()
    off[1, 3, 7] += 1.0
    got = fastssl.masked_patch_loss(off, images, mask, patch_size=p, norm_pix=False,
                                    backend=backend)
    torch.testing.assert_close(got, torch.tensor(1.0 / (p * p * c * mask.sum().item())))


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_all_zero_mask_gives_zero_loss_and_zero_grad(backend):
    pred, images, mask = _inputs(2, 3, 8, 8, 4, dtype=torch.float32)
    pred.requires_grad_()
    for m in (torch.zeros_like(mask), torch.zeros(mask.shape)):
        loss = fastssl.masked_patch_loss(pred, images, m, patch_size=4, backend=backend)
        (g,) = torch.autograd.grad(loss, pred)
        assert loss.item() == 0.0 and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_acts_as_weights(backend):
    pred, images, mask = _inputs(2, 1, 8, 8, 4, dtype=torch.float32)
    as_float = mask.float()
    torch.testing.assert_close(
        fastssl.masked_patch_loss(pred, images, as_float, patch_size=4, backend=backend),
        fastssl.masked_patch_loss(pred, images, mask, patch_size=4, backend=backend))
    weights = torch.rand(mask.shape, dtype=torch.float64) * mask
    truth = _run(lambda a, x, m: reference.masked_patch_loss(a, x, m, patch_size=4),
                 pred.double(), images.double(), weights, torch.float64)
    got = _run(lambda a, x, m: fastssl.masked_patch_loss(a, x, m, patch_size=4,
                                                         backend=backend),
               pred.double(), images.double(), weights.float(), torch.float32)
    assert_close_to_truth("weighted loss", got[0], truth[0], None, torch.float32)
    assert_close_to_truth("weighted dpred", got[1], truth[1], None, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values(backend):
    pred, images, mask = _inputs(1, 3, 8, 8, 4, dtype=torch.float32)
    mask[:] = torch.tensor([True, False, True, False])
    bad = pred.clone()
    bad[0, 1, 5] = float("nan")  # a visible patch: never read
    clean = fastssl.masked_patch_loss(pred, images, mask, patch_size=4, backend=backend)
    torch.testing.assert_close(
        fastssl.masked_patch_loss(bad, images, mask, patch_size=4, backend=backend), clean)
    bad[0, 2, 0] = float("inf")  # a predicted patch
    assert fastssl.masked_patch_loss(bad, images, mask, patch_size=4, backend=backend).isinf()
    img = images.clone()
    img[0, 1, 0, 0] = float("nan")  # in patch 0 (predicted)
    assert fastssl.masked_patch_loss(pred, img, mask, patch_size=4, backend=backend).isnan()


@needs_cpp
def test_cpp_bitwise_equal_at_any_thread_count():
    pred, images, mask = _inputs(4, 3, 32, 32, 8, dtype=torch.float32)
    pred.requires_grad_()
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            loss = fastssl.masked_patch_loss(pred, images, mask, patch_size=8, backend="cpp")
            runs.append((loss, *torch.autograd.grad(loss, pred)))
    finally:
        torch.set_num_threads(before)
    for loss, g in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(g, runs[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    pred, images, mask = _inputs(2, 3, 8, 4, 4, dtype=torch.float32)
    with kernels(backend):
        torch.library.opcheck(torch.ops.fastssl.masked_patch_loss_fwd,
                              (pred.requires_grad_(), images, mask.float(), 4, True, 1e-6))
        torch.library.opcheck(torch.ops.fastssl.masked_patch_loss_fwd,
                              (pred.detach().bfloat16().requires_grad_(), images.half(),
                               mask.float(), 4, False, 1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    pred, images, mask = _inputs(2, 3, 8, 12, 4, dtype=torch.float32)
    a, b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    fn = lambda x: fastssl.masked_patch_loss(x, images, mask, patch_size=4,  # noqa: E731
                                             backend=backend)
    with kernels(backend):
        eager = fn(a)
        eager.backward()
        compiled = torch.compile(fn, fullgraph=True,
                                 backend="inductor" if backend == "cpp" else "aot_eager")(b)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    pred, images, mask = _inputs(1, 1, 4, 4, 2, dtype=torch.float32)
    pred.requires_grad_()
    with kernels(backend):
        loss = fastssl.masked_patch_loss(pred, images, mask, patch_size=2, backend=backend)
        (g,) = torch.autograd.grad(loss, pred, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad((g * g).sum(), pred)


def test_float64_and_meta():
    pred, images, mask = _inputs(2, 3, 8, 8, 4)
    torch.testing.assert_close(
        fastssl.masked_patch_loss(pred, images, mask, patch_size=4),
        reference.masked_patch_loss(pred, images, mask, patch_size=4))
    out = fastssl.masked_patch_loss(pred.float().to("meta"), images.float().to("meta"),
                                    mask.to("meta"), patch_size=4)
    assert out.shape == () and out.device.type == "meta"


def test_module():
    crit = fastssl.MaskedPatchLoss(patch_size=4, norm_pix=False)
    pred, images, mask = _inputs(2, 3, 8, 8, 4, dtype=torch.float32)
    torch.testing.assert_close(crit(pred, images, mask),
                               reference.masked_patch_loss(pred, images, mask, patch_size=4,
                                                           norm_pix=False))
    with pytest.raises(ValueError, match="patch_size"):
        fastssl.MaskedPatchLoss(patch_size=0)
    with pytest.raises(ValueError, match="eps"):
        fastssl.MaskedPatchLoss(patch_size=4, eps=0.0)


def test_bad_inputs():
    pred, images, mask = _inputs(2, 3, 8, 12, 4, dtype=torch.float32)

    def call(p=pred, x=images, m=mask, **kw):
        kw.setdefault("patch_size", 4)
        return fastssl.masked_patch_loss(p, x, m, **kw)

    with pytest.raises(ValueError, match="multiples of patch_size = 5"):
        call(patch_size=5)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        call(x=images[:, :, :7])
    with pytest.raises(ValueError, match=r"pred must have shape \(B, L, p·p·C\) = \(2, 6, 48\)"):
        call(p=pred[:, :5])
    with pytest.raises(ValueError, match=r"pred must have shape"):
        call(p=pred[..., :47])
    with pytest.raises(ValueError, match="pred must be 3-D"):
        call(p=pred.flatten(1))
    with pytest.raises(ValueError, match="images must be 4-D"):
        call(x=images[0])
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L\) = \(2, 6\)"):
        call(m=mask[:, :5])
    with pytest.raises(TypeError, match="mask must be a bool or floating"):
        call(m=mask.long())
    with pytest.raises(TypeError, match="images must be a floating"):
        call(x=(images * 50).clamp(0, 255).to(torch.uint8))
    with pytest.raises(TypeError, match="pred must be a floating"):
        call(p=pred.int())
    with pytest.raises(TypeError, match="patch_size must be an int"):
        call(patch_size=4.0)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        call(patch_size=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        call(eps=0.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        call(eps=float("nan"))
    with pytest.raises(ValueError, match="unbiased variance"):
        fastssl.masked_patch_loss(torch.randn(1, 4, 1), torch.randn(1, 1, 2, 2),
                                  torch.ones(1, 4), patch_size=1)
    with pytest.raises(ValueError, match="same device"):
        call(m=mask.to("meta"))
    with pytest.raises(ValueError, match="no gradient for images"):
        call(x=images.clone().requires_grad_())
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda-please")
    # p·p·C = 1 is fine without norm_pix.
    out = fastssl.masked_patch_loss(torch.randn(1, 4, 1), torch.randn(1, 1, 2, 2),
                                    torch.ones(1, 4), patch_size=1, norm_pix=False)
    assert torch.isfinite(out)
