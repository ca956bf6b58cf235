"""Result type shared by the streaming op and the materialising reference."""

from typing import NamedTuple

import torch


class AttentionWithMaps(NamedTuple):
    """Attention output plus the I²AM attribution maps of one cross-attention call.

    Shapes (B batch, H heads, Nq queries, Nk keys, Dv value dim, Bm = number of
    batch entries that maps were asked for, P = number of probe queries):

    - ``output``    ``[B, H, Nq, Dv]``: ``softmax_over_keys(S) · v`` for every batch entry.
    - ``generated`` ``[Bm, H, Nq]``: ``g[q] = mean_k softmax_over_queries(S)[q, k]``.
    - ``reference`` ``[Bm, H, Nk]``: ``r[k] = mean_q w[q] · softmax_over_keys(S)[q, k]``.
    - ``probes``    ``[Bm, H, P, Nk]``: rows ``probe_index`` of ``softmax_over_keys(S)``.

    Map entry ``i`` belongs to batch entry ``map_batch[i]``.
    """

    output: torch.Tensor
    generated: torch.Tensor
    reference: torch.Tensor
    probes: torch.Tensor
