"""The gated delta rule (Gated DeltaNet's recurrence) over a packed stream, the state reset at every document.

Backends: ``fla`` (FLA's chunked kernel, CUDA, bf16 / fp16, :mod:`deltapack.ops.fla`) and ``reference``
(:func:`deltapack.ops.reference.gated_delta_rule_ref`, exact, any device and dtype); chosen by
:mod:`deltapack.ops.dispatch`.
"""

from __future__ import annotations

from torch import Tensor

from deltapack.ops import fla, opaque
from deltapack.ops.dispatch import public_function, register_op
from deltapack.ops.reference import gated_delta_rule_ref
from deltapack.ops.segments import Segments

__all__ = ["GATED_DELTA_RULE", "gated_delta_rule", "gated_delta_rule_ref"]


def _check_decay_per_head(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, segments: Segments) -> None:
    """The public op takes one decay per head (the reference also takes KDA's per-channel decay)."""
    if g.dim() != 3:
        raise ValueError(
            f"g must be [1, T, Hv], one log-decay per value head, got shape {tuple(g.shape)} (a per-channel decay "
            "[1, T, Hv, K] is KDA: deltapack.ops.kda.kda)"
        )


GATED_DELTA_RULE = register_op(
    "gated_delta_rule", gated_delta_rule_ref, fla.GATED_DELTA_RULE_BACKEND, meta=opaque.delta_rule_outputs
)


gated_delta_rule = public_function(
    GATED_DELTA_RULE,
    """Gated delta rule over a packed stream; the state starts at zero (or ``initial_state``) for each document
    (arguments and results as :func:`~deltapack.ops.reference.gated_delta_rule_ref`: q, k [1, T, Hk, K], v
    [1, T, Hv, V], g and beta [1, T, Hv]; o [1, T, Hv, V] in the dtype of q, final states [N, Hv, K, V] fp32 or None).

    Under context parallelism ``segments`` is this rank's shard: the state of a cut document is handed over from the
    previous rank (no initial or final states there). ``backend``: "fla", "reference" or None (automatic; see
    :mod:`deltapack.ops.dispatch`).
    """,
    check=_check_decay_per_head,
)
