"""The ProxyMix policy and its PPO update (methods.md §3a-3b), and the policy file.

The policy is an actor-critic pair of MLPs (2 hidden layers of 256, tanh; the critic has the same
shape with a scalar head). The actor gives the mean of a diagonal Gaussian over the mixture logits
``a ∈ ℝ^{T_max}`` with a learned, state-independent log standard deviation; the mixture is the masked
softmax of Eq.5, so only the logits of accessible sources (``i <= k``) matter and only they enter
the log-probability and the entropy. Transfer uses the mean action (methods.md §3f.3).

:func:`ppo_update` is the clipped PPO objective with GAE (clip 0.2, discount 0.99, GAE 0.95, entropy
0.01, value 0.5: the paper's values), rewards normalized over the rollout.

A policy file (:func:`save_policy` / :func:`load_policy`) holds the :class:`PolicySpec` (what the state
means: maximum number of tasks, feature layout, normalization constants), the actor-critic weights
and free-form ``meta`` (who trained it, on what, for how long). It contains tensors and plain types
only and is read with ``torch.load(weights_only=True)``: a tampered file cannot run code.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from lightning_cit.errors import ConfigError

POLICY_FORMAT = "lightning-cit/proxymix-policy"
POLICY_VERSION = 1
# the state layout of Eq.4; a file whose spec names another layout is refused
STATE_LAYOUT = "loss_norm[T],loss_delta[T],current_onehot[T],progress"


@dataclass
class PolicySpec:
    """What a ProxyMix policy reads and how it is built; saved with its weights."""

    max_tasks: int = 8
    """T_max: the state has 3·T_max+1 features and the action T_max logits; longer sequences need a new policy."""
    hidden_size: int = 256
    """Width of the actor's and the critic's two hidden layers (paper: 256)."""
    init_log_std: float = 0.0
    """Initial log standard deviation of the Gaussian over the logits (exploration during PPO)."""
    std_floor: float = 0.1
    """Eq.3's sqrt(v_i + ε) is floored at ``std_floor·|μ_i|`` so a flat loss history does not turn noise into large trends."""
    state_clip: float = 5.0
    """Normalized losses and trends are clipped to ±state_clip before the policy reads them."""
    layout: str = STATE_LAYOUT
    """Feature layout of the state (fixed by this version of the code)."""

    @property
    def state_dim(self) -> int:
        return 3 * self.max_tasks + 1


