"""Speed ratios measured in one process (`make bench`): no absolute timings are asserted anywhere.

  features   memoised feature extraction (second call) vs recomputing it
  probe      the suite's linear probe (Probe.fit) vs a bare torch loop doing the same work
  ssl        the suite's SimCLR trainer vs a bare torch loop (same model, augmentation, batches)

Usage: python scripts/bench.py [--width 8] [--n 4000] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from securetl.data.synthetic import build_synthetic
from securetl.encoders.resnet import cifar_resnet18
from securetl.interfaces import RunContext, to_float
from securetl.probe import Probe, clear_memo, memo_forward
from securetl.ssl.augment import SimCLRAugment
from securetl.ssl.losses import nt_xent
from securetl.ssl.methods import SimCLR
from securetl.ssl.trainer import pretrain
from securetl.validate import resolve_device


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    data = build_synthetic(n_train=args.n, n_test=100, n_pretrain=args.n, n_reference=10)
    ctx = RunContext(device=device, seed=0, num_classes=10, progress=False)
    enc = cifar_resnet18(args.width).to(device).eval()

    clear_memo()
    first = timed(lambda: memo_forward(enc, data.train.x, ctx))
    second = timed(lambda: memo_forward(enc, data.train.x, ctx))
    print(
        f"features  recompute {first:.2f}s  memoised {second:.4f}s  speed-up x{first / max(second, 1e-9):.0f}"
    )

    feats = memo_forward(enc, data.train.x, ctx)
    probe = Probe(kind="linear", epochs=20, lr=1e-2, batch_size=256)
    suite = timed(lambda: probe.fit(enc, data.train, ctx))

    def bare() -> None:
        f = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
        head = torch.nn.Linear(f.shape[1], 10).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(20):
            perm = torch.randperm(len(f))
            for s in range(0, len(f), 256):
                b = perm[s : s + 256]
                loss = F.cross_entropy(head(f[b].to(device)), data.train.y[b].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()

    base = timed(bare)
    print(f"probe     suite {suite:.2f}s  bare loop {base:.2f}s  ratio {suite / base:.2f}")

    n_ssl = min(args.n, 1024)
    imgs = data.pretrain.x[:n_ssl]
    suite = timed(
        lambda: pretrain(cifar_resnet18(args.width).to(device), imgs, ctx, epochs=1, batch_size=128)
    )

    def bare_ssl() -> None:
        torch.manual_seed(0)
        model = SimCLR(cifar_resnet18(args.width)).to(device)
        aug = SimCLRAugment()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for s in range(0, n_ssl - 127, 128):
            x = to_float(imgs[s : s + 128]).to(device)
            z1, z2 = model.head(model.encoder(aug(x))), model.head(model.encoder(aug(x)))
            loss = nt_xent(z1, z2)
            opt.zero_grad()
            loss.backward()
            opt.step()

    base = timed(bare_ssl)
    print(
        f"ssl       suite {suite:.2f}s  bare loop {base:.2f}s  ratio {suite / base:.2f}  ({n_ssl} images, 1 epoch)"
    )


if __name__ == "__main__":
    main()
