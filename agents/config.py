"""Typed settings of the algorithms.

Every field carries a docstring (the string literal under it); `launch.runtime.config` reads them to
explain keys and a test checks none is missing. Defaults are the reference implementation's
sizes (the `paper` preset); `configs/size/tiny.yaml` shrinks them for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from choreo.agents.dads.config import DadsConfig


@dataclass(frozen=True)
class WorldModelConfig:
    deter: int = 200
    """Size of the GRU's deterministic state h_t."""
    hidden: int = 200
    """Width of the RSSM's input and prior/posterior hidden layers."""
    stoch: int = 32
    """Number of categorical latent variables in the stochastic state."""
    classes: int = 32
    """Number of classes of each categorical latent variable."""
    mlp_units: int = 400
    """Width of the MLP encoder, decoder and reward head."""
    mlp_layers: int = 4
    """Depth of the MLP encoder, decoder and reward head."""
    cnn_depth: int = 48
    """Channels of the first convolution of the pixel encoder (doubled at each of 4 layers)."""
    kl_balance: float = 0.8
    """Weight of the prior's side of the balanced KL (DreamerV2 KL balancing)."""
    kl_free: float = 1.0
    """Free nats applied to the batch-mean KL."""
    reward_grad: bool = False
    """Let the reward loss shape the representation (False: the reward head sees detached features)."""
    lr: float = 3e-4
    """Adam learning rate of the world model."""
    eps: float = 1e-5
    """Adam epsilon of the world model."""
    grad_clip: float = 100.0
    """Gradient-norm clip of the world model."""
    weight_decay: float = 1e-6
    """Multiplicative decay applied to the world model's parameters before each Adam step."""


@dataclass(frozen=True)
class ActorCriticConfig:
    horizon: int = 15
    """Imagination horizon in steps (the rollout holds horizon + 1 states)."""
    discount: float = 0.99
    """Constant discount of imagined returns (no discount head: these tasks never terminate)."""
    lambda_: float = 0.95
    """Lambda of the lambda-returns."""
    units: int = 400
    """Width of actor and critic MLPs."""
    layers: int = 4
    """Depth of actor and critic MLPs."""
    actor_lr: float = 8e-5
    """Adam learning rate of every actor (exploration, skills, meta-controller)."""
    critic_lr: float = 8e-5
    """Adam learning rate of every critic."""
    eps: float = 1e-5
    """Adam epsilon of actors and critics."""
    grad_clip: float = 100.0
    """Gradient-norm clip of actors and critics."""
    weight_decay: float = 1e-6
    """Multiplicative decay applied to actor and critic parameters before each Adam step."""
    actor_min_std: float = 0.1
    """Lower bound of the actor's standard deviation."""
    actor_entropy: float = 0.0
    """Entropy bonus of the actors during pretraining."""
    slow_target_every: int = 100
    """Updates between copies of the critic into its slow target."""
    slow_target_fraction: float = 1.0
    """Fraction of the critic mixed into the slow target at each copy (1 = hard copy)."""


@dataclass(frozen=True)
class ChoreographerConfig:
    num_codes: int = 64
    """Number of skills: codes in the VQ-VAE codebook."""
    code_dim: int = 16
    """Dimension of each code."""
    ema_decay: float = 0.99
    """Decay of the codebook's exponential moving averages."""
    commitment: float = 1e-4
    """Weight of the VQ commitment loss."""
    resample_every: int = 200
    """Skill updates between code resamplings (0 switches resampling off)."""
    resample_codes: bool = True
    """Whether a resampling check re-places the codes no state chose since the previous one. False
    keeps the checks (the active codes of each window are counted and logged) and re-places none:
    a run without resampling measured as one with it (the paper's Figure 7)."""
    skill_lr: float = 8e-5
    """Adam learning rate of the skill auto-encoder."""
    knn_k: int = 30
    """Neighbours of the k-NN particle entropy reward (the point itself included)."""
    knn_clip: float = 1e-4
    """Distances are reduced by this and clipped at 0 before averaging."""
    knn_chunk: int = 2048
    """Rows per chunk of the exact k-NN computation; bounds its memory to chunk x N."""
    knn_bf16: bool = False
    """Compute k-NN distances in bfloat16 (approximate; faster where the CPU/GPU supports it)."""
    knn_pool: Literal["rank", "global"] = "rank"
    """With several learners (learner.num_learners): the k-NN particles of each rank's states are
    that rank's own imagined states (`rank`; the paper's estimator when each rank's batch is the
    paper's batch, weak scaling) or every rank's gathered (`global`; the paper's estimator over the
    whole batch, strong scaling; `rank` with learner.scaling=strong is refused). No effect with one
    learner."""
    exploration_reward_momentum: float = 0.95
    """Momentum of the running magnitude that normalises the LBS exploration reward."""
    reward_gate: float = 1e-4
    """Fine-tuning trains only the world model until a batch holds a reward at least this big."""
    random_skill_every: int = 125
    """Agent steps a random skill is held while the reward gate is closed."""
    eval_latent: Literal["mode", "sample"] = "mode"
    """The posterior latent when the policy acts in mode "mode" (fine-tuning's evaluations, skill
    videos, `run_skills`): `mode`, the argmax of each categorical, so that acting is a deterministic
    function of the observations and two evaluations on the same seeded episodes differ only by
    the weights; `sample`, a draw with the policy's generator, as the reference evaluates
    (`eval_state_mean: False`). Actions are the mean and codes the most likely either way. Default
    `mode`, for that determinism; with a sharp posterior the two differ little."""
    meta_entropy: float = 1e-4
    """Entropy bonus of the meta-controller."""


