"""Speed ratios measured in one process (`make bench`): the suite's loops against bare torch loops that do
the same work the way an expert writes them. No absolute timing is asserted anywhere; each ratio is
printed on one line starting with `RATIO`, so an unattended run can be grepped.

  ssl       the suite's SSL trainer (securetl.ssl.trainer.pretrain, SimCLR)  vs  a bare SimCLR loop
            (same model, batch, augmentation and loss; bf16 autocast + channels_last + uint8 data resident
            on the device when on CUDA, fp32 on CPU)                          target >= 0.9 (CUDA)
  features  the suite's feature extraction (probe.memo_forward, memo cleared)  vs  bare batched inference
                                                                              target >= 0.9 (CUDA)
  probe     the suite's fine-tuning probe (Probe.fit, conf/probe/finetune.yaml)  vs  a bare loop: the
            activations entering the trainable stages computed once, those stages + a linear head trained
            with SGD on them                                                  target >= 0.8 (CUDA)
  tcore     wall time of one pipeline cell with T-Core  /  the same cell with no defense (encoders cached,
            both measured after a warm-up run)                                target <= 3 (CPU and CUDA)
  memo      memoised feature extraction (second call) vs recomputing it (a speed-up, not a ratio to 1)

Ratios are suite throughput / bare throughput (1.0 = as fast as the bare loop), except tcore (a time ratio).

Usage: python scripts/bench.py [--device auto|cpu|cuda] [--only ssl,features,probe,tcore,memo]
       [--width W] [--n N] [--batch B] [--repeat R]
Defaults: CUDA: width 64, 20 480 images, batch 512 (the scale of ../shared/GPU.md); CPU: width 8, 2 048, 128.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from securetl.data.synthetic import build_synthetic
from securetl.encoders.resnet import cifar_resnet18
from securetl.interfaces import RunContext
from securetl.numerics import Numerics
from securetl.probe import Probe, clear_memo, memo_forward
from securetl.ssl.augment import SimCLRAugment
from securetl.ssl.methods import SimCLR
from securetl.ssl.trainer import pretrain
from securetl.validate import resolve_device

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeat: int) -> float:
    """Shortest of `repeat` timed calls (after one untimed warm-up call: cuDNN autotuning, allocator)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def report(name: str, suite: float, bare: float, unit: str, target: str) -> None:
    """suite/bare are throughputs (higher is better)."""
    print(
        f"RATIO {name:<9} {suite / bare:6.2f}  suite {suite:12,.0f} {unit}  bare {bare:12,.0f} {unit}  ({target})",
        flush=True,
    )


