"""ProxyMix (methods.md §1): a replay controller learned with PPO on a small proxy, frozen and transferred to a target.

- :mod:`.controller`: ``ProxyMixController`` (Eq.3-5 state and action, Eq.6-7 reward) and the ``LossSlope`` baseline;
- :mod:`.policy`: the actor-critic, PPO and the policy file;
- :mod:`.commands`: ``lightning-cit proxymix train`` (PPO episodes through the CLI) and ``proxymix mirror`` (the
  forgetting-mirroring check, Eq.1 and Spearman's rho).
"""

from lightning_cit.callbacks.proxymix.controller import LossSlope, ProxyMixController

__all__ = ["LossSlope", "ProxyMixController"]
