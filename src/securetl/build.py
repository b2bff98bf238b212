"""The one place that turns a config node into an object (hydra.utils.instantiate)."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from securetl.validate import ConfigError, check_node


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate `node` (recursively: a trigger inside an attack becomes an object too).

    Its values are first checked against the target's signature (validate.check_node), so a value of the
    wrong type is named by its key. Errors raised by a constructor's own checks (ValueError/TypeError) come
    back as ConfigError with the constructor's message and the group, so the CLI can print one clear line
    instead of Hydra's wrapped traceback.
    """
    where = (node._get_full_key(None) if isinstance(node, DictConfig) else "") or "?"
    check_node(node, where)
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except MissingMandatoryValue as e:  # a `???` in a YAML the user has to fill in
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key} must be set (e.g. {key}=VALUE on the command line)") from e
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, ConfigError):  # already a complete user-facing message
            raise ConfigError(str(cause)) from cause
        if not isinstance(cause, ValueError | TypeError | FileNotFoundError):
            raise cause from None  # not about the config (a bug, out of memory): the error itself
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        raise ConfigError(f"{cause}  [{where}: {target}]") from cause
