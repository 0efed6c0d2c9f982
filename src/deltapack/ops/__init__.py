"""The varlen ops of deltapack: every op takes ``segments=`` (a :class:`Segments`) and picks its backend in one place
(:mod:`deltapack.ops.dispatch`); each has an exact ``*_ref`` twin with the same signature (less ``backend=``)."""

from deltapack.ops.conv import causal_conv1d
from deltapack.ops.delta_rule import gated_delta_rule
from deltapack.ops.dispatch import OPS, Backend, Op, register_op
from deltapack.ops.reference import causal_conv1d_ref, gated_delta_rule_ref
from deltapack.ops.segments import Segments

__all__ = [
    "OPS",
    "Backend",
    "Op",
    "Segments",
    "causal_conv1d",
    "causal_conv1d_ref",
    "gated_delta_rule",
    "gated_delta_rule_ref",
    "register_op",
]
