"""What the channel analysis (`passes/_groups.py`) returns: the channels of each tensor, the
producers that mint them, the groups they form, and the constants and attributes pruning must
rewrite. Plain data; nothing here reads or edits a graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graph_opt.passes._graph import node_label


@dataclass
class Chan:
    """Channels of one tensor: their axis, an atom id per index, and each one's dead value."""

    axis: int
    rank: int
    atoms: np.ndarray        # int64, one per index along `axis`
    value: np.ndarray        # float64: constant at this index when its channel is dead (nan: not constant)
    approx: np.ndarray       # bool: that constant is exact only away from zero-padded borders

    def take(self, index) -> Chan:
        return Chan(self.axis, self.rank, self.atoms[index], self.value[index], self.approx[index])

    def moved(self, axis: int, rank: int) -> Chan:
        return Chan(axis, rank, self.atoms, self.value, self.approx)

    def expand(self, inner: int, outer: int, axis: int, rank: int) -> Chan:
        """Each index repeated `inner` times, the whole list `outer` times (axis merged with others)."""
        def f(a):
            return np.tile(np.repeat(a, inner), outer)
        return Chan(axis, rank, f(self.atoms), f(self.value), f(self.approx))


@dataclass
class Producer:
    """A layer minting channels: its output channels lie on `weight_axis` of its weight."""

    node: gs.Node
    weight_axis: int
    atoms: np.ndarray
    reason: str | None = None  # why its channels cannot be pruned


@dataclass
class Slice:
    """Constant input `index` of `node` is indexed by `atoms` along `axis`: drop dead indices."""

    node: gs.Node
    index: int
    axis: int
    atoms: np.ndarray


@dataclass
class FoldSite:
    """A layer reading channels (its weight's `weight_axis` is indexed by `chan.atoms`)."""

    node: gs.Node
    chan: Chan
    weight_axis: int
    padded: bool  # Conv with zero padding: a constant input is not constant at the borders


@dataclass
class Edit:
    """A shape-bearing attribute or constant to recompute once dead channels are known.

    kind: 'group' (depthwise group count = kept input channels), 'split' (sizes of the channel
    axis pieces), 'slice' (start/end on the channel axis), 'reshape' (target size of `axis`).
    """

    kind: str
    node: gs.Node
    atoms: np.ndarray
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """Producers whose channels are tied, the channels (class roots) and why it is frozen."""

    root: int
    producers: list[Producer]
    classes: np.ndarray
    reasons: list[str]

    @property
    def label(self) -> str:
        names = [node_label(p.node) for p in self.producers]
        if len(names) == 1:
            return names[0]
        more = ", …" if len(names) > 4 else ""
        return f"{names[0]} (+{len(names) - 1}: {', '.join(names[1:4])}{more})"


@dataclass
class Analysis:
    groups: list[Group]
    producers: list[Producer]
    chans: dict[str, Chan]
    slices: list[Slice]
    folds: list[FoldSite]
    edits: list[Edit]
    bns: list[tuple[gs.Node, Chan]]
    class_root: np.ndarray   # atom → its channel (class root)
    group_root: np.ndarray   # atom → its group root

    def classes_of(self, atoms: np.ndarray) -> np.ndarray:
        return self.class_root[atoms]

    def dead_mask(self, atoms: np.ndarray, dead: set[int] | np.ndarray) -> np.ndarray:
        dead_arr = np.fromiter(dead, np.int64) if isinstance(dead, set) else np.asarray(dead, np.int64)
        return np.isin(self.class_root[atoms], dead_arr)

    def groups_touching(self, atoms: np.ndarray) -> set[int]:
        return set(np.unique(self.group_root[atoms]).tolist())

def find_root(parent: list[int], a: int) -> int:
    """The root of `a` in a union-find forest (path halving)."""
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a
