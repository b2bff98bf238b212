"""Get the (possibly backdoored) pre-trained encoder a run starts from.

    clean:      build the architecture, then load `checkpoint` or SSL-pretrain on the pre-training split
                (a pre-training-data attack poisons that split first)        -> cached "encoder/<key>"
    implanted:  an encoder fine-tuning attack (BadEncoder, DRUPE) runs on it  -> cached "implanted/<key>"

Keys hash the encoder config, a digest of the actual pre-training images, and the attack config where one
acts, so changing the downstream split or the seed of the downstream run does not retrain an encoder. They
also hash the numerics (device, precision, CPU threads): an encoder trained under 1 thread differs from one
trained under 2, and a row must not depend on which of its sweep's jobs filled the cache.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from securetl.cache import Cache, config_hash
from securetl.encoders.checkpoint import file_digest, load_checkpoint
from securetl.encoders.resnet import Encoder, build_encoder
from securetl.interfaces import EncoderAttack, LabeledSet, RunContext, pretraining_sets
from securetl.ssl.trainer import pretrain

log = logging.getLogger(__name__)


@dataclass
class EncoderSpec:
    """conf/encoder/*.yaml: architecture, SSL method and schedule, or a checkpoint to load instead."""

    arch: str = "cifar_resnet18"
    width: int = 64
    ssl: str = "simclr"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    seed: int = 0
    augment: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_prefix: str | None = None  # where the encoder sits in the file; None = detect
    # Input normalisation the weights expect (None = the architecture's default): a released checkpoint
    # must see inputs normalised as in its authors' code.
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        for k in ("augment", "method", "timm_kwargs"):
            v = getattr(self, k)
            setattr(self, k, dict(v) if v is not None else {})
        if self.epochs < 0 or self.batch_size < 2:
            raise ValueError("encoder.epochs must be >= 0 and encoder.batch_size >= 2")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None:
                v = [float(a) for a in v]
                if len(v) != 3 or (k == "std" and min(v) <= 0):
                    raise ValueError(
                        f"encoder.{k} must be 3 numbers (per RGB channel){', all > 0' if k == 'std' else ''}, got {v}"
                    )
                setattr(self, k, v)

    def build(self) -> Encoder:
        enc = build_encoder(self.arch, self.width, **self.timm_kwargs)
        if self.mean is not None:
            enc.mean.copy_(torch.tensor(self.mean).view(1, 3, 1, 1))
        if self.std is not None:
            enc.std.copy_(torch.tensor(self.std).view(1, 3, 1, 1))
        return enc


def digest(t: torch.Tensor) -> str:
    """Content hash of a tensor (the pre-training images), so the key follows the data, not its config."""
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def obtain(
    spec: EncoderSpec,
    pretrain_set: LabeledSet | None,
    attack: EncoderAttack,
    attack_cfg: Any,
    ctx: RunContext,
    reference: LabeledSet | None = None,
    background: torch.Tensor | None = None,
) -> tuple[Encoder, dict[str, str]]:
    """The encoder a run starts from, and the cache keys used (recorded in the row)."""
    cache: Cache = ctx.cache
    keys: dict[str, str] = {}
    # The initial weights are part of what the cache key names (encoder.seed): drawn from the global RNG
    # they would depend on whatever ran before in this process (another sweep job, another seed).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        encoder = spec.build()
    if spec.checkpoint:
        load_checkpoint(encoder, spec.checkpoint, spec.checkpoint_prefix)
        # keyed by the file's content and the settings that shape the encoder, not by the path
        shape = {
            k: v for k, v in asdict(spec).items() if k in ("arch", "width", "timm_kwargs", "mean", "std")
        }
        keys["encoder"] = config_hash("checkpoint", file_digest(spec.checkpoint), shape)
        keys["checkpoint"] = str(spec.checkpoint)
    else:
        if pretrain_set is None:
            raise ValueError("this dataset has no pre-training split; set encoder.checkpoint=PATH")
        if attack.kind == "pretrain_data":
            g = torch.Generator().manual_seed(spec.seed)
            parts = pretraining_sets(attack.poison_pretraining(pretrain_set, g, background=background))
            # keyed by the poisoned images themselves (cheap to make), so that a change in how an attack
            # composes them, not only in its config, is another encoder
            key = config_hash("encoder", asdict(spec), *(digest(p.x) for p in parts), ctx.num.record())
        else:
            parts = [pretrain_set]
            key = config_hash("encoder", asdict(spec), digest(pretrain_set.x), None, ctx.num.record())
        keys["encoder"] = key
        # one job builds it, concurrent jobs that need it too wait and load it
        with cache.building("encoder", key) if cache else nullcontext():
            state = cache.load_state("encoder", key) if cache else None
            if state is not None:
                encoder.load_state_dict(state)
            else:
                encoder, history = pretrain(
                    encoder.to(ctx.device),
                    [p.x for p in parts],
                    ctx,
                    ssl=spec.ssl,
                    epochs=spec.epochs,
                    batch_size=spec.batch_size,
                    lr=spec.lr,
                    weight_decay=spec.weight_decay,
                    seed=spec.seed,
                    augment=spec.augment,
                    method_kwargs=spec.method,
                )
                if cache:
                    cache.save_state(
                        "encoder", key, encoder.state_dict(), {"spec": asdict(spec), "loss": history}
                    )
    encoder = ctx.num.module(encoder.eval())
    if attack.kind == "finetune":
        key = config_hash(
            "implanted",
            keys["encoder"],
            attack_cfg,
            digest(reference.x) if reference is not None else None,
            ctx.num.record(),
        )
        keys["implanted"] = key
        # one job builds it, concurrent jobs that need it too wait and load it
        with cache.building("implanted", key) if cache else nullcontext():
            state = cache.load_state("implanted", key) if cache else None
            if state is not None:
                encoder.load_state_dict(state)
                # the attack's own diagnostics (e.g. embedding gaps) were measured when it was implanted
                meta = cache.load_meta("implanted", key) or {}
                ctx.diagnostics.update(meta.get("diagnostics", {}))
            else:
                before = set(ctx.diagnostics)
                encoder = attack.implant(encoder, pretrain_set, ctx, reference=reference)
                diag = {k: v for k, v in ctx.diagnostics.items() if k not in before}
                if cache:
                    cache.save_state(
                        "implanted",
                        key,
                        encoder.state_dict(),
                        {"attack": attack_cfg and str(attack_cfg), "diagnostics": diag},
                    )
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval(), keys
