"""The two varlen primitives of a GDN layer; the backend is chosen inside each function."""

from deltapack.ops.dispatch import causal_conv1d, gated_delta_rule

__all__ = ["causal_conv1d", "gated_delta_rule"]
