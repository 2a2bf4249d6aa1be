"""`choreo export-policy SNAPSHOT --out FILE (--skill K | --explore | --meta)`: a snapshot's acting
policy as one TorchScript file that runs with torch alone, without choreo:

    policy = torch.jit.load(FILE)
    state = policy.initial_state(B)                  # B environments, at every episode start
    action, state = policy.step(observation, state)  # observation [B, ...] -> action [B, A] in [-1, 1]

The policy acts deterministically, as choreo's evaluations do: the posterior latent's mode, the
actor's mean action and the meta-controller's most likely code (agents/choreographer/portable.py,
agents/dads/portable.py). `policy.metadata`, a dict of strings, says what it takes and gives (the
observation's shape and dtype, the action range, the state) and where it comes from (snapshot,
task, observation kind, action repeat).

Choreographer: `--skill K` the skill actor holding code K; `--explore` the exploration (LBS) actor;
`--meta` the meta-controller picking a code at every step with the fine-tuned skill actor executing
it, from a fine-tuned snapshot whose reward gate has opened. DADS: `--skill` only, an index for
discrete skills or the skill vector's D numbers for continuous ones (`--skill=-0.5,0.3`).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from choreo.launch.runtime.config import ConfigError
from choreo.launch.runtime.snapshot import Pretrained, load_snapshot
from choreo.vocabulary import write_atomically

USAGE = ("policy = torch.jit.load(FILE); state = policy.initial_state(B) at every episode start; "
         "action, state = policy.step(observation, state) for B observations at once")


def export_policy(snapshot: str | Path, out: str | Path, skill: str | None = None, explore: bool = False,
                  meta: bool = False, stream: TextIO | None = None) -> Path:
    """Writes the acting policy that one of `skill` (the text of `--skill`), `explore` or `meta`
    chooses as a TorchScript file at `out` (atomically, parent folders created); prints one line
    saying what was written; returns the file. ConfigError (or SnapshotError, for the file)
    naming the flag or file that is wrong."""
    import torch

    stream = stream or sys.stdout
    chosen = [flag for flag, given in (("--skill", skill is not None), ("--explore", explore), ("--meta", meta))
              if given]
    if len(chosen) != 1:
        raise ConfigError(f"give one of --skill K, --explore or --meta (got {' and '.join(chosen) or 'none'})")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give the file to write, e.g. {out / 'policy.pt'}")
    pre = load_snapshot(snapshot)
    behaviour = "skill" if skill is not None else "explore" if explore else "meta"
    check_behaviour(pre, behaviour)
    value = parse_skill(pre, skill) if skill is not None else None
    policy = pre.policy(behaviour, skill=value)
    module = portable_policy(pre, policy, about(pre))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    data = buffer.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, data)
    shape = ", ".join(str(d) for d in pre.obs_shape)
    dtype = "uint8" if len(pre.obs_shape) == 3 else "float32"
    print(f"exported {what(pre, behaviour, value)} from {pre.path} ({pre.config.algo}, {pre.config.env.task} from "
          f"{pre.config.env.obs}, {pre.frames:,} frames) to {out} ({len(data) / 1e6:.1f} MB): "
          f"step(observation [B, {shape}] {dtype}, state) -> action [B, {pre.action_dim}] in [-1, 1], "
          f"with torch alone (torch.jit.load)", file=stream, flush=True)
    return out


def check_behaviour(pre: Pretrained, behaviour: str) -> None:
    """Refuse a behaviour that the snapshot has no trained, deterministic policy for, naming it."""
    if pre.config.algo == "dads" and behaviour != "skill":
        raise ConfigError(f"--{behaviour}: {pre.path} is a DADS snapshot, whose one acting policy is the "
                          f"skill-conditioned SAC actor (it has no exploration actor and no meta-controller); "
                          f"export it with --skill")
    if behaviour != "meta":
        return
    from choreo.agents.choreographer.agent import FINETUNE

    if pre.agent.mode != FINETUNE:
        raise ConfigError(f"--meta: {pre.path} is a pretraining snapshot; the meta-controller is trained by "
                          f"fine-tuning to a task: give a snapshot of a fine-tuning run (choreo finetune ... "
                          f"learner.snapshot_frames=[N] writes them), or export --skill K or --explore")
    if not bool(pre.agent.gate_open):
        raise ConfigError(f"--meta: {pre.path} is fine-tuned, but its reward gate never opened (no batch held a "
                          f"reward of at least agent.choreographer.reward_gate = "
                          f"{pre.config.agent.choreographer.reward_gate:g}): its meta-controller has not been "
                          f"trained, and choreo's meta policy still acts with random skills; give a snapshot taken "
                          f"after a reward was found, or export --skill K")


def parse_skill(pre: Pretrained, text: str) -> int | list[float]:
    """The skill `--skill` names: an integer code (Choreographer) or index (discrete DADS skills) in
    range, or the D numbers of a continuous DADS skill."""
    k = pre.num_skills
    if pre.skill_type in ("code", "discrete"):
        what = "code" if pre.skill_type == "code" else "discrete skill"
        try:
            index = int(text)
        except ValueError:
            raise ConfigError(f"--skill {text}: not an integer; {pre.path} has {k} {what}s, give one of "
                              f"0..{k - 1}") from None
        if not 0 <= index < k:
            raise ConfigError(f"--skill {index}: out of range; {pre.path} has {k} {what}s, give one of 0..{k - 1}")
        return index
    try:
        vector = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--skill {text}: not numbers; {pre.path} has continuous DADS skills of {k} dims: "
                          f"give {k} comma-separated numbers, e.g. --skill={','.join(['0.5'] * k)}") from None
    if len(vector) != k or not all(math.isfinite(v) for v in vector):
        raise ConfigError(f"--skill {text}: {pre.path} has continuous DADS skills of {k} dims: give {k} finite "
                          f"comma-separated numbers (the prior draws each from [-1, 1]), e.g. "
                          f"--skill={','.join(['0.5'] * k)}")
    return vector


def portable_policy(pre: Pretrained, policy: Any, about: dict[str, str]) -> Any:
    """The algorithm's torch-only copy of the acting policy, ready for `torch.jit.script`."""
    if pre.config.algo == "dads":
        from choreo.agents.dads.portable import PortableDadsPolicy

        return PortableDadsPolicy(policy, about)
    from choreo.agents.choreographer.portable import PortableChoreographerPolicy

    return PortableChoreographerPolicy(policy, about)


