"""The learner ranks of a run, as Ray actors: one `LearnerActor` for a single learner, or
learner.num_learners of them in one placement group, joined over torch.distributed
(`choreo.learner.dist`), that train the one agent data-parallel.

The driver talks to the group as it would to one learner: a training call goes to every rank
with the same grant (each rank trains that many batches of its own; they leave the call
together), the weights come from rank 0, and a checkpoint is rank 0's state with the other
ranks' generator states. A group fails as a whole: if any rank dies or its call fails (a rank
that hangs makes the others' collectives time out), the driver kills every rank, survivors
included (they may be blocked inside a collective), and starts a new group from the last
checkpoint, with a fresh rendezvous port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CALL_SLACK_S = 60.0
"""Seconds beyond learner.group_timeout_s that the driver waits for a rank's call once rank 0's
training call is back, or for a checkpoint call: the ranks train in step, so they are back at
about the same time unless one hangs."""


def rendezvous_address() -> str:
    """host:port for rank 0's process group, picked on the node this runs on."""
    import ray

    from choreo.learner.dist import free_port

    host = ray.util.get_node_ip_address()
    return f"{host}:{free_port(host)}"


SHARE_GPUS = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
"""Ray leaves CUDA_VISIBLE_DEVICES as the node has it: each GPU rank sees the node's GPUs and binds
the one Ray gave it (`choreo.learner.dist.rank_device` says why)."""


def rank_options(gpus: float) -> dict[str, Any]:
    """Ray options of a rank of a group with `gpus` GPUs each."""
    return {"runtime_env": {"env_vars": dict(SHARE_GPUS)}} if gpus else {}


def node_ranks(group: Any, world: int) -> list[int]:
    """For each rank (bundle) of the placement group `group`: how many of its ranks share that
    rank's node."""
    from ray.util.placement_group import placement_group_table

    nodes = placement_group_table(group)["bundles_to_node_id"]
    where = [nodes[rank] for rank in range(world)]
    return [where.count(node) for node in where]


class LearnerGroup:
    """`world` learner ranks; `start` places them, `kill` removes them (and their placement group)."""

    def __init__(self, ray: Any, actor_cls: Any, args: tuple, world: int, gpus: float,
                 placed: Callable[[Any], Any], timeout_s: float) -> None:
        """actor_cls: the `ray.remote` learner class; args: its arguments before `resume`;
        gpus: each rank's GPUs; placed: the driver's placement of a single learner; timeout_s:
        learner.group_timeout_s."""
        self.ray, self.actor_cls, self.args, self.world, self.gpus = ray, actor_cls, args, world, gpus
        self.call_timeout = timeout_s + CALL_SLACK_S
        self.placed = placed
        self.actors: list[Any] = []
        self.group: Any = None
        self._others: dict[Any, list[Any]] = {}  # rank 0's training call -> the other ranks' calls

    @property
    def lead(self) -> Any:
        return self.actors[0]

    def start(self, resume: bool | None, wait: Callable[[list, str, float], list]) -> list[dict[str, Any]]:
        """Starts the ranks (resume: as `LearnerActor`'s) and returns their `info()` in rank order."""
        if self.world == 1:
            self.actors = [self.actor_cls.options(scheduling_strategy=self.placed("DEFAULT")).remote(*self.args, resume)]
            return wait([self.lead.info.remote()], "learner", 1.0)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": 1.0, **({"GPU": self.gpus} if self.gpus else {})}
        # PACK: the ranks share a node where they fit (collectives over its memory), and spread
        # over nodes when they do not.
        self.group = placement_group([dict(bundle) for _ in range(self.world)], strategy="PACK")
        wait([self.group.ready()], f"placement group of {self.world} learner ranks", bundle["CPU"])

        def at(rank: int) -> Any:
            return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank)

        address = self.ray.get(self.ray.remote(num_cpus=0)(rendezvous_address).options(
            scheduling_strategy=at(0)).remote())
        shares = node_ranks(self.group, self.world)
        self.actors = [self.actor_cls.options(**rank_options(self.gpus), scheduling_strategy=at(rank)).remote(
            *self.args, resume, rank, address, shares[rank]) for rank in range(self.world)]
        return wait([a.info.remote() for a in self.actors], f"{self.world} learner ranks", bundle["CPU"])

    def train(self, grant: int, frames: int) -> Any:
        """The training call on every rank; returns rank 0's reference (the driver waits on it)."""
        refs = [a.train.remote(grant, frames) for a in self.actors]
        self._others[refs[0]] = refs[1:]
        return refs[0]

    def result(self, ref: Any) -> dict[str, Any]:
        """Rank 0's result of the call `ref`, once every rank's call finished; raises the first
        rank's error (a `RayError`, or the learner's own `NonFiniteLossError`)."""
        others = self._others.pop(ref, [])
        result = self.ray.get(ref)
        if others:
            self.ray.get(others, timeout=self.call_timeout)
        return result

    def weights(self) -> tuple[Any, int] | None:
        return self.ray.get(self.lead.weights.remote())

    def checkpoint(self, counters: dict[str, Any]) -> str:
        """Rank 0 writes the checkpoint, with the other ranks' generator states."""
        ranks = self.ray.get([a.rank_state.remote(int(counters["frames"])) for a in self.actors[1:]],
                             timeout=self.call_timeout)
        return self.ray.get(self.lead.checkpoint.remote(counters, ranks or None))

    def digests(self) -> list[str]:
        """Each rank's `state_digest` now (equal when the ranks are in step)."""
        return self.ray.get([a.digest.remote() for a in self.actors])

    def close(self) -> None:
        self.ray.get([a.close.remote() for a in self.actors])

    def kill(self) -> None:
        """Ends every rank (survivors too) and frees their placement group."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self._others.clear()
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None
