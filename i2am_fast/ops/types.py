"""Result type shared by the streaming op and the materialising reference."""

from typing import NamedTuple

import torch


class AttentionWithMaps(NamedTuple):
    """Attention output plus the I²AM attribution maps of one attention call.

    Shapes (B batch, H heads, Nq queries, Dv value dim, Bm = number of batch entries that maps
    were asked for, Qg / Kr = the mapped queries / keys, Nqm = |Qg|, Nkm = |Kr|, P = number of
    probe queries; ``P`` also names the model's softmax over every unmasked key):

    - ``output``    ``[B, H, Nq, Dv]``: ``P · v`` for every batch entry.
    - ``generated`` ``[Bm, H, Nqm]``: ``g[q] = mean over unmasked k in Kr of softmax_over_Qg(S[:, k])[q]``.
    - ``reference`` ``[Bm, H, Nkm]``: ``r[k] = (1/Nqm) Σ_{q∈Qg} w[q] · P[q, k]``.
    - ``probes``    ``[Bm, H, P, Nkm]``: ``P[a, k]`` for the probe queries ``a`` (any query).
    - ``share``     ``[Bm, H, Nqm]``: ``Σ_{k∈Kr} P[q, k]``, the part of q's attention on Kr.

    Maps follow the index order of map_queries / map_keys; map entry ``i`` belongs to batch
    entry ``map_batch[i]``. With every query and key mapped and no mask these are the
    cross-attention maps of the paper (and ``share`` is 1).
    """

    output: torch.Tensor
    generated: torch.Tensor
    reference: torch.Tensor
    probes: torch.Tensor
    share: torch.Tensor
