"""The one place that turns a config node into an object (hydra.utils.instantiate)."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from securetl.validate import ConfigError


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate `node` (recursively: a trigger inside an attack becomes an object too).

    Errors raised by a constructor's own checks (ValueError/TypeError) come back as ConfigError with the
    constructor's message, so the CLI can print one clear line instead of Hydra's wrapped traceback.
    """
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except MissingMandatoryValue as e:  # a `???` in a YAML the user has to fill in
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key} must be set (e.g. {key}=VALUE on the command line)") from e
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, ConfigError):  # already a complete user-facing message
            raise ConfigError(str(cause)) from cause
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        msg = str(cause) if isinstance(cause, ValueError | TypeError | FileNotFoundError) else str(e)
        raise ConfigError(f"{msg}  [while building {target}]") from cause
