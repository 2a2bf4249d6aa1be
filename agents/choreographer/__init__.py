"""Choreographer: skills discovered with a VQ-VAE on the world model's states, learned in
imagination, adapted to a task by a meta-controller (Mazzaglia et al., ICLR 2023)."""

from choreo.agents.choreographer.agent import ChoreographerAgent
from choreo.agents.choreographer.policy import ChoreographerPolicy
from choreo.agents.registry import register

register("choreographer", ChoreographerAgent, ChoreographerPolicy)

__all__ = ["ChoreographerAgent", "ChoreographerPolicy"]
