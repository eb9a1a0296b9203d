"""Which transformer blocks each pipeline stage owns.

The model is cut into `pp x virtual_stages` contiguous pieces ("virtual stages"), in layer
order. Virtual stage s runs on pipeline rank s % pp as that rank's model chunk s // pp, so with
interleaving each rank holds several non-adjacent pieces (pp=2, v=2, 8 layers: rank 0 owns
blocks 0-1 and 4-5, rank 1 owns 2-3 and 6-7). The embedding always sits on virtual stage 0 (rank
0, chunk 0); the final LayerNorm and the output head on the last one (rank pp-1, last chunk).

Two methods:
  uniform     every virtual stage gets n_layer / (pp x v) blocks;
  parameters  contiguous pieces that balance parameter count, counting the token and position
              embeddings on the first piece and the final LayerNorm plus the (tied) output head,
              a V x C matrix multiply, on the last one. Every piece keeps at least one block.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, ModelConfig


class PartitionError(ConfigError):
    """The pipeline layout cannot work for this model or batch (raised before any work)."""


@dataclass(frozen=True)
class StageLayout:
    """Blocks per virtual stage, for `pp` ranks with `virtual` chunks each."""

    pp: int
    virtual: int
    pieces: tuple[tuple[int, ...], ...]  # pieces[s]: global block ids of virtual stage s

    def chunks(self, pp_rank: int) -> list[list[int]]:
        """Blocks of each model chunk on `pp_rank`, chunk 0 first."""
        return [list(self.pieces[c * self.pp + pp_rank]) for c in range(self.virtual)]

    def layers(self, pp_rank: int) -> list[int]:
        return [i for chunk in self.chunks(pp_rank) for i in chunk]

    def owner(self, block: int) -> tuple[int, int]:
        """(pp_rank, chunk) holding global block `block`."""
        for s, piece in enumerate(self.pieces):
            if block in piece:
                return s % self.pp, s // self.pp
        raise KeyError(f"block {block} is in no stage")


def block_parameters(cfg: ModelConfig) -> int:
    """Parameters of one transformer block: two LayerNorms, attention and MLP."""
    C = cfg.n_embd
    return 12 * C * C + 13 * C


def edge_costs(cfg: ModelConfig) -> tuple[int, int]:
    """(first piece extra, last piece extra): embeddings; final LayerNorm + output head."""
    V, C = cfg.padded_vocab_size, cfg.n_embd
    return V * C + cfg.n_positions * C, 2 * C + V * C


def _balanced(weights: list[int], parts: int, first_extra: int, last_extra: int) -> list[int]:
    """Sizes of `parts` contiguous non-empty pieces of `weights` minimising the heaviest piece
    (first_extra / last_extra added to the first / last piece), ties broken by the sum of
    squared loads (so the pieces the maximum does not constrain are spread evenly too)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = (float("inf"), float("inf"))
    # best[k][i]: (max load, sum of squared loads) of the first i blocks cut into k pieces.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0, 0)
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                load = prefix[i] - prefix[j] + (first_extra if k == 1 else 0) + (last_extra if k == parts else 0)
                prev = best[k - 1][j]
                value = (max(prev[0], load), prev[1] + load * load)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def partition(cfg: ModelConfig, pp: int, virtual: int = 1, method: str = "uniform") -> StageLayout:
    """The StageLayout for `cfg.n_layer` blocks over pp ranks x `virtual` chunks."""
    parts = pp * virtual
    if cfg.n_layer < parts:
        raise PartitionError(
            f"model.n_layer={cfg.n_layer} is fewer than parallel.pp x parallel.virtual_stages = "
            f"{parts}: every virtual stage needs at least one block"
        )
    if method == "uniform":
        if cfg.n_layer % parts:
            raise PartitionError(
                f"model.n_layer={cfg.n_layer} is not divisible by parallel.pp x "
                f"parallel.virtual_stages = {parts}; change one of them or use "
                f"parallel.partition=parameters"
            )
        sizes = [cfg.n_layer // parts] * parts
    elif method == "parameters":
        first, last = edge_costs(cfg)
        sizes = _balanced([block_parameters(cfg)] * cfg.n_layer, parts, first, last)
    else:
        raise PartitionError(f"parallel.partition={method!r} is not one of uniform, parameters")
    pieces, start = [], 0
    for size in sizes:
        pieces.append(tuple(range(start, start + size)))
        start += size
    return StageLayout(pp, virtual, tuple(pieces))
