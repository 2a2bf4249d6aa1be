"""choreo: unsupervised skill learning with world models (Choreographer, DADS) on Ray.

The installed package maps the repository's folders: `choreo.agents` (algorithms), `choreo.actors`
(environment workers), `choreo.buffer` (replay), `choreo.learner` (the learner) and
`choreo.launch` (composition root: command line, builder, run loops). This folder holds only the
package root and `choreo.vocabulary`, the names every role shares.
"""

__version__ = "0.1.0"
