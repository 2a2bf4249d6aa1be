"""The batch keys, named once. Environment workers, replay and agents all use these constants,
so a typo is an import error rather than a KeyError three processes away.

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
"""

OBSERVATION = "observation"
ACTION = "action"
REWARD = "reward"
DISCOUNT = "discount"
IS_FIRST = "is_first"
IS_LAST = "is_last"
IS_TERMINAL = "is_terminal"
SKILL = "skill"
POLICY_VERSION = "policy_version"

KEYS = (OBSERVATION, ACTION, REWARD, DISCOUNT, IS_FIRST, IS_LAST, IS_TERMINAL, SKILL, POLICY_VERSION)
