"""The training helpers: ``MMPareto``, ``DGL`` and ``MultiObjective`` turn a model's losses
into its combined gradients, and share their parameter groups, flat buffers, graph reading
and distributed sync."""
from ._dgl import DGL
from ._mmpareto import MMPareto
from ._multi_objective import MultiObjective

__all__ = ["MMPareto", "DGL", "MultiObjective"]
