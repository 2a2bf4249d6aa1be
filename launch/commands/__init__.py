"""Commands that use a snapshot or a run: evaluate, plan, visualize, export, report, envs. They
import the runtime, never the reverse."""
