"""The runtime: command line, typed config, plan, builder, run core, local and Ray loops, signals,
monitor, run directory, snapshots and job runner (the one rollout is `choreo.actors.rollout`, where
the environment workers can use it). It imports no command and no benchmark."""
