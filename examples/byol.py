"""BYOL with fastssl's fused EMA update and BYOL's cosine momentum schedule.

``fastssl.momentum_schedule(step, total_steps, base=0.996, final=1.0)`` gives the target
network's momentum at each step (cosine from ``base`` to 1), and
``fastssl.ema_update_(target, online, m)`` applies it to every tensor in one pass.

    python examples/byol.py
    python examples/byol.py --steps 2 --batch 16 --width 4   # smoke test
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastssl
from fastssl.data import render_shapes


def mlp(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                         nn.Linear(256, d_out))


def encoder(width: int) -> nn.Module:
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                             nn.ReLU(inplace=True))
    return nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def regression_loss(p, z):
    """BYOL's loss: 2 - 2 cos(p, z), averaged; z is the target's (no gradient)."""
    return (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1)).mean()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--base-momentum", type=float, default=0.99)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    images, _ = render_shapes(4 * args.batch, seed=0)
    online = nn.Sequential(encoder(args.width), mlp(4 * args.width, 64))
    predictor = mlp(64, 64)
    target = copy.deepcopy(online).requires_grad_(False)
    augment = fastssl.SSLAugment(32, recipe="byol",
                                 generator=torch.Generator().manual_seed(0))
    params = [*online.parameters(), *predictor.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-5)

    for step in range(args.steps):
        idx = torch.randint(0, images.shape[0], (args.batch,))
        v0, v1 = augment(images[idx])
        pred = predictor(online(torch.cat([v0, v1])))
        with torch.no_grad():
            z = target(torch.cat([v0, v1]))
        p0, p1 = pred.chunk(2)
        z0, z1 = z.chunk(2)
        loss = regression_loss(p0, z1) + regression_loss(p1, z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m = fastssl.momentum_schedule(step, args.steps, base=args.base_momentum)
        fastssl.ema_update_(target, online, m)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  BYOL loss {loss.item():.4f}  momentum {m:.5f}")
    return loss.item()


if __name__ == "__main__":
    main()
