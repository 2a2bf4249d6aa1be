"""The `choreo` command line. Subcommands import their modules lazily so that `choreo config`
answers in a fraction of a second (torch alone takes one)."""

from __future__ import annotations

import argparse
import os
import sys

from choreo import __version__

CONFIG_FILE_HELP = ("YAML file of config keys, nested as in configs/*.yaml (group keys such as 'size: tiny' choose "
                    "presets), or a run's saved config.yaml; applied after the presets and their rules, before "
                    "key=value overrides")
SNAPSHOT_CONFIG_FILE_HELP = ("YAML file of config keys, nested as in configs/*.yaml, or a run's saved config.yaml; "
                             "applied to the snapshot's config, before key=value overrides")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help="preset from configs/{algo,suite,size}/ (repeatable), e.g. --preset pixels --preset tiny")
    p.add_argument("--config", default=None, metavar="FILE", help=CONFIG_FILE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. agent.world_model.lr=1e-4")


def cmd_config(args: argparse.Namespace) -> int:
    from choreo.launch.runtime.config import iter_fields, load_config, to_yaml

    config = load_config(args.preset, args.overrides, args.config)
    if args.explain:
        for key, _tp, doc in iter_fields():
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            print(f"{key} = {value!r}\n    {doc}")
    else:
        sys.stdout.write(to_yaml(config))
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    from choreo.launch.commands.envs import check_envs, list_envs

    if args.check:
        return check_envs(args.ids, obs=args.obs)
    return list_envs(args.ids)


def cmd_bench(args: argparse.Namespace) -> int:
    from choreo.launch import bench

    return bench.main(args.what, args.rest, as_json=args.json)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from choreo.launch.runtime.run import pretrain

    return pretrain(args)


def cmd_finetune(args: argparse.Namespace) -> int:
    from choreo.launch.runtime.run import finetune

    return finetune(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from choreo.launch.commands.evaluate import evaluate_command

    return evaluate_command(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from choreo.launch.commands.plan import plan_command

    return plan_command(args)


def cmd_export(args: argparse.Namespace) -> int:
    from choreo.launch.commands.export import main as export

    return export(args)


def cmd_export_policy(args: argparse.Namespace) -> int:
    from choreo.launch.commands.export_policy import main as export_policy

    return export_policy(args)


def cmd_visualize(args: argparse.Namespace) -> int:
    from choreo.launch.commands.visualize import main as visualize

    return visualize(args)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logdir", default=None, help="folder of run directories (default: config key logdir)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (auto or HOST:PORT)")
    p.add_argument("--local", action="store_true", help="run every component in this process, without Ray")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint")


def cmd_report(args: argparse.Namespace) -> int:
    from choreo.launch.commands.report import run

    return run(args.run_dirs, plot_path=args.plot, markdown_path=args.markdown, reps=args.reps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="choreo", description="Unsupervised skill learning with world models on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config as YAML")
    _config_args(p)
    p.add_argument("--explain", action="store_true", help="print every key with its value and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("envs", help="list environments, or check that they build and step")
    p.add_argument("ids", nargs="*", help="environment ids (default: all built-in ids)")
    p.add_argument("--check", action="store_true", help="build, reset and step each id; exit non-zero naming failures")
    p.add_argument("--obs", choices=["states", "pixels"], default="states")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("bench", help="measure speed and memory (figures, not tests)")
    from choreo.launch.bench import BENCHMARKS

    p.add_argument("what", choices=list(BENCHMARKS))
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("pretrain", help="pretrain skills without rewards")
    _config_args(p)
    _run_args(p)
    p.add_argument("--offline", default=None, metavar="DIR",
                   help="pretrain from a dataset: a folder of per-episode .npz files (ExORL layout), or "
                        "minari:<dataset id> (a Minari dataset installed locally), no environment workers, "
                        "learner.total_updates updates")
    p.add_argument("--collect", action="store_true",
                   help="with --offline: load the dataset, then keep collecting with the exploration policy")
    p.add_argument("--fit-machine", action="store_true",
                   help="without a GPU and without a size preset, take the small size (what `make run` does); the "
                        "first line says so with the run's length and time here")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="adapt pretrained skills to a task (task=TASK), with evaluations")
    _config_args(p)
    _run_args(p)
    p.add_argument("--snapshot", default=None, metavar="FILE", help="pretraining snapshot to start from")
    p.add_argument("--from-scratch", action="store_true", help="the same protocol from random weights")
    p.add_argument("--tasks", default=None, help="many runs: comma-separated tasks, e.g. walker_stand,walker_walk")
    p.add_argument("--seeds", default=None, help="many runs: comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at once on the embedded Ray (on a cluster: as many as its CPUs and GPUs allow)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="zero-shot: how often the pretrained skills (or random actions) find a "
                                        "sparse reward (task=TASK)")
    _config_args(p)
    p.add_argument("--snapshot", default=None, metavar="FILE", help="pretraining snapshot whose skills to evaluate")
    p.add_argument("--policy", choices=["skills", "random"], default="skills",
                   help="the snapshot's skills (a random one per episode) or uniform random actions")
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes (per goal on Meta-World), short for eval.episodes=N (default 100; tiny: 2)")
    p.add_argument("--skill-every", type=int, default=0, metavar="N",
                   help="draw a new random skill every N steps (default: one per episode)")
    p.add_argument("--goals", default=None, help="Meta-World goal indices to evaluate, e.g. 0,1,2 (default: all 50)")
    p.add_argument("--logdir", default=None, help="folder of run directories (default: config key logdir)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (auto or HOST:PORT)")
    p.add_argument("--local", action="store_true", help="run the episodes in this process, without Ray")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plan", help="zero-shot: plan over sequences of a snapshot's skills toward navigation goals "
                                     "(task=point_mass_nav or ant_nav)")
    p.add_argument("--snapshot", required=True, metavar="FILE", help="pretraining snapshot (DADS or Choreographer)")
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes, each with a goal of its own, short for eval.episodes=N (default 50; a tiny "
                        "snapshot: 2)")
    p.add_argument("--policy", choices=["plan", "random"], default="plan",
                   help="the planner, or random skills held as long (the baseline)")
    p.add_argument("--logdir", default=None, help="folder of run directories (default: config key logdir)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (auto or HOST:PORT)")
    p.add_argument("--local", action="store_true", help="run the episodes in this process, without Ray")
    p.add_argument("--config", default=None, metavar="FILE", help=SNAPSHOT_CONFIG_FILE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. task=point_mass_nav agent.planner.candidates=200 env.goal_reward=sparse")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="write a run's replay as a dataset: per-episode .npz files with checksums, "
                                       "or a local Minari dataset")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory whose replay checkpoint to export")
    p.add_argument("--format", choices=["npz", "minari"], default="npz",
                   help="npz: a folder of per-episode .npz files (--out); minari: a dataset in Minari's local "
                        "datasets folder (MINARI_DATASETS_PATH, else ~/.minari/datasets)")
    p.add_argument("--out", default=None, metavar="DIR", help="--format npz: new or empty folder for the dataset")
    p.add_argument("--dataset-id", default=None, metavar="ID",
                   help="--format minari: the dataset's id, [namespace/]name-v<version> (default: "
                        "choreo/<run name>-v0)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-policy", help="write a snapshot's acting policy as a TorchScript file that runs with "
                                              "torch alone, without choreo")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot file whose policy to export")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (parent folders are created)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--skill", default=None, metavar="K",
                       help="the skill actor holding skill K: a code of the codebook (Choreographer), the index of "
                            "a discrete DADS skill, or a continuous DADS skill's numbers, --skill=0.5,-0.5")
    which.add_argument("--explore", action="store_true", help="the exploration (LBS) actor (Choreographer)")
    which.add_argument("--meta", action="store_true",
                       help="the meta-controller choosing skills for the fine-tuned skill actor (a fine-tuned "
                            "Choreographer snapshot)")
    p.set_defaults(func=cmd_export_policy)

    p = sub.add_parser("visualize", help="videos of every skill of a snapshot in the real environment, its decoded "
                                         "codes and a codebook plot")
    p.add_argument("--snapshot", required=True, metavar="FILE", help="snapshot whose skills to show")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: visualize/ next to the snapshot)")
    p.add_argument("--steps", type=int, default=200, help="agent steps per skill video (default 200)")
    p.add_argument("--config", default=None, metavar="FILE", help=SNAPSHOT_CONFIG_FILE_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the snapshot's config, e.g. task=walker_run (same domain)")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("report", help="URL benchmark report of fine-tuning runs: tables, intervals, curves")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or folders searched recursively for their eval.jsonl")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write learning curves and aggregates (needs matplotlib)")
    p.add_argument("--markdown", default=None, metavar="FILE.md", help="write the tables as Markdown")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap replicates of the confidence intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's random generator")
    p.set_defaults(func=cmd_report)
    return parser


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (`choreo config --explain | head`), rather
    than some other pipe or socket of the run breaking."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a descriptor (a test's capture): nothing to redirect
        return False
    import select

    if not hasattr(select, "poll"):  # Windows: no way to ask; at the top, a broken pipe is most likely stdout's
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _fd, events in poller.poll(0))


def main(argv: list[str] | None = None) -> int:
    from choreo.launch.runtime.config import ConfigError
    from choreo.vocabulary import WriteFailed

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`--tasks a,b learner.total_frames=5e4`):
    # argparse takes only the first run of positionals.
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, inside the handler below
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # Nothing more can be shown; the Python documentation's recipe: point stdout at devnull so
        # that the flush at exit does not fail again with a second traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ConfigError as e:
        print(f"choreo: error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:  # a full disk while writing results, a dataset, a run's config
        print(f"choreo: error: {e}; the previous file there, if any, is intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("choreo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
