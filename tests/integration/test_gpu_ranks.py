"""GPU learner ranks on one node see the node's GPUs and each binds the one Ray gave it (NCCL
needs the peers' GPUs visible to use NVLink, and has hung on NVSwitch machines without). Ray
schedules GPUs it is told of on a machine without any, so this runs on CPUs: it checks what each
rank's process sees, not CUDA."""

from __future__ import annotations

import os

import pytest

from choreo.launch.runtime.learner_group import rank_options
from choreo.learner.dist import rank_device

pytestmark = pytest.mark.slow


def test_gpu_ranks_share_the_nodes_gpus_and_bind_their_own():
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from choreo.launch.runtime.ray_runtime import WORKER_ENV_VARS, shutdown_ray, start_local_ray

    class Look:  # defined here: Ray's workers cannot import a test module, so it travels by value
        def sees(self) -> tuple[str | None, list, str | None]:
            return os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids(), os.environ.get("MUJOCO_GL")

    start_local_ray(num_cpus=2, num_gpus=2)
    try:
        group = placement_group([{"CPU": 0.5, "GPU": 1}] * 2, strategy="PACK")
        ray.get(group.ready(), timeout=60)
        look = ray.remote(num_cpus=0.5, num_gpus=1)(Look)
        ranks = [look.options(**rank_options(1), scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=r)).remote() for r in range(2)]
        seen = ray.get([r.sees.remote() for r in ranks], timeout=60)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the node's, as this process has it
        assert [v for v, _, _ in seen] == [visible, visible], "Ray narrowed a rank's visible GPUs"
        assert sorted(str(ids[0]) for _, ids, _ in seen) == ["0", "1"], seen
        assert sorted(rank_device(ids, v).index for v, ids, _ in seen) == [0, 1]
        # The rank's own variable did not replace the job's (the renderer's among them).
        assert [gl for _, _, gl in seen] == [WORKER_ENV_VARS["MUJOCO_GL"]] * 2
        remove_placement_group(group)

        # Without the group's options Ray narrows the view to the actor's own GPU, numbered 0.
        alone = ray.get(look.remote().sees.remote(), timeout=60)
        assert alone[0] == str(alone[1][0])
    finally:
        shutdown_ray()