@dataclass(frozen=True)
class FinetuneConfig:
    freeze_skills: bool = False
    """Fine-tuning trains the meta-controller only: the skill actor keeps its pretrained weights
    (the paper's Figure 9 ablation; the reference's flag for this has no effect)."""


@dataclass(frozen=True)
class PrecisionConfig:
    autocast: Literal["auto", "off", "bf16"] = "auto"
    """Mixed precision of the learner: auto = bf16 autocast on CUDA, float32 on the CPU."""
    compile: bool = False
    """Compile the update's hot modules (the recurrent cell and every MLP) with torch.compile. On
    CUDA it removes kernel launches from the imagination loop; on the CPU it needs a C++ compiler
    and its figures are in docs/performance.md. Compilation takes a minute or more at start-up."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode; reduce-overhead replays CUDA graphs."""


@dataclass(frozen=True)
class PlannerConfig:
    horizon: int = 1
    """H_P: skill segments in a plan (paper App. A.5: 1 for dense rewards, 4 for sparse ones)."""
    hold: int = 10
    """H_Z: model steps each skill of a plan is held (10 dense, 25 sparse)."""
    candidates: int = 50
    """K: plans sampled per refinement iteration, simulated as one batch (50 dense, 200 sparse).
    Choreographer's 64 codes with H_P = 1 are searched exhaustively once K >= 64."""
    iterations: int = 10
    """R: refinement iterations of the plan distribution."""
    gamma: float = 10.0
    """MPPI temperature: plans are weighted by softmax(gamma * return). Depends on the reward's
    scale."""
    variance: float = 1.5
    """Continuous skills: variance of the Gaussian plans are sampled from around the current mean
    (the reference's covariance 1.5 I); samples are clipped to the prior's support [-1, 1]."""
    smoothing: float = 0.0
    """Continuous skills: sampled plans are smoothed, z_i <- beta z_{i-1} + (1 - beta) z_i
    (the reference's smoothing_beta; 0.9 for sparse rewards, 0 switches it off)."""
    mix: float = 0.5
    """Discrete skills and codes: weight of the refined categorical per segment against the previous
    one, p <- mix * p_weighted + (1 - mix) * p_previous (1: no memory of the previous iteration)."""
    execute: Literal["sample", "mean"] = "mean"
    """How the skill policy executes the chosen skill in the environment (`choreo plan`): `sample`
    draws its actions, as the reference does (its low-level policy is tf-agents' SAC ActorPolicy,
    which samples) and as the skills acted when DADS's q was fit to their transitions, so that q's
    predictions describe this execution; `mean` takes the mean action (less noisy, and what
    Choreographer's imagined rollouts use). Default `mean`: a plan's outcome then depends on the
    plan alone, and with a briefly pretrained DADS the sampled execution ended farther from the goal
    than random skills (docs/dads-and-planning.md, "Differences from the reference")."""
    initial_mean: Literal["zero", "random"] = "zero"
    """Continuous skills: the mean each new plan segment starts from (at an episode's start and for
    the segment appended after each execution): `zero`, the prior's centre, or `random`, a draw
    from N(0, I) with the planner's seeded generator, as the reference's eval_mppi. Default `zero`:
    the R refinement iterations move the mean to where the returns are; a random start only adds
    variance between plans and, where the draw lands outside [-1, 1] (a third of the dimensions),
    a pull toward that corner, since the candidates are clipped."""


@dataclass(frozen=True)
class AgentConfig:
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    """The DreamerV2-style world model."""
    actor_critic: ActorCriticConfig = field(default_factory=ActorCriticConfig)
    """Actor-critics trained in imagination."""
    choreographer: ChoreographerConfig = field(default_factory=ChoreographerConfig)
    """Skill codebook, skill rewards, exploration and meta-controller."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Mixed precision and compilation."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """What fine-tuning trains."""
    dads: DadsConfig = field(default_factory=DadsConfig)
    """DADS (algo=dads): skill dynamics, the DADS reward and SAC."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """Zero-shot model-predictive control in skill space (MPPI, `choreo plan`), of either
    algorithm: over DADS's skills with its skill dynamics, or over Choreographer's codes with its
    world model."""
