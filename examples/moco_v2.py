"""MoCo v2 with fastssl's key queue, fused EMA update and InfoNCE.

* ``fastssl.MoCoQueue(dim, size)``: the ring buffer of negative keys (its write pointer stays
  on the device: no host sync per step); ``queue.enqueue(keys)`` after each step.
* ``fastssl.ema_update_(key_encoder, query_encoder, m)``: the momentum update of every tensor
  in one pass.
* ``fastssl.info_nce(q, k, queue.buffer, temperature)``: InfoNCE against the queue, fused.

    python examples/moco_v2.py
    python examples/moco_v2.py --steps 2 --batch 16 --width 4 --queue 64   # smoke test

The printed InfoNCE *rises* over the first steps (about 4.5 -> 6.5 with the defaults), and
that is expected, not a divergence. The queue starts as random unit vectors (as in official
MoCo): nearly orthogonal to every query, they are easy negatives, so the loss starts low. Each
step replaces ``--batch`` of them with real keys from the key encoder; at initialisation that
encoder maps all images to similar directions, so real keys are hard negatives and the loss
climbs towards log(1 + queue size) (8.3 for 4,096 keys) until the queue is full (queue / batch
= 16 steps here). Only from then on does the loss measure learning, and it falls as the
encoders learn to tell images apart.
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import fastssl
from fastssl.data import render_shapes


def encoder(width: int, dim: int) -> nn.Module:
    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                             nn.ReLU(inplace=True))
    return nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, 256), nn.ReLU(), nn.Linear(256, dim))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queue", type=int, default=4096)
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--temperature", type=float, default=0.2)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    images, _ = render_shapes(4 * args.batch, seed=0)
    query_enc = encoder(args.width, args.dim)
    key_enc = copy.deepcopy(query_enc).requires_grad_(False)
    queue = fastssl.MoCoQueue(args.dim, args.queue)
    augment = fastssl.SSLAugment(32, recipe="mocov2",
                                 generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(query_enc.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)

    for step in range(args.steps):
        idx = torch.randint(0, images.shape[0], (args.batch,))
        view_q, view_k = augment(images[idx])
        q = query_enc(view_q)
        with torch.no_grad():
            # ShuffleBN on one process: keys go through BatchNorm in a shuffled order, in
            # halves, so a batch's statistics cannot give the positive away.
            perm = torch.randperm(args.batch)
            k = torch.empty_like(q)
            k[perm] = torch.cat([key_enc(h) for h in view_k[perm].chunk(2)])
        loss = fastssl.info_nce(q, k, queue.buffer, temperature=args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fastssl.ema_update_(key_enc, query_enc, args.momentum)  # key = m*key + (1-m)*query
        queue.enqueue(F.normalize(k, dim=1))
        if step % 10 == 0 or step == args.steps - 1:
            filled = min(args.queue, step * args.batch)  # real keys when the loss was computed
            print(f"step {step:4d}  InfoNCE {loss.item():.4f}  (queue: {filled}/{args.queue} "
                  f"real keys)", flush=True)
    return loss.item()


if __name__ == "__main__":
    main()