class ActorCritic(nn.Module):
    """Actor (mean logits) and critic (state value), each an MLP with two tanh hidden layers."""

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.spec = spec

        def mlp(out: int, gain: float) -> nn.Sequential:
            net = nn.Sequential(
                nn.Linear(spec.state_dim, spec.hidden_size), nn.Tanh(),
                nn.Linear(spec.hidden_size, spec.hidden_size), nn.Tanh(),
                nn.Linear(spec.hidden_size, out),
            )
            for layer in net:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, math.sqrt(2))
                    nn.init.zeros_(layer.bias)
            nn.init.orthogonal_(net[-1].weight, gain)  # small last layer: the initial policy is near uniform over sources
            return net

        self.actor = mlp(spec.max_tasks, 0.01)
        self.critic = mlp(1, 1.0)
        self.log_std = nn.Parameter(torch.full((spec.max_tasks,), float(spec.init_log_std)))

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor(states), self.critic(states).squeeze(-1)

    def log_prob_entropy(self, states: torch.Tensor, actions: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probability of ``actions`` and entropy, both over the masked (accessible) logits only; and the values."""
        mean, value = self(states)
        dist = torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))
        log_prob = (dist.log_prob(actions) * masks).sum(-1)
        entropy = (dist.entropy() * masks).sum(-1)
        return log_prob, entropy, value

    @torch.no_grad()
    def act(self, state: torch.Tensor, mask: torch.Tensor, deterministic: bool, generator: torch.Generator | None = None) -> dict[str, Any]:
        """One decision: logits (sampled or the mean), their log-probability and the state value."""
        mean, value = self(state.unsqueeze(0))
        mean, value = mean[0], value[0]
        std = self.log_std.exp()
        action = mean if deterministic else mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        log_prob = (torch.distributions.Normal(mean, std).log_prob(action) * mask).sum()
        return {"action": action, "log_prob": float(log_prob), "value": float(value)}


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq.5: w_i = m_i·exp(a_i) / Σ_r m_r·exp(a_r)."""
    masked = logits.masked_fill(mask <= 0, float("-inf"))
    return torch.softmax(masked, dim=-1)


# ------------------------------------------------------------------------------------------- PPO
@dataclass
class PPOConfig:
    """PPO settings (paper §3b where it gives them; the rest are common defaults)."""

    clip: float = 0.2
    """Clip range of the probability ratio (paper: 0.2)."""
    discount: float = 0.99
    """Discount γ of future rewards (paper: 0.99)."""
    gae_lambda: float = 0.95
    """GAE λ (paper: 0.95)."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus (paper: 0.01)."""
    value_coef: float = 0.5
    """Weight of the value loss (paper: 0.5)."""
    learning_rate: float = 3e-4
    """Adam learning rate (not given by the paper)."""
    epochs: int = 4
    """Passes over the rollout per update (not given by the paper)."""
    minibatch_size: int = 64
    """Transitions per gradient step (not given by the paper)."""
    max_grad_norm: float = 0.5
    """Gradient norm clip of the policy update."""
    normalize_rewards: bool = True
    """Standardize rewards over the rollout before GAE (paper: "reward normalized per rollout")."""


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, discount: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns; ``dones[t]`` ends an episode after step t (bootstrap 0)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros((), dtype=rewards.dtype)
    for t in reversed(range(len(rewards))):
        not_done = 1.0 - dones[t]
        next_value = values[t + 1] if t + 1 < len(values) else torch.zeros((), dtype=values.dtype)
        delta = rewards[t] + discount * next_value * not_done - values[t]
        running = delta + discount * lam * not_done * running
        advantages[t] = running
    return advantages, advantages + values


def ppo_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, rollout: list[dict[str, Any]], config: PPOConfig, generator: torch.Generator) -> dict[str, float]:
    """One PPO update on a rollout of transitions ``{state, action, mask, log_prob, value, reward, done}``."""
    states = torch.tensor([t["state"] for t in rollout], dtype=torch.float32)
    actions = torch.tensor([t["action"] for t in rollout], dtype=torch.float32)
    masks = torch.tensor([t["mask"] for t in rollout], dtype=torch.float32)
    old_log_probs = torch.tensor([t["log_prob"] for t in rollout], dtype=torch.float32)
    values = torch.tensor([t["value"] for t in rollout], dtype=torch.float32)
    rewards = torch.tensor([t["reward"] for t in rollout], dtype=torch.float32)
    dones = torch.tensor([float(t["done"]) for t in rollout], dtype=torch.float32)
    if config.normalize_rewards and len(rewards) > 1:
        rewards = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    advantages, returns = gae(rewards, values, dones, config.discount, config.gae_lambda)
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
    updates = 0
    n = len(rollout)
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.minibatch_size):
            idx = order[start : start + config.minibatch_size]
            adv = advantages[idx]
            if len(idx) > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            log_prob, entropy, value = policy.log_prob_entropy(states[idx], actions[idx], masks[idx])
            ratio = (log_prob - old_log_probs[idx]).exp()
            policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - config.clip, 1 + config.clip) * adv).mean()
            value_loss = (value - returns[idx]).pow(2).mean()
            loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
            stats["policy_loss"] += float(policy_loss.detach())
            stats["value_loss"] += float(value_loss.detach())
            stats["entropy"] += float(entropy.mean().detach())
            stats["clip_fraction"] += float(((ratio.detach() - 1).abs() > config.clip).float().mean())
            updates += 1
    return {k: v / max(updates, 1) for k, v in stats.items()}


# ------------------------------------------------------------------------------------------- files
def save_policy(path: str, policy: ActorCritic, meta: dict[str, Any] | None = None) -> None:
    """Write the policy file atomically (spec + weights + meta)."""
    payload = {
        "format": POLICY_FORMAT,
        "version": POLICY_VERSION,
        "spec": asdict(policy.spec),
        "state_dict": {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()},
        "meta": meta or {},
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".policy.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_policy(path: str) -> tuple[ActorCritic, dict[str, Any]]:
    """Read a policy file with ``weights_only=True``; anything else than a policy written by :func:`save_policy` is a clear error."""
    if not os.path.isfile(path):
        raise ConfigError(f"ProxyMix policy file {path!r} does not exist; train one with `lightning-cit proxymix train --config ...`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refuses code objects, truncated zips, foreign formats
        raise ConfigError(f"{path!r} is not a readable ProxyMix policy file ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != POLICY_FORMAT:
        raise ConfigError(f"{path!r} is not a ProxyMix policy file (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})")
    if payload.get("version") != POLICY_VERSION:
        raise ConfigError(f"{path!r} has policy format version {payload.get('version')}; this lightning-cit reads version {POLICY_VERSION}")
    known = {f.name for f in fields(PolicySpec)}
    raw_spec = payload.get("spec")
    if not isinstance(raw_spec, dict) or set(raw_spec) - known:
        raise ConfigError(f"{path!r}: unknown policy spec fields {sorted(set(raw_spec or {}) - known)}; valid: {sorted(known)}")
    spec = PolicySpec(**raw_spec)
    if spec.layout != STATE_LAYOUT:
        raise ConfigError(f"{path!r}: the policy reads state layout {spec.layout!r}, this code builds {STATE_LAYOUT!r}")
    policy = ActorCritic(spec)
    try:
        policy.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise ConfigError(f"{path!r}: the weights do not fit the policy spec {raw_spec} ({str(err).splitlines()[0][:200]})") from None
    if not all(torch.isfinite(p).all() for p in policy.parameters()):
        raise ConfigError(f"{path!r}: the policy weights contain NaN or inf")
    return policy, dict(payload.get("meta", {}))
