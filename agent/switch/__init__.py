"""Traffic switches run at takeover: DNS (RFC 2136, Route 53) and hooks (exec, webhook).

``build_switch`` picks the provider a configured switch names; each provider is a
module of its own beside ``base`` (the ``Switch`` interface), and none imports another.
"""

from __future__ import annotations

from agent.failover_config import SwitchConfig
from agent.switch.base import Switch


def build_switch(cfg: SwitchConfig) -> Switch:
    """The provider for one configured switch."""
    if cfg.provider == "rfc2136":
        from agent.switch.rfc2136 import Rfc2136

        return Rfc2136(cfg)
    if cfg.provider == "route53":
        from agent.switch.route53 import Route53

        return Route53(cfg)
    from agent.switch.hooks import ExecHook, WebhookHook

    if cfg.provider == "exec":
        return ExecHook(cfg)
    return WebhookHook(cfg)
