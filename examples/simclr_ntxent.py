"""SimCLR in a plain PyTorch loop, with fastssl's fused NT-Xent as a drop-in loss.

The only fastssl-specific lines are the loss (``fastssl.NTXentLoss``: O(N*D) memory, fused
forward and backward) and the augmentation (``SSLAugment``: per-sample SimCLR views from a
uint8 batch in one pass). Everything else is the loop you already have.

    python examples/simclr_ntxent.py
    python examples/simclr_ntxent.py --steps 2 --batch 16 --width 4   # smoke test
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fastssl
from fastssl.data import render_shapes


def encoder(width: int) -> nn.Module:
    """Any backbone works; a small conv net keeps the example fast on a CPU."""
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                             nn.ReLU(inplace=True))
    return nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.2)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    images, _ = render_shapes(4 * args.batch, seed=0)        # uint8 (N, 3, 32, 32); labels unused
    backbone = encoder(args.width)
    projector = nn.Sequential(nn.Linear(4 * args.width, 256), nn.ReLU(), nn.Linear(256, 64))
    model = nn.Sequential(backbone, projector)
    augment = fastssl.SSLAugment(32, recipe="simclr", generator=torch.Generator().manual_seed(0))
    criterion = fastssl.NTXentLoss(temperature=args.temperature)  # <- the drop-in line
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-5)

    for step in range(args.steps):
        idx = torch.randint(0, images.shape[0], (args.batch,))
        view0, view1 = augment(images[idx])                  # float (B, 3, 32, 32) each
        z = model(torch.cat([view0, view1]))                 # one pass over both views
        loss = criterion(*z.chunk(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  NT-Xent {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
