"""The vocabulary every role shares: the batch keys and the seed derivation. It imports nothing of
choreo's, so environment workers, replay, agents and the learner name a key or derive a seed
without importing one another, and a typo is an import error rather than a KeyError three
processes away.

Layout of a training batch (numpy in replay, torch in the learner), B sequences of T steps:
    observation     [B, T, D] float32 (states) or [B, T, 3, 64, 64] uint8 (pixels)
    action          [B, T, A] float32 in [-1, 1]; action[t] is the action that LED TO observation[t]
                    (zeros on the first step of an episode)
    reward          [B, T] float32; reward[t] came with observation[t]
    discount        [B, T] float32; 0 after a true termination, else 1
    is_first        [B, T] bool; observation[t] is a reset observation
    is_last         [B, T] bool; observation[t] ends its episode (terminated or truncated)
    is_terminal     [B, T] bool; observation[t] ends its episode by termination
    skill           [B, T] int32; the skill index held when choosing the action (-1 when none)
    policy_version  [B, T] int64; version of the weights that chose action[t] (-1: random seed actions)

Optional keys, written only by the workers of algorithms whose policies report them (not in KEYS):
    skill_vector    [B, T, D] float32; the skill vector held when choosing action[t] (DADS: a
                    continuous skill in [-1, 1]^D or a one-hot of a discrete one)
    behaviour_logp  [B, T] float32; log-probability of action[t] under the policy that chose it
                    (off-DADS importance weights)

Seeds: every actor, environment and shard seed comes from the run's root seed and a role path
(`derive_seed`), so runs reproduce and no two components share a random stream.
"""

from __future__ import annotations

import hashlib

OBSERVATION = "observation"
ACTION = "action"
REWARD = "reward"
DISCOUNT = "discount"
IS_FIRST = "is_first"
IS_LAST = "is_last"
IS_TERMINAL = "is_terminal"
SKILL = "skill"
POLICY_VERSION = "policy_version"

SKILL_VECTOR = "skill_vector"
BEHAVIOUR_LOGP = "behaviour_logp"

KEYS = (OBSERVATION, ACTION, REWARD, DISCOUNT, IS_FIRST, IS_LAST, IS_TERMINAL, SKILL, POLICY_VERSION)


def derive_seed(root: int, *path: str | int) -> int:
    """A 31-bit seed for the component named by `path`, e.g. derive_seed(0, "actor", 3, "env", 1).

    Hash-based (not root + i), so neighbouring roots and indices give unrelated streams.
    """
    text = "/".join([str(int(root)), *map(str, path)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & 0x7FFFFFFF