def about(pre: Pretrained) -> dict[str, str]:
    """Where the policy comes from and how to run it: the exported file's `metadata` entries."""
    from choreo import __version__

    config = pre.config
    return {
        "format": "choreo portable policy", "choreo_version": __version__, "snapshot": str(pre.path.resolve()),
        "frames": str(pre.frames), "updates": str(pre.updates), "algo": config.algo, "task": config.env.task,
        "obs": config.env.obs, "action_repeat": str(config.env.action_repeat), "usage": USAGE,
    }


def what(pre: Pretrained, behaviour: str, skill: int | list[float] | None) -> str:
    if behaviour == "explore":
        return "the exploration policy"
    if behaviour == "meta":
        return "the meta policy (the meta-controller and the fine-tuned skill actor)"
    if isinstance(skill, list):
        return f"the skill policy (skill [{', '.join(f'{v:g}' for v in skill)}])"
    return f"the skill policy ({'code' if pre.skill_type == 'code' else 'skill'} {skill} of {pre.num_skills})"


# ----------------------------------------------------------------------------- command line


def main(args: argparse.Namespace) -> int:
    """`choreo export-policy SNAPSHOT --out FILE (--skill K | --explore | --meta)`."""
    from choreo.learner.snapshot import SnapshotError

    try:
        export_policy(args.snapshot, args.out, skill=args.skill, explore=args.explore, meta=args.meta)
    except SnapshotError as e:
        raise ConfigError(str(e)) from None
    return 0
