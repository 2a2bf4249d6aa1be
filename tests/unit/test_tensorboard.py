"""What a run writes to TensorBoard, read back from the event files of a tiny local run: one name
per series in groups that say what they are, durations in seconds (`*_s`), the resolved config as
text and the run's hyperparameters in the HParams view."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from choreo.launch.runtime.config import load_config
from choreo.launch.runtime.core import HPARAM_COLUMNS, HPARAM_METRICS, RunCore, hparams
from choreo.launch.runtime.local import run_local
from choreo.launch.runtime.monitor import Monitor
from choreo.launch.runtime.rundir import RunDir


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _hparams_data(events: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
            for tag, content in events.PluginTagToContent("hparams").items()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("runs")
    config = load_config(["tiny"], ["learner.total_frames=300", "learner.snapshot_frames=[]", f"logdir={logdir}",
                                    "run_name=names"])
    run_dir = RunDir.create(config).path
    assert run_local(config, run_dir) == 0
    return run_dir


def test_one_name_per_series_in_groups_that_say_what_they_are(tiny_run):
    tags = set(_events(tiny_run).Tags()["scalars"])
    for tag in ("world_model/loss", "explore/lbs/loss", "explore/actor/loss", "codebook/active_codes",
                "codebook/commitment", "skill_ac/actor/loss", "skill_ac/reward_knn", "replay/ratio",
                "replay/inserted_steps", "actors/limiter_wait_s", "learner/limiter_wait_s", "actors/frames",
                "learner/updates"):
        assert tag in tags, tag
    # the skill actor-critic and the codebook no longer differ by one letter
    assert not any(t.startswith(("skill/", "skills/", "lbs/")) for t in tags), sorted(tags)
    assert not any(t.startswith("limiter/") for t in tags)  # its ratio is replay/ratio, its waits its sides'
    assert not any(t.endswith(("_seconds", "_ms")) for t in tags), sorted(tags)
    timed = [t for t in tags if t.startswith("time/")]
    assert timed and all(t.endswith("_s") for t in timed)


def test_the_resolved_config_is_logged_as_text(tiny_run):
    events = _events(tiny_run)
    assert "config/text_summary" in events.Tags()["tensors"]
    (record,) = events.Tensors("config/text_summary")
    text = record.tensor_proto.string_val[0].decode()
    assert text.startswith("```yaml\n") and text.rstrip().endswith("```")
    assert "algo: choreographer" in text and "total_frames: 300" in text


def test_the_hyperparameters_are_one_row_of_the_hparams_view(tiny_run):
    data = _hparams_data(_events(tiny_run))
    assert set(data) == {"_hparams_/experiment", "_hparams_/session_start_info"}  # in the run itself, no sub-run
    assert not [p for p in RunDir(tiny_run).tensorboard.iterdir() if p.is_dir()]
    experiment = data["_hparams_/experiment"].experiment
    assert [h.name for h in experiment.hparam_infos] == list(HPARAM_COLUMNS)
    assert tuple(m.name.tag for m in experiment.metric_infos) == HPARAM_METRICS
    values = data["_hparams_/session_start_info"].session_start_info.hparams
    assert values["algo"].string_value == "choreographer" and values["task"].string_value == "walker_stand"
    assert values["mode"].string_value == "pretrain" and values["size"].string_value == "tiny"
    assert values["num_codes"].number_value == 8 and values["replay_ratio"].number_value == 4.0
    assert values["total_frames"].number_value == 300
    assert "skill_dim" not in values and "total_updates" not in values  # DADS's, and offline runs'
    # the metrics the view shows are the run's own series: there from the start, at their final values
    scalars = _events(tiny_run)
    assert scalars.Scalars("actors/frames")[-1].value >= 300
    assert scalars.Scalars("learner/updates")[-1].value > 0
    assert scalars.Scalars("world_model/loss")


def test_every_run_names_the_same_columns(tmp_path):
    """TensorBoard takes the HParams view's columns from the first run it finds: a DADS run, an
    offline one and a fine-tuning one name the same columns as a Choreographer pretraining."""
    for overrides in (["algo=dads"], ["mode=finetune", "from_scratch=true"], [f"dataset.dir={tmp_path}"]):
        config = load_config(["tiny"], overrides)
        values = hparams(config)
        assert list(values) == list(HPARAM_COLUMNS)
        for name, value in values.items():
            assert value is None or isinstance(value, HPARAM_COLUMNS[name]) or \
                (HPARAM_COLUMNS[name] is float and isinstance(value, int)), name
    assert hparams(load_config(["tiny"], ["algo=dads"]))["num_codes"] is None


def test_a_run_that_stops_early_still_has_its_row(tmp_path):
    config = load_config(["tiny"])
    core = RunCore(config, tmp_path, num_workers=1, action_repeat=1, counters=None, updates=0, local=True,
                   monitor=Monitor(tmp_path, config.learner.total_frames, stream=io.StringIO()))
    core.monitor.writer.flush()
    events = _events(tmp_path)
    assert "_hparams_/session_start_info" in _hparams_data(events)
    assert events.Scalars("actors/frames")[-1].value == 0
    core.monitor.close()


def test_each_run_directory_is_one_row_of_the_hparams_view_however_often_it_starts(tmp_path):
    """Read back as TensorBoard's HParams view reads a logdir: one row per run directory (a resumed
    run writes its row again, in the same run), each with its own hyperparameters and the latest
    values of its metric series. SummaryWriter.add_hparams would add a sub-run, and a row, per call."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    for name, overrides, frames in (("choreo", [], 120), ("dads", ["algo=dads"], 80), ("choreo", [], 160)):
        config = load_config(["tiny"], overrides)
        run_dir = tmp_path / name
        counters = {"frames": frames - 40} if (run_dir / "tensorboard").exists() else None  # the third: a resume
        core = RunCore(config, run_dir, num_workers=1, action_repeat=1, counters=counters, updates=0, local=True,
                       monitor=Monitor(run_dir, config.learner.total_frames, stream=io.StringIO()))
        core.frames = frames
        assert core.finish("done", None) == 0

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    tb = base_plugin.TBContext(data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path)),
                               logdir=str(tmp_path), multiplexer=multiplexer)
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[0, 1, 2, 3])
    response = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run()
    rows = {group.name: group for group in response.session_groups}
    assert set(rows) == {"choreo/tensorboard", "dads/tensorboard"}
    assert rows["choreo/tensorboard"].hparams["algo"].string_value == "choreographer"
    assert rows["dads/tensorboard"].hparams["skill_dim"].number_value == 2
    frames = {name: {m.name.tag: m.value for m in row.metric_values}["actors/frames"] for name, row in rows.items()}
    assert frames == {"choreo/tensorboard": 160, "dads/tensorboard": 80}
