"""`compress run --cluster`: the run's stages as Ray tasks on the nodes that are its targets.

Imported only when --cluster is given; nothing else in compress imports Ray.
"""


class ClusterError(ValueError):
    """The cluster cannot be joined, the run folder cannot be opened, or the cluster cannot run what the recipe
    asks: bad input, exit code 2."""
