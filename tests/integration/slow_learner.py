"""A learner whose every update takes UPDATE_SECONDS longer than it would: slower than one learner
call, like a paper-size update on a CPU. Importable by Ray's workers when the test runs from this
directory (Ray puts the driver's working directory on their sys.path)."""

from __future__ import annotations

import time

from choreo.launch.runtime.distributed import TRAIN_CALL_SECONDS, LearnerActor

UPDATE_SECONDS = 2 * TRAIN_CALL_SECONDS


class SlowLearnerActor(LearnerActor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        agent = self.learner.agent
        update = agent.update

        def slow_update(batch):
            time.sleep(UPDATE_SECONDS)
            return update(batch)

        agent.update = slow_update