# --------------------------------------------------------------------------- ssl
def bench_ssl(num: Numerics, imgs: torch.Tensor, width: int, batch: int, repeat: int) -> None:
    dev = num.device
    ctx = RunContext(dev, 0, 10, progress=False, numerics=num)
    steps = len(imgs) // batch

    def suite() -> None:
        pretrain(cifar_resnet18(width), imgs, ctx, epochs=1, batch_size=batch)

    data = imgs.to(dev)  # the bare loop's data: resident, uint8

    def bare() -> None:
        torch.manual_seed(0)
        model = SimCLR(cifar_resnet18(width)).to(dev)
        if num.channels_last:
            model = model.to(memory_format=torch.channels_last)
        aug = SimCLRAugment()
        g = torch.Generator(device=dev).manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
        perm = torch.randperm(len(data), device=dev, generator=g)
        for s in range(steps):
            x = data[perm[s * batch : (s + 1) * batch]].float().div_(255)
            v1, v2 = aug(x, g), aug(x, g)
            with num.autocast():
                loss = model.loss(v1, v2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    n = steps * batch
    t_suite, t_bare = best_time(suite, dev, repeat), best_time(bare, dev, repeat)
    report("ssl", n / t_suite, n / t_bare, "img/s", f"SimCLR, width {width}, batch {batch}; target >= 0.9")


# --------------------------------------------------------------------------- features
def bench_features(num: Numerics, imgs: torch.Tensor, width: int, batch: int, repeat: int) -> None:
    dev = num.device
    ctx = RunContext(dev, 0, 10, progress=False, numerics=num)
    enc = num.module(cifar_resnet18(width).eval())
    for p in enc.parameters():  # as the pipeline hands encoders out (and autocast then recasts per batch)
        p.requires_grad_(False)

    def suite() -> None:
        clear_memo()
        memo_forward(enc, imgs, ctx)

    imgs = imgs.repeat(5, 1, 1, 1) if num.cuda else imgs  # long enough to time on a GPU
    data = imgs.to(dev)

    @torch.no_grad()
    def bare() -> None:
        outs = []
        with num.autocast():
            for i in range(0, len(data), 512):
                outs.append(enc(data[i : i + 512].float().div_(255)).float())
        torch.cat(outs).cpu()

    t_suite, t_bare = best_time(suite, dev, repeat), best_time(bare, dev, repeat)
    n = len(imgs)
    report("features", n / t_suite, n / t_bare, "img/s", f"width {width}, batch 512; target >= 0.9")
    clear_memo()
    first = best_time(suite, dev, 1)
    memo = best_time(lambda: memo_forward(enc, imgs, ctx), dev, 1)
    print(
        f"RATIO memo      x{first / max(memo, 1e-9):,.0f} speed-up of a memoised call over recomputing",
        flush=True,
    )


# --------------------------------------------------------------------------- fine-tuning probe
def bench_probe(num: Numerics, data, width: int, repeat: int) -> None:
    from omegaconf import OmegaConf

    dev = num.device
    ctx = RunContext(dev, 0, 10, progress=False, numerics=num)
    cfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(ROOT / "conf/probe/finetune.yaml")).items()}
    cfg.pop("_target_", None)
    cfg["epochs"] = 5
    probe = Probe(**cfg)
    enc = num.module(cifar_resnet18(width).eval())
    for p in enc.parameters():
        p.requires_grad_(False)
    train = data.train

    def suite() -> None:
        clear_memo()
        probe.fit(enc, train, ctx)

    n_top = {"last_stage": 1, "last2": 2}[probe.trainable]
    start = len(enc.stages) - n_top
    x, y = train.x.to(dev), train.y.to(dev)

    def bare() -> None:
        import copy

        with torch.no_grad(), num.autocast():
            acts = torch.cat(
                [
                    enc.forward_until(x[i : i + 512].float().div_(255), start).float()
                    for i in range(0, len(x), 512)
                ]
            )
        stages = copy.deepcopy(torch.nn.Sequential(*enc.stages[start:]))
        for p in stages.parameters():
            p.requires_grad_(True)
        with torch.no_grad(), num.autocast():
            feats = torch.cat(
                [stages(acts[i : i + 512]).float().mean((2, 3)) for i in range(0, len(acts), 512)]
            )
        mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
        head = torch.nn.Linear(feats.shape[1], 10).to(dev)
        opt = torch.optim.SGD(
            [
                {"params": stages.parameters(), "lr": probe.encoder_lr},
                {"params": head.parameters(), "lr": probe.lr},
            ],
            momentum=0.9,
        )
        stages.train()
        for _ in range(probe.epochs):
            perm = torch.randperm(len(y), device=dev)
            for s in range(0, len(y), probe.batch_size):
                b = perm[s : s + probe.batch_size]
                with num.autocast():
                    f = stages(acts[b]).mean((2, 3))
                    loss = F.cross_entropy(head((f - mean) / std), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    work = len(train) * probe.epochs
    t_suite, t_bare = best_time(suite, dev, repeat), best_time(bare, dev, repeat)
    report(
        "probe",
        work / t_suite,
        work / t_bare,
        "img-epochs/s",
        f"finetune {probe.trainable}, width {width}, {len(train)} images x {probe.epochs} epochs; target >= 0.8",
    )


# --------------------------------------------------------------------------- T-Core vs no defense
def bench_tcore(device: torch.device, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import securetl.run  # noqa: F401  (the `uid` resolver)
    from securetl import pipeline

    with tempfile.TemporaryDirectory() as root:
        os.environ["SECURETL_ROOT"] = root
        os.environ.pop("SECURETL_CACHE_DIR", None)
        os.environ.pop("SECURETL_RESULTS_DIR", None)

        def run(defense: str) -> tuple[float, dict]:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(
                    "run",
                    overrides=[
                        f"device={device}",
                        f"defense={defense}",
                        "resume=false",
                        "progress=false",
                        *overrides,
                    ],
                    return_hydra_config=True,
                )
            t0 = time.perf_counter()
            row = pipeline.run(cfg)
            sync(device)
            return time.perf_counter() - t0, row

        run("none")  # fills the encoder cache (pre-training, implant) and warms everything up
        (t_none, none_row), (t_tcore, tcore_row) = run("none"), run("tcore")
    phases = {k.split("time/tcore_")[1]: v for k, v in tcore_row["diagnostics"].items() if "time/tcore_" in k}
    print(f"tcore phases (s): {phases}; run phases none {none_row['timings']}, tcore {tcore_row['timings']}")
    print(
        f"RATIO tcore     {t_tcore / t_none:6.2f}  tcore {t_tcore:8.1f} s  none {t_none:8.1f} s  "
        f"(one cell, {' '.join(overrides)}; target <= 3, a time ratio)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default="ssl,features,probe,tcore")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tcore", nargs="*", default=None, help="overrides of the T-Core cell")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    width = args.width or (64 if cuda else 8)
    n = args.n or (20480 if cuda else 2048)
    batch = args.batch or (512 if cuda else 128)
    num = Numerics.resolve(device, "auto", deterministic=False, threads=None)
    num.apply_global()
    print(
        f"bench on {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), {num.record()}",
        flush=True,
    )
    only = set(args.only.split(","))
    data = build_synthetic(n_train=n, n_test=100, n_pretrain=n, n_reference=10)
    if "ssl" in only:
        bench_ssl(num, data.pretrain.x, width, batch, args.repeat)
    if "features" in only or "memo" in only:
        bench_features(num, data.train.x, width, batch, args.repeat)
    if "probe" in only:
        bench_probe(num, data, width, args.repeat)
    if "tcore" in only:
        cell = ["threat=t3_badencoder_badnets", "probe=finetune", "seed=0"]
        if args.tcore is not None:
            cell += args.tcore
        elif not cuda:  # the synthetic default's cell, made small enough for `make bench` on 2 cores
            cell += [
                "dataset.n_train=1000",
                "dataset.n_test=500",
                "dataset.n_pretrain=1024",
                "encoder.epochs=2",
            ]
        bench_tcore(device, cell)


if __name__ == "__main__":
    main()
