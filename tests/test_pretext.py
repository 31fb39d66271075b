"""fastssl.pretext: pretext-task views (rotation, jigsaw, colorization, inpainting, denoising,
MAE masking) and DINO multi-crop.

* the C++ kernel and the Triton kernels (interpreter, small odd sizes) equal the reference;
* targets correct by construction: rotating back by the label gives the upright view, jigsaw
  tiles put back by the inverse permutation give the grid, the mask ratio is exact per row,
  ids_restore inverts the shuffle, the erased box / noise are where and what they claim;
* determinism under a seeded generator; bad input raises before any kernel runs.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastssl
from fastssl import _ext, augment, pretext, reference
from fastssl.pretext import (MultiCropAugment, PretextAugment, jigsaw_permutations, mae_mask,
                             pretext_noise)

needs_cpp = pytest.mark.skipif(not _ext.has_op("ssl_augment"),
                               reason=f"C++ extension: {_ext.why_unavailable()}")
needs_cpp_mae = pytest.mark.skipif(not _ext.has_kernel("mae_mask", "CPU"),
                                   reason=f"C++ extension: {_ext.why_unavailable()}")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "triton"]
MAE_BACKENDS = [pytest.param("cpp", marks=needs_cpp_mae), "triton"]
needs_cpp_noise = pytest.mark.skipif(not _ext.has_kernel("pretext_noise", "CPU"),
                                     reason=f"C++ extension: {_ext.why_unavailable()}")
NOISE_BACKENDS = [pytest.param("cpp", marks=needs_cpp_noise), "triton"]
UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
TOL = 1e-5  # the augmentation kernels' agreement with the reference in [0, 1] (test_augment)
# Every colour op on, so that rotation / tiles go through every kernel path (incl. the blur).
ALL_ON = augment.AugmentRecipe(crop_scale=(0.2, 1.0), flip_p=0.5, jitter_p=1.0, gray_p=0.3,
                               blur_p=1.0, blur_kernel_frac=0.3, solarize_p=0.5)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(b=5, hw=(23, 19), seed=0):
    return torch.randint(0, 256, (b, 3, *hw), dtype=torch.uint8, generator=_gen(seed))


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------
# rotation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", [None, ALL_ON])
def test_rotation_matches_reference(backend, recipe):
    x = _images(6)
    aug = PretextAugment(13, "rotation", recipe, **UNIT, backend=backend, generator=_gen(1))
    params = aug.sample(x)
    params.label = torch.tensor([0, 1, 2, 3, 1, 3])  # every k, whatever was drawn
    views, label = aug.apply(x, params)
    ref = augment.apply(x, params.aug, 13, **UNIT, backend="reference", rot=params.label)
    assert views.shape == (6, 3, 13, 13) and label.tolist() == [0, 1, 2, 3, 1, 3]
    assert _max_diff(views, ref) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_rotation_plane_store(backend, out_dtype):
    """rot 1 / 3 views without blur are stored plane by plane (C++: 16-row blocks, fp32 8 x 8
    register transposes, scalar ragged edges): 37 = 2 x 16 + 5 rows, 4 x 8 + 5 columns; with
    and without the contrast pass (jitter)."""
    x = _images(8, hw=(45, 41))
    jitter = augment.AugmentRecipe(crop_scale=(0.3, 1.0), jitter_p=1.0, gray_p=0.0, blur_p=0.0)
    for recipe in (None, jitter):
        aug = PretextAugment(37, "rotation", recipe, **UNIT, backend=backend,
                             out_dtype=out_dtype, generator=_gen(40))
        params = aug.sample(x)
        params.label = torch.tensor([1, 3, 1, 3, 0, 2, 3, 1])
        views, _ = aug.apply(x, params)
        upright = augment.apply(x, params.aug, 37, **UNIT, out_dtype=out_dtype,
                                backend=backend)
        for b, k in enumerate(params.label.tolist()):
            assert torch.equal(views[b], torch.rot90(upright[b], k, dims=(-2, -1))), (b, k)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_rotating_back_gives_the_view(backend):
    x = _images(8, hw=(31, 26))
    aug = PretextAugment(15, "rotation", ALL_ON, **UNIT, backend=backend, generator=_gen(2))
    params = aug.sample(x)
    views, k = aug.apply(x, params)
    upright = augment.apply(x, params.aug, 15, **UNIT, backend=backend)
    assert set(k.tolist()) <= {0, 1, 2, 3}
    for b in range(8):  # the same kernel, rotation only in the store index: bit-exact
        assert torch.equal(torch.rot90(views[b], -int(k[b]), dims=(-2, -1)), upright[b])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_rotation_low_precision(backend, out_dtype):
    x = _images(4)
    aug = PretextAugment(9, "rotation", ALL_ON, out_dtype=out_dtype, generator=_gen(3),
                         backend=backend)
    params = aug.sample(x)
    views, k = aug.apply(x, params)
    upright = augment.apply(x, params.aug, 9, out_dtype=out_dtype, backend=backend)
    assert views.dtype == out_dtype
    for b in range(4):
        assert torch.equal(torch.rot90(views[b], -int(k[b]), dims=(-2, -1)), upright[b])


def test_rotation_labels_uniform():
    aug = PretextAugment(8, "rotation", backend="reference", generator=_gen(4))
    labels = torch.cat([aug.sample(_images(64, hw=(9, 9))).label for _ in range(16)])
    counts = torch.bincount(labels, minlength=4)
    assert counts.min() > 180 and counts.max() < 330  # 1024 draws, p = 1/4 each


# ---------------------------------------------------------------------------------------
# jigsaw
# ---------------------------------------------------------------------------------------


def test_permutation_set():
    perms = jigsaw_permutations(9, 100)
    assert perms.shape == (100, 9) and perms.dtype == torch.int64
    assert perms[0].tolist() == list(range(9))
    assert torch.equal(perms.sort(dim=1).values, torch.arange(9).expand(100, 9))
    dist = (perms[:, None] != perms[None]).sum(-1)
    dist.fill_diagonal_(9)
    # Noroozi & Favaro's maximal-Hamming set of 100 3x3 permutations: minimum distance 6 here
    # (greedy), every pair distinct.
    assert int(dist.min()) >= 6
    assert torch.equal(perms, jigsaw_permutations(9, 100))  # deterministic (and a copy)
    perms[0, 0] = 5
    assert jigsaw_permutations(9, 100)[0, 0] == 0
    # A prefix of a larger set: the greedy choice does not depend on the count.
    assert torch.equal(jigsaw_permutations(9, 30), jigsaw_permutations(9, 100)[:30])
    small = jigsaw_permutations(4, 24)
    assert len({tuple(r) for r in small.tolist()}) == 24  # all 4! of 2x2


def test_shipped_permutation_set():
    """The default set is read from the package's data file; the selection algorithm
    regenerates it exactly (so neither can drift from the other), and sets the file does not
    cover are generated."""
    shipped = pretext._load_shipped_permutations()
    assert torch.equal(pretext._generate_permutations(9, 100), shipped)
    assert torch.equal(jigsaw_permutations(9, 100), shipped)
    assert torch.equal(jigsaw_permutations(9, 7), shipped[:7])
    assert torch.equal(jigsaw_permutations(9, 101)[:100], shipped)  # generated, same prefix


@pytest.mark.parametrize("backend", BACKENDS)
def test_jigsaw_matches_reference(backend):
    x = _images(3, hw=(29, 33))
    aug = PretextAugment(21, "jigsaw", ALL_ON, **UNIT, backend=backend, generator=_gen(5),
                         num_permutations=10)
    params = aug.sample(x)
    tiles, label = aug.apply(x, params)
    assert tiles.shape == (3, 9, 3, 6, 6) and aug.tile_size == 6
    ref = augment.apply([im for im in x for _ in range(9)], params.tile_aug, 6, **UNIT,
                        backend="reference")
    assert _max_diff(tiles.reshape(27, 3, 6, 6), ref) <= TOL
    assert 0 <= int(label.min()) and int(label.max()) < 10


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_jigsaw_inverse_permutation_gives_the_grid(backend):
    # Whole-image crops, tiles as large as the cells and cells of whole pixels at scale 1:
    # every tile is an exact copy of its cell, so the tiles put back in cell order (the
    # inverse permutation) are the image itself.
    g, cell = 3, 7
    x = _images(4, hw=(g * cell, g * cell), seed=6)
    whole = augment.AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                                  jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    aug = PretextAugment(g * cell, "jigsaw", whole, **UNIT, backend=backend, generator=_gen(7),
                         tile_size=cell)
    tiles, label = aug.apply(x, aug.sample(x))
    perms = jigsaw_permutations(9, 100)
    for b in range(4):
        perm = perms[label[b]]
        in_cell_order = tiles[b][torch.argsort(perm)]  # slot p holds cell perm[p]
        grid = in_cell_order.view(g, g, 3, cell, cell).permute(2, 0, 3, 1, 4)
        assert torch.equal(grid.reshape(3, g * cell, g * cell), x[b].float() / 255.0)
        # and slot p is cell perm[p] itself
        p = 4
        r, c = divmod(int(perm[p]), g)
        assert torch.equal(tiles[b, p], x[b, :, r * cell:(r + 1) * cell,
                                           c * cell:(c + 1) * cell].float() / 255.0)


def test_jigsaw_tiles_inside_their_cells():
    # With gaps and jitter, each tile box stays inside its cell of the crop and has the tile
    # fraction of the cell's size.
    x = _images(16, hw=(61, 47), seed=8)
    aug = PretextAugment(75, "jigsaw", ALL_ON, generator=_gen(9), backend="reference")
    p = aug.sample(x)
    perms = jigsaw_permutations(9, 100)
    boxes = p.tile_aug.crop.view(16, 9, 4).double()
    for b in range(16):
        top, left, ch, cw = p.aug.crop[b].double().tolist()
        for slot in range(9):
            r, c = divmod(int(perms[p.label[b], slot]), 3)
            if bool(p.aug.flip[b]):
                c = 2 - c
            ty, tx, th, tw = boxes[b, slot].tolist()
            assert top + r * ch / 3 - 1 < ty and ty + th <= top + (r + 1) * ch / 3 + 1
            assert left + c * cw / 3 - 1 < tx and tx + tw <= left + (c + 1) * cw / 3 + 1
            assert abs(th - ch / 3 * 64 / 75) <= 1 and abs(tw - cw / 3 * 64 / 75) <= 1


# ---------------------------------------------------------------------------------------
# colorization, inpainting, denoising
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_colorization(backend):
    x = _images(4)
    recipe = dataclasses.replace(ALL_ON, gray_p=1.0)  # gray must be forced off
    aug = PretextAugment(11, "colorization", recipe, backend=backend, generator=_gen(10))
    params = aug.sample(x)
    assert not bool(params.aug.gray.any())
    lum, rgb = aug.apply(x, params)
    assert lum.shape == (4, 1, 11, 11) and rgb.shape == (4, 3, 11, 11)
    assert lum.dtype == rgb.dtype == torch.float32
    ref = augment.apply(x, params.aug, 11, **UNIT, backend="reference")
    assert _max_diff(rgb, ref) <= TOL
    assert 0.0 <= float(rgb.min()) and float(rgb.max()) <= 1.0
    truth = (rgb.double() * torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64)[
        None, :, None, None]).sum(1, keepdim=True)
    assert _max_diff(lum, truth) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_inpainting(backend):
    x = _images(6)
    aug = PretextAugment(17, "inpainting", backend=backend, generator=_gen(11), num_boxes=2,
                         fill=-0.5, box_size=(0.2, 0.4))
    params = aug.sample(x)
    views, (clean, mask) = aug.apply(x, params)
    assert mask.shape == (6, 1, 17, 17) and mask.dtype == torch.bool
    truth = torch.zeros(6, 1, 17, 17, dtype=torch.bool)
    for b in range(6):
        for top, left, h, w in params.boxes[b].tolist():
            assert round(0.2 * 17) <= h <= round(0.4 * 17) and top + h <= 17 and left + w <= 17
            truth[b, :, top:top + h, left:left + w] = True
    assert torch.equal(mask, truth)
    m3 = mask.expand(-1, 3, -1, -1)
    assert bool((views[m3] == -0.5).all()) and torch.equal(views[~m3], clean[~m3])
    ref = augment.apply(x, params.aug, 17, backend="reference")
    assert _max_diff(clean, ref) <= 2e-5  # ImageNet-normalised units


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_denoising_gaussian(backend):
    x = _images(8, hw=(40, 40))
    aug = PretextAugment(32, "denoising", backend=backend, generator=_gen(12),
                         noise_level=(0.1, 0.2))
    params = aug.sample(x)
    noisy, clean = aug.apply(x, params)
    ref = PretextAugment(32, "denoising", backend="reference").apply(x, params)
    assert _max_diff(clean, ref[1]) <= 2e-5
    # The noise is a pure function of the seed: the same draws on every backend, so the
    # noisy view differs from the reference's only by the clean view's own ~1 ulp.
    assert _max_diff(noisy, ref[0]) <= 2e-5
    std = torch.tensor(augment.IMAGENET_STD)[None, :, None, None]
    z = (noisy.double() - clean.double()) * std / params.level[:, None, None, None].double()
    assert bool((0.1 <= params.level).all() and (params.level <= 0.2).all())
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1.0) < 0.05


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_denoising_masking(backend):
    x = _images(8, hw=(40, 40))
    aug = PretextAugment(32, "denoising", generator=_gen(13), noise="masking",
                         noise_level=(0.3, 0.6), fill=0.0, backend=backend)
    params = aug.sample(x)
    noisy, clean = aug.apply(x, params)
    dropped = (noisy != clean).any(1)
    for b in range(8):  # drop fraction near the sample's level (1024 pixels each)
        assert abs(float(dropped[b].float().mean()) - float(params.level[b])) < 0.08
    assert bool((noisy.permute(1, 0, 2, 3)[:, dropped] == 0).all())
    if backend != "reference":
        ref, _ = PretextAugment(32, "denoising", noise="masking", fill=0.0,
                                backend="reference").apply(x, params)
        assert torch.equal(noisy != clean, ref != clean)


# ---------------------------------------------------------------------------------------
# pretext_noise (the denoising task's kernel)
# ---------------------------------------------------------------------------------------

NOISE_SHAPES = [(1, 1, 1, 1), (3, 3, 7, 5), (2, 3, 13, 13), (2, 2, 3, 3), (1, 3, 45, 47)]


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masking", [False, True])
def test_pretext_noise_matches_reference(backend, dtype, masking):
    """Bit for bit: the kernels do the reference's float32 operations in its order (the
    interpreter runs the Triton kernel's; the C++ one is built with -ffp-contract=off)."""
    for i, shape in enumerate(NOISE_SHAPES):
        g = _gen(30 + i)
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        amount = torch.rand(shape[0], 1 if masking else shape[1], generator=g)
        seed = 0xFEDCBA9876543210 + i
        out = pretext_noise(x, amount, seed, masking, -0.75, backend=backend)
        ref = pretext_noise(x, amount, seed, masking, -0.75, backend="reference")
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, ref), (shape, _max_diff(out, ref))


