"""TEMPORARY SHIMS (issue 7: profile/train) -- plain-PyTorch stand-ins, behind the call
signatures of APIs that other issues are landing (``fastssl.info_nce``, ``fastssl.moco``,
``fastssl.augment``). ``fastssl.training`` / ``fastssl.profiling`` / ``examples/`` use these
ONLY until the real API is merged; each use site imports the real name once it exists.
Nothing here is fused: it is the reference math.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --- SHIM for fastssl.info_nce (contrastive family issue) --------------------------------


def info_nce(query, key, queue=None, temperature=0.07, *, normalize=True, backend="auto"):
    """SHIM: InfoNCE of MoCo: row i's positive is key i, negatives the queue rows."""
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    pos = (query * key).sum(1, keepdim=True)
    logits = pos if queue is None else torch.cat([pos, query @ queue.T], dim=1)
    target = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits / temperature, target)


# --- SHIMS for fastssl.moco (MoCo machinery issue) --------------------------------------


@torch.no_grad()
def ema_update_(target_module, online_module, momentum, *, buffers=False, backend="auto"):
    """SHIM: target <- momentum * target + (1 - momentum) * online (parameters)."""
    t = [p for p in target_module.parameters()]
    o = [p.detach() for p in online_module.parameters()]
    torch._foreach_lerp_(t, o, 1.0 - float(momentum))


def momentum_schedule(step, total_steps, base=0.996, final=1.0):
    """SHIM: BYOL's cosine schedule from ``base`` (step 0) to ``final`` (last step)."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * frac) + 1) / 2


class MoCoQueue:
    """SHIM: a (size, dim) ring buffer of unit keys; the write pointer stays a tensor."""

    def __init__(self, dim, size, *, dtype=torch.float32, device=None, backend="auto"):
        self.buffer = F.normalize(torch.randn(size, dim, device=device, dtype=dtype), dim=1)
        self.ptr = torch.zeros((), dtype=torch.long, device=device)
        self.size = size

    @torch.no_grad()
    def enqueue(self, keys):
        keys = keys.detach()[-self.size:]
        idx = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.buffer[idx] = keys.to(self.buffer.dtype)
        self.ptr = (self.ptr + keys.shape[0]) % self.size


# --- SHIM for fastssl.augment.SSLAugment (augmentation issue) ---------------------------

_RECIPES = {
    # crop scale, jitter (b, c, s, h), p_jitter, p_gray, p_blur per view, p_solarize per view
    "simclr": ((0.08, 1.0), (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, (0.5, 0.5), (0.0, 0.0)),
    "byol": ((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, (1.0, 0.1), (0.0, 0.2)),
    "mocov2": ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, (0.5, 0.5), (0.0, 0.0)),
}
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _gray(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _hue(x, h):
    r, g, b = x.unbind(1)
    mx, _ = x.max(1)
    mn, _ = x.min(1)
    d = mx - mn
    safe = torch.where(d > 0, d, torch.ones_like(d))
    hh = torch.where(mx == r, ((g - b) / safe) % 6,
                     torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hh = torch.where(d > 0, hh, torch.zeros_like(hh))
    hh = (hh + h.view(-1, 1, 1)) % 1.0
    s = torch.where(mx > 0, d / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    v = mx
    i = torch.floor(hh * 6)
    f = hh * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    rgb = [torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                       (v, p, q))]
    out = rgb[0]
    for k in range(1, 6):
        out = torch.where((i == k).unsqueeze(1), rgb[k], out)
    return out


class SSLAugment:
    """SHIM: per-sample two-view SSL augmentation in batched plain PyTorch.

    ``__call__(images uint8 (B, 3, H, W)) -> (view0, view1)`` float32 (B, 3, S, S), normalised
    with the ImageNet mean/std. Jitter order is fixed (b, c, s, h) in this shim.
    """

    def __init__(self, out_size, recipe="simclr", *, backend="auto", generator=None):
        if recipe not in _RECIPES:
            raise ValueError(f"recipe must be one of {tuple(_RECIPES)}, got {recipe!r}")
        self.out_size, self.recipe = out_size, recipe
        self.generator = generator if generator is not None else torch.Generator()

    def _view(self, x, view):
        scale, jit, p_jit, p_gray, p_blur, p_sol = _RECIPES[self.recipe]
        g, B, S = self.generator, x.shape[0], self.out_size
        dev = x.device
        u = lambda *s: torch.rand(*s, generator=g).to(dev)  # noqa: E731
        # random resized crop (area fraction, log-uniform aspect), flip folded into the grid
        area = scale[0] + (scale[1] - scale[0]) * u(B)
        logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u(B)
        ratio = torch.exp(logr)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1 - w) * (2 * u(B) - 1)
        cy = (1 - h) * (2 * u(B) - 1)
        flip = torch.where(u(B) < 0.5, -1.0, 1.0)
        theta = torch.zeros(B, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, (B, 3, S, S), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # colour jitter with probability p_jit
        on = (u(B) < p_jit).float().view(B, 1, 1, 1)
        bf = 1 + jit[0] * (2 * u(B) - 1)
        cf = 1 + jit[1] * (2 * u(B) - 1)
        sf = 1 + jit[2] * (2 * u(B) - 1)
        hf = jit[3] * (2 * u(B) - 1)
        y = (x * bf.view(B, 1, 1, 1)).clamp(0, 1)
        m = _gray(y).mean((1, 2, 3), keepdim=True)
        y = (cf.view(B, 1, 1, 1) * y + (1 - cf.view(B, 1, 1, 1)) * m).clamp(0, 1)
        y = (sf.view(B, 1, 1, 1) * y + (1 - sf.view(B, 1, 1, 1)) * _gray(y)).clamp(0, 1)
        y = _hue(y, hf)
        x = on * y + (1 - on) * x
        gray = (u(B) < p_gray).float().view(B, 1, 1, 1)
        x = gray * _gray(x).expand_as(x) + (1 - gray) * x
        # gaussian blur, kernel ~10% of the size (odd), sigma U(0.1, 2)
        k = max(3, int(0.1 * S) // 2 * 2 + 1)
        sigma = 0.1 + 1.9 * u(B)
        blur = (u(B) < p_blur[view]).view(B, 1, 1, 1)
        taps = torch.arange(k, device=dev) - k // 2
        ker = torch.softmax(-(taps[None] / sigma[:, None]) ** 2 / 2, dim=1)  # (B, k)
        ker = ker.repeat_interleave(3, 0)
        xb = F.pad(x.reshape(1, B * 3, S, S), (k // 2,) * 4, mode="reflect")
        xb = F.conv2d(xb, ker.view(B * 3, 1, 1, k), groups=B * 3)
        xb = F.conv2d(xb, ker.view(B * 3, 1, k, 1), groups=B * 3).view(B, 3, S, S)
        x = torch.where(blur, xb, x)
        sol = (u(B) < p_sol[view]).view(B, 1, 1, 1)
        x = torch.where(sol & (x >= 0.5), 1 - x, x)
        return (x - _MEAN.to(dev)) / _STD.to(dev)

    def __call__(self, images):
        x = images.float() / 255
        return self._view(x, 0), self._view(x, 1)
