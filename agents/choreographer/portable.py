"""The Choreographer acting policy as a module that needs only torch: `torch.jit.script` compiles
it, and the file `torch.jit.save` writes runs with `torch.jit.load` alone (`choreo export-policy`).

It acts as `ChoreographerPolicy.act` in mode "mode" with `agent.choreographer.eval_latent: mode`
(the defaults of choreo's evaluations): the latent is the one-hot argmax of each posterior
categorical, the action the actor's mean and the meta-controller's code its most likely one, so
that nothing is drawn at random and the actions are a function of the observations alone.
Behaviours:
    explore  the exploration (LBS) actor.
    skill    the skill actor, with the code `state["skill"]` (the exported code in every row of the
             initial state; set a row to switch that environment's skill).
    meta     the meta-controller picks a code at every step and the fine-tuned skill actor executes
             it: choreo's meta policy once the reward gate has opened (the reference's
             skill_len = 1). A policy whose gate is closed holds random codes, which nothing
             deterministic reproduces, and is refused.

`initial_state(B)` is B environments at an episode start: call it at each start (to restart some
rows of a batch, give them the initial state's rows: what choreo's `is_first` does). The state is a
dict of tensors with one row per environment:
    deter        [B, deter] float32, the RSSM's deterministic state
    stoch        [B, stoch * classes] float32, the one-hot latents, flattened
    prev_action  [B, A] float32, the action that led to the current observation
    skill        [B] int64, the code that conditions the skill actor (-1: none)
    skill_steps  [B] int64, steps the current code has been held
"""

# No `from __future__ import annotations`: TorchScript reads the class-level `Final` annotations
# as objects, not strings.
import copy
from collections.abc import Mapping
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from choreo.agents.choreographer.policy import ChoreographerPolicy


