"""SSL methods as small modules: each owns its heads and returns a loss for two views of a batch.

`SSLMethod.loss(v1, v2)` is all the shared trainer (securetl.ssl.trainer) needs; methods with a
momentum/target network also implement `after_step()`.
"""

from __future__ import annotations

from torch import Tensor, nn

from securetl.ssl.losses import nt_xent


def mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class SSLMethod(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook for momentum updates; SimCLR has none."""


class SimCLR(SSLMethod):
    """Chen et al., ICML 2020: encoder + MLP projection head, NT-Xent between the two views."""

    def __init__(self, encoder: nn.Module, proj_dim: int = 128, temperature: float = 0.5) -> None:
        super().__init__(encoder)
        d = encoder.feat_dim
        self.head = mlp(d, d, proj_dim)
        self.temperature = temperature

    def loss(self, v1: Tensor, v2: Tensor) -> Tensor:
        return nt_xent(self.head(self.encoder(v1)), self.head(self.encoder(v2)), self.temperature)


SSL_METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR}


def build_method(name: str, encoder: nn.Module, **kwargs) -> SSLMethod:
    if name not in SSL_METHODS:
        raise ValueError(f"encoder.ssl={name!r} is unknown; choose from {sorted(SSL_METHODS)}")
    return SSL_METHODS[name](encoder, **kwargs)
