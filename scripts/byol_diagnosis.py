"""Why BYOL does not learn on the synthetic data (issue 24 item 1): what class information an encoder's features
carry, as weighted-kNN accuracy in the pre-training domain (held-out half of the pre-training images, labelled
by the other half) and downstream (test set, labelled by the training set), and the features' effective rank.

    python scripts/byol_diagnosis.py random                 # randomly initialised encoders (3 seeds, widths 8, 16)
    python scripts/byol_diagnosis.py train '{"ssl": "byol"}' '{"ssl": "simclr", "lr": 1e-3}' --epochs 10
    python scripts/byol_diagnosis.py train '{"ssl": "byol", "warm": 3}' --epochs 5   # BYOL after 3 SimCLR epochs
    python scripts/byol_diagnosis.py train '{"ssl": "byol"}' --loop independent       # not our trainer

Each `train` configuration is a JSON object: ssl, lr, weight_decay, batch_size, width, method (the method's
keywords), augment (overrides of the synthetic encoders' colour-strong views), warm (SimCLR epochs before).
`--loop independent` trains BYOL with a minimal loop written apart from securetl.ssl (both views in one
batch, as lucidrains/byol-pytorch does), to tell a fault of our trainer from BYOL's own dynamics here.
One CPU thread; a 10-epoch run takes about 5 minutes on an idle core.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from torch import nn

from securetl.data.synthetic import build_synthetic
from securetl.encoders.resnet import build_encoder
from securetl.interfaces import RunContext
from securetl.metrics import knn_predict
from securetl.probe import batched_forward
from securetl.ssl.augment import SimCLRAugment
from securetl.ssl.losses import normalized_mse
from securetl.ssl.methods import ema_update, mlp
from securetl.ssl.trainer import pretrain

# the synthetic encoders' views (conf/encoder/synthetic_simclr_resnet18.yaml)
AUGMENT = {"crop_scale_min": 0.3, "jitter": 0.8, "hue": 0.5, "gray_prob": 0.5}
BYOL_METHOD = {"proj_dim": 128, "hidden_dim": 512, "tau": 0.99}  # conf/encoder/synthetic_byol_resnet18.yaml


def features(enc: nn.Module, x: torch.Tensor, batch_stats: bool) -> torch.Tensor:
    """Features of uint8 images; batch_stats: BatchNorm on each batch of 500 instead of its running statistics."""
    enc.train(batch_stats)
    with torch.no_grad():
        out = batched_forward(enc, x, torch.device("cpu"), batch=500)
    enc.eval()
    return out


def knn_acc(q: torch.Tensor, qy: torch.Tensor, bank: torch.Tensor, by: torch.Tensor) -> float:
    return round(100 * float((knn_predict(q, bank, by, int(by.max()) + 1) == qy).float().mean()), 2)


def probe(enc: nn.Module, sp, batch_stats: bool = False) -> dict[str, float]:
    """kNN accuracy downstream and in the pre-training domain, and the effective rank of the test features."""
    tr, te = features(enc, sp.train.x, batch_stats), features(enc, sp.test.x, batch_stats)
    pre, py, half = features(enc, sp.pretrain.x, batch_stats), sp.pretrain.y, len(sp.pretrain.y) // 2
    s = torch.linalg.svdvals(te - te.mean(0))
    p = s / s.sum()
    return {
        "knn_down": knn_acc(te, sp.test.y, tr, sp.train.y),
        "knn_pre": knn_acc(pre[half:], py[half:], pre[:half], py[:half]),
        "erank": round(float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum())), 1),
    }


def independent_byol(enc, x, epochs, lr, batch_size, augment, method, seed) -> list[float]:
    """BYOL written apart from securetl.ssl: online encoder+projector+predictor, EMA target, cosine tau."""
    online = nn.Sequential(enc, mlp(enc.feat_dim, method["hidden_dim"], method["proj_dim"]))
    pred = mlp(method["proj_dim"], method["hidden_dim"], method["proj_dim"])
    target = copy.deepcopy(online).requires_grad_(False)
    opt = torch.optim.Adam([*online.parameters(), *pred.parameters()], lr=lr)
    g, aug = torch.Generator().manual_seed(seed), SimCLRAugment(**augment)
    steps, history, k = len(x) // batch_size, [], 0
    for _ in range(epochs):
        perm, total = torch.randperm(len(x), generator=g), 0.0
        for s in range(steps):
            b = x[perm[s * batch_size : (s + 1) * batch_size]].float() / 255
            v = torch.cat([aug(b, g), aug(b, g)])
            p1, p2 = pred(online(v)).chunk(2)
            with torch.no_grad():
                z1, z2 = target(v).chunk(2)
            loss = normalized_mse(p1, z2) + normalized_mse(p2, z1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema_update(
                target, online, 1 - (1 - method["tau"]) * (math.cos(math.pi * k / (epochs * steps)) + 1) / 2
            )
            k, total = k + 1, total + float(loss)
        history.append(total / steps)
    return history


def train(cfg: dict, epochs: int, loop: str, sp, ctx) -> dict:
    cfg = dict(cfg)
    ssl, width, seed = cfg.pop("ssl", "byol"), cfg.pop("width", 8), cfg.pop("seed", 0)
    lr = cfg.pop("lr", 2e-3 if ssl == "byol" else 1e-3)
    augment = AUGMENT | cfg.pop("augment", {})
    method = (BYOL_METHOD if ssl == "byol" else {"proj_dim": 128}) | cfg.pop("method", {})
    common = {
        "batch_size": cfg.pop("batch_size", 64),
        "weight_decay": cfg.pop("weight_decay", 1e-6),
        "seed": seed,
    }
    warm = cfg.pop("warm", 0)
    if cfg:
        raise SystemExit(f"unknown keys {sorted(cfg)}")
    torch.manual_seed(seed)
    enc, out = build_encoder("cifar_resnet18", width), {}
    if warm:
        enc, _ = pretrain(enc, sp.pretrain.x, ctx, ssl="simclr", epochs=warm, lr=1e-3, augment=augment,
                          method_kwargs={"proj_dim": 128}, **common)  # fmt: skip
        out["after_warm"] = probe(enc, sp)
    t = time.time()
    if loop == "independent":
        history = independent_byol(
            enc.train(), sp.pretrain.x, epochs, lr, common["batch_size"], augment, method, seed
        )
    else:
        enc, history = pretrain(enc, sp.pretrain.x, ctx, ssl=ssl, epochs=epochs, lr=lr, augment=augment,
                                method_kwargs=method, **common)  # fmt: skip
    return (
        out
        | probe(enc, sp)
        | {"loss": [round(h, 3) for h in history], "minutes": round((time.time() - t) / 60, 1)}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["random", "train"])
    ap.add_argument("configs", nargs="*", default=['{"ssl": "byol"}'])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--loop", choices=["securetl", "independent"], default="securetl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sp, ctx = build_synthetic(), RunContext(torch.device("cpu"), 0, 10, progress=False)
    if args.what == "random":
        for width in (8, 16):
            for seed in (0, 1, 2):
                torch.manual_seed(seed)
                enc = build_encoder("cifar_resnet18", width)
                print(
                    json.dumps({"width": width, "seed": seed, "batch_stats": probe(enc, sp, True)}),
                    flush=True,
                )
        return
    for c in args.configs:
        print(json.dumps({"config": json.loads(c), "epochs": args.epochs, "loop": args.loop}
                         | train(json.loads(c), args.epochs, args.loop, sp, ctx)), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
