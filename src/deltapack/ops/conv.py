"""The varlen depthwise causal conv1d: the short conv in front of GDN, KDA, Mamba and the gated short convs.

Backends: ``fla`` (FLA's varlen Triton conv, CUDA, :mod:`deltapack.ops.fla`) and ``reference``
(:func:`deltapack.ops.reference.causal_conv1d_ref`, exact, any device); chosen by :mod:`deltapack.ops.dispatch`.
"""

from __future__ import annotations

from deltapack.ops import fla, opaque
from deltapack.ops.dispatch import public_function, register_op
from deltapack.ops.reference import causal_conv1d_ref

__all__ = ["CAUSAL_CONV1D", "causal_conv1d", "causal_conv1d_ref"]

# y has the shape and dtype of x
CAUSAL_CONV1D = register_op("causal_conv1d", causal_conv1d_ref, fla.CONV_BACKEND, meta=opaque.like_first)

causal_conv1d = public_function(
    CAUSAL_CONV1D,
    """Depthwise causal conv1d over a packed stream, cut at every document boundary (arguments and result as
    :func:`~deltapack.ops.reference.causal_conv1d_ref`; channels last, weight [D, W]).

    Under context parallelism ``segments`` is this rank's shard: the conv then reads the earlier tokens of a cut
    document from the previous rank. ``backend``: "fla", "reference" or None (automatic; see
    :mod:`deltapack.ops.dispatch`).
    """,
)