def test_pretext_noise_is_gaussian():
    """Reference statistics of z = noisy - clean at unit amount (2 x 3 x 181 x 181 = 196,566
    values): moments, the tail bound, and a Kolmogorov-Smirnov distance below its 1% critical
    value; and the same z for every channel amount, scaled."""
    x = torch.zeros(2, 3, 181, 181)
    z = pretext_noise(x, torch.ones(2, 3), 2024, backend="reference").double().flatten()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / n ** 0.5 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z ** 3).mean())) < 0.03 and abs(float((z ** 4).mean()) - 3) < 0.06
    assert float(z.abs().max()) <= 5.77
    zs = torch.sort(z).values
    cdf = 0.5 * (1 + torch.erf(zs / 2 ** 0.5))
    ks = float((cdf - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max())
    assert ks < 1.63 / n ** 0.5
    # Versus float64 Box-Muller on the same hashes: the polynomials are within ~1 ulp.
    key = reference.mae_row_keys(torch.tensor([2024, 0]), 1).tolist()[0]
    c = torch.arange(1000, dtype=torch.int64) * 2
    h1, h2 = reference.counter_hash(key, c), reference.counter_hash(key, c + 1)
    u1 = ((h1 >> 8) + 1).double() * 2.0 ** -24
    psi = (((h2 >> 8) & 0x3FFFFF).double() + 0.5) * 2.0 ** -22 * torch.pi / 2
    r = torch.sqrt(-2 * torch.log(u1))
    z0, z1 = reference.box_muller_pairs(key, 1000)
    sign0 = 1 - 2 * ((h2 >> 31) & 1).double()
    sign1 = 1 - 2 * ((h2 >> 30) & 1).double()
    assert float((z0.double() - sign0 * r * torch.cos(psi)).abs().max()) < 1e-6
    assert float((z1.double() - sign1 * r * torch.sin(psi)).abs().max()) < 1e-6
    amount = torch.tensor([[0.5, 2.0, 0.0]])
    scaled = pretext_noise(torch.zeros(1, 3, 4, 4), amount, 7, backend="reference")
    unit = pretext_noise(torch.zeros(1, 3, 4, 4), torch.ones(1, 3), 7, backend="reference")
    assert torch.equal(scaled, unit * amount[0, :, None, None])


@needs_cpp_noise
@pytest.mark.parametrize("masking", [False, True])
def test_pretext_noise_threads_and_seeds(masking):
    x = torch.randn(5, 3, 33, 35)
    amount = torch.rand(5, 1 if masking else 3)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(pretext_noise(x, amount, 99, masking, backend="cpp"))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    other = pretext_noise(x, amount, 100, masking, backend="cpp")
    assert not torch.equal(outs[0], other)
    # Samples draw independently: sample 1 of a batch is not sample 0 shifted.
    assert not torch.equal(outs[0][0] - x[0], outs[0][1] - x[1])


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
@pytest.mark.parametrize("masking", [False, True])
def test_pretext_noise_opcheck(backend, masking):
    x = torch.randn(2, 3, 5, 7)
    amount = torch.rand(2, 1 if masking else 3)
    torch.library.opcheck(torch.ops.fastssl.pretext_noise,
                          (x, amount, torch.tensor([7, 9]), masking, 0.5))


@needs_cpp_noise
def test_pretext_noise_compile():
    x, amount, seed = torch.randn(2, 3, 6, 5), torch.rand(2, 3), torch.tensor([3, 4])
    fn = torch.compile(lambda a: torch.ops.fastssl.pretext_noise(a, amount, seed, False, 0.0),
                       fullgraph=True)
    assert torch.equal(fn(x), torch.ops.fastssl.pretext_noise(x, amount, seed, False, 0.0))


def test_pretext_noise_bad_input():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="clean"):
        pretext_noise(torch.zeros(3, 4, 4), torch.ones(2, 3), 1)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        pretext_noise(x.to(torch.uint8), torch.ones(2, 3), 1)
    with pytest.raises(ValueError, match=r"amount must be a \[2, 3\]"):
        pretext_noise(x, torch.ones(2, 1), 1)
    with pytest.raises(ValueError, match=r"amount must be a \[2, 1\]"):
        pretext_noise(x, torch.ones(2, 3), 1, masking=True)
    with pytest.raises(ValueError, match="finite"):
        pretext_noise(x, torch.full((2, 3), float("nan")), 1)
    with pytest.raises(ValueError, match=">= 0"):
        pretext_noise(x, -torch.ones(2, 3), 1)
    with pytest.raises(ValueError, match="seed"):
        pretext_noise(x, torch.ones(2, 3), -1)
    with pytest.raises(ValueError, match="seed"):
        pretext_noise(x, torch.ones(2, 3), 2 ** 64)
    with pytest.raises(ValueError, match="fill"):
        pretext_noise(x, torch.ones(2, 1), 1, masking=True, fill=float("inf"))


