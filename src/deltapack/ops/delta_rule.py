"""The gated delta rule (Gated DeltaNet's recurrence) over a packed stream, the state reset at every document.

Backends: ``fla`` (FLA's chunked kernel, CUDA, bf16 / fp16, :mod:`deltapack.ops.fla`) and ``reference``
(:func:`deltapack.ops.reference.gated_delta_rule_ref`, exact, any device and dtype); chosen by
:mod:`deltapack.ops.dispatch`.
"""

from __future__ import annotations

from deltapack.ops import fla
from deltapack.ops.dispatch import public_function, register_op
from deltapack.ops.reference import gated_delta_rule_ref

__all__ = ["GATED_DELTA_RULE", "gated_delta_rule", "gated_delta_rule_ref"]

GATED_DELTA_RULE = register_op("gated_delta_rule", gated_delta_rule_ref, fla.GATED_DELTA_RULE_BACKEND)

gated_delta_rule = public_function(
    GATED_DELTA_RULE,
    """Gated delta rule over a packed stream; the state starts at zero (or ``initial_state``) for each document
    (arguments and results as :func:`~deltapack.ops.reference.gated_delta_rule_ref`: q, k [1, T, Hk, K], v
    [1, T, Hv, V], g and beta [1, T, Hv]; o [1, T, Hv, V] in the dtype of q, final states [N, Hv, K, V] fp32 or None).

    Under context parallelism ``segments`` is this rank's shard: the state of a cut document is handed over from the
    previous rank (no initial or final states there). ``backend``: "fla", "reference" or None (automatic; see
    :mod:`deltapack.ops.dispatch`).
    """,
)
