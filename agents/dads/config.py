"""Typed settings of DADS (Sharma et al., ICLR 2020). The planner in skill space, one for both
algorithms, has its settings in `AgentConfig.planner` (`agent.planner.*`).

Defaults follow the reference implementation's Ant off-policy configuration ("off-DADS") where the
paper and the released configs disagree (see ../shared/reference/dads-reference-code.md): L = 100
prior samples (the paper says 500), widths 512, skill dimension 2 (the x-y prior's). Every field
carries a docstring (the string literal under it), which `launch.runtime.config` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DadsConfig:
    skill_type: Literal["continuous", "discrete"] = "continuous"
    """Continuous skills z ~ U(-1, 1)^D, or discrete ones: uniform over D one-hot vectors."""
    skill_dim: int = 2
    """D: size of the skill vector (continuous) or number of skills (discrete). 2 for Ant with the
    x-y prior, 3 without, 5 for Humanoid; 20 discrete skills in the paper's Ant."""
    prior_samples: int = 100
    """L: alternative skills drawn from the prior per transition for the reward's denominator
    (continuous skills; discrete ones sum exactly over all skills). The released configs use 100,
    the paper's appendix 500."""
    hidden: int = 512
    """Width of the two ReLU hidden layers of q, the actor and each critic (128 Half-Cheetah,
    512 Ant, 1024 Humanoid)."""
    layers: int = 2
    """Hidden layers of q, the actor and each critic."""
    num_components: int = 4
    """Gaussians in q's mixture; each has identity covariance in the standardised target space."""
    normalize: bool = True
    """Standardise q's state input (with a learned scale and shift) and its target change, with
    batch statistics in training and running statistics for the reward and predictions."""
    norm_momentum: float = 0.01
    """Weight of a new batch in the running statistics (TensorFlow's batch-norm momentum 0.99)."""
    norm_eps: float = 1e-3
    """Added to the variance before dividing by its square root (TensorFlow's default)."""
    omit_coordinates: int = 0
    """Observation omission: the first k observation dims (global coordinates, e.g. 2 for Ant's
    x, y) are removed from the input of q, the actor and the critics; q still predicts their
    change."""
    dynamics_dims: tuple[int, ...] = ()
    """The x-y prior: the observation dims that make q's state space (e.g. [0, 1] for Ant's x, y);
    q predicts their change only, and the planner rolls these dims forward. Empty: the whole
    observation. Omitted coordinates among them are still predicted but not fed to q, so with
    both options on for the same dims q(delta | z) does not see the state at all (as in the
    reference)."""
    dynamics_lr: float = 3e-4
    """Adam learning rate of q."""
    dynamics_steps: int = 1
    """Adam steps of q, each on the whole batch, on the updates that train q."""
    dynamics_every: int = 8
    """Updates between the q steps: q trains on every 8th update, SAC on every update (the
    reference's off-policy ratio of 8 q steps per 64 SAC steps)."""
    importance_clip: float = 10.0
    """epsilon of off-DADS: q's likelihood is weighted by clip(pi_current / pi_behaviour,
    1/epsilon, epsilon); a value <= 1 switches importance weighting off (the reference's rule)."""
    normalize_weights: bool = False
    """Divide the importance weights by their batch mean (the reference's
    normalized_importance_sampling variant)."""
    reward_chunk: int = 65536
    """Rows of q evaluated at once for the reward's denominator (transitions x alternatives);
    bounds its memory."""
    lr: float = 3e-4
    """Adam learning rate of the actor, the critics and the temperature."""
    adam_eps: float = 1e-8
    """Adam epsilon of every DADS optimiser (TensorFlow 1's AdamOptimizer default)."""
    discount: float = 0.99
    """SAC discount (the reference's Ant off-policy config; 0.995 on-policy)."""
    tau: float = 0.005
    """Target critics move this fraction toward the critics after every critic step."""
    reward_scale: float = 10.0
    """Intrinsic reward multiplier in the critic target, 1 / beta with the reference's initial
    entropy coefficient beta = 0.1 (the temperature then adapts from 1)."""
    initial_log_alpha: float = 0.0
    """Initial log of SAC's learned temperature."""
    target_entropy_scale: float = 0.5
    """The temperature's target entropy is -scale * action_dim. 0.5, -|A| / 2, is the default of
    tf-agents' SacAgent (checked in the 0.4.0 wheel the reference pins), which the reference's SAC
    uses without setting it; 1 is the SAC paper's -|A|."""
    log_std_min: float = -20.0
    """Lower clip of the actor's log standard deviation (before the tanh squash)."""
    log_std_max: float = 2.0
    """Upper clip of the actor's log standard deviation."""
    sac_steps: int = 1
    """SAC steps (critic, actor, temperature, targets) per update, each on the whole batch."""


SHAPE_KEYS = (
    "dads.skill_dim",
    "dads.hidden",
    "dads.layers",
    "dads.num_components",
    "dads.normalize",
    "dads.omit_coordinates",
    "dads.dynamics_dims",
)
"""Keys of `AgentConfig` (dotted, relative to it) that decide the shapes of the DADS agent's
tensors, together with the observation and action sizes (see `agents.registry.shape_keys`)."""