def test_determinism():
    x = _images(4)
    for task in pretext.TASKS:
        outs = [PretextAugment(16, task, backend="reference", generator=_gen(14),
                               patch_size=4)(x) for _ in range(2)]
        flat = [torch.utils._pytree.tree_leaves(o) for o in outs]
        assert all(torch.equal(a, b) for a, b in zip(*flat)), task
        other = torch.utils._pytree.tree_leaves(
            PretextAugment(16, task, backend="reference", generator=_gen(15),
                           patch_size=4)(x))
        assert not all(torch.equal(a, b) for a, b in zip(flat[0], other)), task


# ---------------------------------------------------------------------------------------
# MAE masking
# ---------------------------------------------------------------------------------------


def _check_mae(mask, keep, restore, B, L, K):
    assert mask.shape == (B, L) and mask.dtype == torch.bool
    assert keep.shape == (B, K) and keep.dtype == torch.int64
    assert restore.shape == (B, L) and restore.dtype == torch.int64
    assert torch.equal(mask.sum(1), torch.full((B,), L - K))  # exact ratio in every row
    # ids_restore is a permutation; its inverse is the shuffle, whose head is ids_keep
    shuffle = torch.argsort(restore, dim=1)
    assert torch.equal(torch.sort(restore, 1).values, torch.arange(L).expand(B, L))
    assert torch.equal(torch.gather(restore, 1, shuffle), torch.arange(L).expand(B, L))
    assert torch.equal(shuffle[:, :K], keep)
    assert not bool(torch.gather(mask, 1, keep).any())  # kept patches are not masked
    # MAE's own mask construction from ids_restore
    mae = torch.ones(B, L)
    mae[:, :K] = 0
    assert torch.equal(torch.gather(mae, 1, restore).bool(), mask)


