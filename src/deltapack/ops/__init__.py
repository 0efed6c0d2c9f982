"""The varlen ops of deltapack: every op takes ``segments=`` (a :class:`Segments`) and picks its backend in one place
(:mod:`deltapack.ops.dispatch`)."""

from deltapack.ops.dispatch import OPS, Backend, Op, causal_conv1d, gated_delta_rule, register_op
from deltapack.ops.segments import Segments

__all__ = ["OPS", "Backend", "Op", "Segments", "causal_conv1d", "gated_delta_rule", "register_op"]
