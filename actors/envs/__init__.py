"""Environments: the URL benchmark on dm_control, Meta-World sparse reach, any gymnasium env.

Every environment is a gymnasium.Env with a Box action space in [-1, 1].
"""

from __future__ import annotations

URLB_IDS = (
    "walker_stand", "walker_walk", "walker_run", "walker_flip",
    "quadruped_stand", "quadruped_walk", "quadruped_run", "quadruped_jump",
    "jaco_reach_top_left", "jaco_reach_top_right", "jaco_reach_bottom_left", "jaco_reach_bottom_right",
)  # fmt: skip
METAWORLD_IDS = ("mw_reach",)
ENV_IDS = URLB_IDS + METAWORLD_IDS
GYM_PREFIX = "gym:"


def is_gym_id(task: str) -> bool:
    return task.startswith(GYM_PREFIX) and len(task) > len(GYM_PREFIX)