@pytest.mark.parametrize("backend", MAE_BACKENDS)
@pytest.mark.parametrize("B,L,ratio", [(1, 1, 0.75), (3, 7, 0.5), (5, 49, 0.75),
                                       (2, 13, 0.0), (2, 13, 1.0)])
def test_mae_mask_matches_reference(backend, B, L, ratio):
    out = mae_mask(B, L, ratio, generator=_gen(16), backend=backend)
    ref = mae_mask(B, L, ratio, generator=_gen(16), backend="reference")
    K = int(L * (1 - ratio))
    _check_mae(*out, B, L, K)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


@needs_cpp_mae
def test_mae_mask_large():
    out = mae_mask(256, 196, 0.75, generator=_gen(17))
    _check_mae(*out, 256, 196, 49)
    ref = mae_mask(256, 196, 0.75, generator=_gen(17), backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # uniform: each patch masked in ~75% of 256 rows; rows all differ
    frac = out[0].float().mean(0)
    assert float(frac.min()) > 0.6 and float(frac.max()) < 0.9
    assert len({tuple(r) for r in out[1].tolist()}) == 256
    # every position of the shuffle holds every patch about equally often (no Fisher-Yates
    # bias): first kept patch over 256 rows
    assert int(torch.bincount(out[1][:, 0], minlength=196).max()) <= 8


def test_mae_mask_determinism():
    a = mae_mask(4, 20, 0.6, generator=_gen(18), backend="reference")
    b = mae_mask(4, 20, 0.6, generator=_gen(18), backend="reference")
    c = mae_mask(4, 20, 0.6, generator=_gen(19), backend="reference")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("backend", MAE_BACKENDS)
def test_mae_mask_opcheck(backend):
    seed = torch.tensor([123456789, 987654321], dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastssl.mae_mask, (seed, 3, 11, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssl_augment_rot_opcheck(backend):
    x = _images(3)
    p = augment.sample_params(3, (23, 19), 11, "byol", 0, _gen(23))
    from fastssl.ops import augment as ops_augment
    crop, flags, factors, order, taps = ops_augment.pack_params(p)
    torch.library.opcheck(torch.ops.fastssl.ssl_augment,
                          (list(x.unbind(0)), crop, flags, factors, order, taps, 0.5,
                           torch.zeros(3), torch.ones(3), 11, torch.float32,
                           torch.tensor([0, 1, 3])))


@needs_cpp_mae
def test_mae_mask_compile():
    seed = torch.tensor([5, 6], dtype=torch.int64)
    fn = torch.compile(lambda s: torch.ops.fastssl.mae_mask(s, 3, 11, 4), fullgraph=True)
    for a, b in zip(fn(seed), torch.ops.fastssl.mae_mask(seed, 3, 11, 4)):
        assert torch.equal(a, b)


def test_mae_task():
    x = _images(3, hw=(20, 20))
    aug = PretextAugment(16, "mae", backend="reference", generator=_gen(20), patch_size=4,
                         mask_ratio=0.75)
    views, (mask, keep, restore) = aug(x)
    assert views.shape == (3, 3, 16, 16)
    _check_mae(mask, keep, restore, 3, 16, 4)


# ---------------------------------------------------------------------------------------
# multi-crop
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_multicrop(backend):
    x = _images(3, hw=(37, 41))
    aug = MultiCropAugment(15, 7, 4, **UNIT, backend=backend, generator=_gen(21))
    params = aug.sample(x)
    views = aug.apply(x, params)
    assert [tuple(v.shape) for v in views] == [(3, 3, 15, 15)] * 2 + [(3, 3, 7, 7)] * 4
    g0, g1, loc = params
    ref_g = [augment.apply(x, p, 15, **UNIT, backend="reference") for p in (g0, g1)]
    ref_l = augment.apply(list(x) * 4, loc, 7, **UNIT, backend="reference")
    assert _max_diff(views[0], ref_g[0]) <= TOL and _max_diff(views[1], ref_g[1]) <= TOL
    for i in range(4):
        assert _max_diff(views[2 + i], ref_l[3 * i:3 * i + 3]) <= TOL


def test_multicrop_recipes():
    x = _images(64, hw=(50, 50))
    aug = MultiCropAugment(24, 12, 2, generator=_gen(22), backend="reference")
    g0, g1, loc = aug.sample(x)
    area = lambda p: (p.crop[:, 2] * p.crop[:, 3]).double() / 2500  # noqa: E731
    assert float(area(g0).min()) >= 0.4 - 0.05 and float(area(loc).max()) <= 0.4 + 0.05
    assert bool(g0.blur.all()) and not bool(g0.solarize.any())  # DINO: global 0 blur p=1
    assert bool(g1.solarize.any()) and bool(loc.blur.any()) and not bool(loc.blur.all())


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def test_bad_input():
    x = _images(2)
    with pytest.raises(ValueError, match="task"):
        PretextAugment(16, "colour")
    with pytest.raises(ValueError, match="grid"):
        PretextAugment(16, "jigsaw", grid=1)
    with pytest.raises(ValueError, match="tile_size"):
        PretextAugment(30, "jigsaw", tile_size=11)
    with pytest.raises(ValueError, match="patch_size"):
        PretextAugment(30, "mae", patch_size=16)
    with pytest.raises(ValueError, match="mask_ratio"):
        PretextAugment(32, "mae", mask_ratio=1.5)
    with pytest.raises(ValueError, match="noise"):
        PretextAugment(32, "denoising", noise="salt")
    with pytest.raises(ValueError, match="noise_level"):
        PretextAugment(32, "denoising", noise="masking", noise_level=(0.5, 1.5))
    with pytest.raises(ValueError, match="box_size"):
        PretextAugment(32, "inpainting", box_size=(0.5, 0.2))
    with pytest.raises(ValueError, match="fill"):
        PretextAugment(32, "inpainting", fill=float("nan"))
    with pytest.raises(TypeError, match="generator"):
        PretextAugment(32, generator=3)
    with pytest.raises(ValueError, match="channels"):
        PretextAugment(8, backend="reference")(torch.zeros(2, 1, 9, 9, dtype=torch.uint8))
    aug = PretextAugment(8, "rotation", backend="reference")
    with pytest.raises(TypeError, match="PretextParams"):
        PretextAugment(8, "jigsaw", tile_size=2).apply(x, aug.sample(x))
    p = aug.sample(x)
    with pytest.raises(ValueError, match="rot"):
        augment.apply(x, p.aug, 8, rot=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="rot"):
        augment.apply(x, p.aug, 8, rot=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="rot"):
        augment.apply(x, p.aug, 8, rot=torch.tensor([0, 1, 2]))
    for args, what in [((0, 10, 0.5), "batch"), ((2, 0, 0.5), "num_patches"),
                       ((2, 10, -0.1), "ratio"), ((2, 10, float("nan")), "ratio"),
                       ((2, 10, True), "ratio")]:
        with pytest.raises(ValueError, match=what):
            mae_mask(*args)
    with pytest.raises(ValueError, match="meta"):
        mae_mask(2, 10, 0.5, device="meta")
    with pytest.raises(ValueError, match="n_local"):
        MultiCropAugment(n_local=-1)
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropAugment(local_scale=(0.4, 0.05))
    with pytest.raises(ValueError, match="num_tiles"):
        jigsaw_permutations(1)
    with pytest.raises(ValueError, match="only 24"):
        jigsaw_permutations(4, 25)


def test_public_api():
    assert fastssl.PretextAugment is PretextAugment and fastssl.mae_mask is mae_mask
    assert fastssl.MultiCropAugment is MultiCropAugment
    assert reference.mae_mask is not None and reference.pretext_noise is not None