class PortableChoreographerPolicy(nn.Module):
    """`initial_state(batch_size) -> state`, `step(observation [B, *obs_shape], state) -> (action
    [B, A] float32 in [-1, 1], state)`; `metadata` describes both, with `about`'s entries."""

    pixels: Final[bool]
    conditioned: Final[bool]
    num_codes: Final[int]
    stoch: Final[int]
    classes: Final[int]
    initial_skill: Final[int]
    observation_shape: list[int]
    action_dim: int
    metadata: dict[str, str]

    def __init__(self, policy: ChoreographerPolicy, about: Mapping[str, str] | None = None) -> None:
        """A copy of `policy`'s acting networks (it loaded its weights already), for its behaviour:
        explore; skill with one code for every environment (`set_skills(k)`); meta with the
        reward gate open. ValueError otherwise."""
        super().__init__()
        behaviour = policy.behaviour
        initial_skill = -1
        if behaviour == "skill":
            if policy.skills is None or policy.skills.dim() != 0:
                raise ValueError("a portable skill policy holds one code for every environment: give the policy "
                                 "one, set_skills(k)")
            initial_skill = int(policy.skills)
        if behaviour == "meta" and not bool(policy.gate_open):
            raise ValueError("the meta policy's reward gate is closed: its meta-controller has not been trained, "
                             "and until the gate opens choreo's meta policy acts with random codes")
        rssm = policy.rssm
        self.pixels = len(policy.obs_shape) == 3
        self.conditioned = behaviour != "explore"
        self.num_codes = policy.num_codes
        self.stoch, self.classes = rssm.stoch, rssm.classes
        self.initial_skill = initial_skill
        # The networks' layers alone (Sequentials, Linears, the GRU cell): their wrappers reshape
        # any leading dims in ways TorchScript does not compile, and the batch here is always 2-D.
        self.encoder = copy.deepcopy(policy.encoder.net)
        self.img_in = copy.deepcopy(rssm.img_in)
        self.gru = copy.deepcopy(rssm.gru)
        self.post_hidden = copy.deepcopy(rssm.post_hidden)
        self.post_out = copy.deepcopy(rssm.post_out)
        actor = policy.explore_actor if behaviour == "explore" else policy.skill_actor
        self.actor = copy.deepcopy(actor.net)
        if behaviour == "meta":
            self.meta_actor = copy.deepcopy(policy.meta_actor.net)
        self.requires_grad_(False)
        self.observation_shape = list(policy.obs_shape)
        self.action_dim = policy.action_dim
        self.metadata = {**describe(policy, behaviour, initial_skill), **dict(about or {})}

    @torch.jit.export
    def initial_state(self, batch_size: int) -> dict[str, Tensor]:
        """The state of `batch_size` environments at an episode start (see the module docstring)."""
        weight = self.post_out.weight  # the state lives where the weights do
        return {
            "deter": torch.zeros(batch_size, self.gru.hidden, dtype=weight.dtype, device=weight.device),
            "stoch": torch.zeros(batch_size, self.stoch * self.classes, dtype=weight.dtype, device=weight.device),
            "prev_action": torch.zeros(batch_size, self.action_dim, dtype=weight.dtype, device=weight.device),
            "skill": torch.full([batch_size], self.initial_skill, dtype=torch.int64, device=weight.device),
            "skill_steps": torch.zeros(batch_size, dtype=torch.int64, device=weight.device),
        }

    @torch.jit.export
    def step(self, observation: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """`observation [B, *observation_shape]` (uint8 pixels or float32 states) and the state of
        the previous step (or `initial_state(B)`) -> (action [B, A] float32 in [-1, 1], new state)."""
        self._check(observation, state)
        with torch.no_grad():
            x = observation.to(torch.float32)
            if self.pixels:  # channels-last, as choreo's encoder runs it
                x = (x / 255.0 - 0.5).contiguous(memory_format=torch.channels_last)
            embed = self.encoder(x).flatten(1)  # the conv encoder's [B, C, 2, 2] as one vector
            deter = self._recur(state["stoch"], state["prev_action"], state["deter"])
            hidden = F.elu(self.post_hidden(torch.cat([deter, embed], -1)))
            logits = self.post_out(hidden).reshape(-1, self.stoch, self.classes).float()
            stoch = F.one_hot(logits.argmax(-1), self.classes).to(logits.dtype).flatten(1)
            feat = torch.cat([stoch, deter], -1)

            skill, steps = state["skill"], state["skill_steps"]
            # hasattr on a module is decided when scripting: only a meta policy compiles this branch.
            if hasattr(self, "meta_actor"):
                skill = torch.log_softmax(self.meta_actor(feat).float(), -1).argmax(-1)
                steps = torch.zeros_like(steps)
            if self.conditioned:
                code = F.one_hot(skill.clamp_min(0), self.num_codes).to(feat.dtype)
                out = self.actor(torch.cat([feat, code], -1))
                steps = steps + 1
            else:
                out = self.actor(feat)
            action = torch.tanh(out.float().chunk(2, -1)[0])
        # The state keeps its own copy: a caller that scales the returned action in place (through
        # a numpy view, say) must not change what the next step is conditioned on.
        return action, {"deter": deter, "stoch": stoch, "prev_action": action.clone(), "skill": skill,
                        "skill_steps": steps}

    def forward(self, observation: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.step(observation, state)

    def _recur(self, stoch: Tensor, prev_action: Tensor, deter: Tensor) -> Tensor:
        # The input layer as two products, as `RSSM._recur` computes it, so that the results agree
        # to the last bit rather than to rounding.
        latent = self.stoch * self.classes
        weight = self.img_in.weight
        x = F.linear(prev_action, weight[:, latent:], self.img_in.bias)
        x = x + F.linear(stoch, weight[:, :latent])
        return self.gru(F.elu(x), deter)

    def _check(self, observation: Tensor, state: dict[str, Tensor]) -> None:
        shape = list(observation.shape)
        if len(shape) != 1 + len(self.observation_shape) or shape[1:] != self.observation_shape:
            raise ValueError(f"observation of shape {observation.shape}; this policy takes [B] + "
                             f"{self.observation_shape} (a batch of B observations)")
        rows = state["deter"].shape[0]
        if rows != observation.shape[0]:
            raise ValueError(f"a state of {rows} environments for {observation.shape[0]} observations: make it "
                             f"with initial_state({observation.shape[0]})")


def describe(policy: ChoreographerPolicy, behaviour: str, skill: int) -> dict[str, str]:
    """What a user of the exported file needs to feed it, in words."""
    shape = ", ".join(str(d) for d in policy.obs_shape)
    if len(policy.obs_shape) == 3:
        observation = (f"[B, {shape}] uint8 pixels, channels first, values 0..255 (scaled to [-0.5, 0.5] inside "
                       f"the policy)")
    else:
        observation = f"[B, {shape}] float32 states"
    chosen = {"explore": "the exploration (LBS) actor",
              "skill": f"the skill actor holding code {skill} of {policy.num_codes}",
              "meta": f"the meta-controller choosing one of {policy.num_codes} codes at every step, executed "
                      f"by the fine-tuned skill actor"}[behaviour]
    return {
        "behaviour": behaviour,
        "skill": str(skill) if behaviour == "skill" else "",
        "policy": f"{chosen}; deterministic: the posterior latent's mode and the actor's mean action",
        "observation": observation,
        "action": f"[B, {policy.action_dim}] float32 in [-1, 1] (the task's action bounds mapped onto [-1, 1])",
        "state": "dict of tensors, one row per environment: deter, stoch, prev_action, skill (the code acting, "
                 "-1 none), skill_steps; initial_state(B) at every episode start",
    }
