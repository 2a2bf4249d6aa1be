"""The runtime: command line, typed config, plan, builder, run core, local and Ray loops, signals,
monitor, run directory, snapshots, rollout and job runner. It imports no command and no benchmark."""
