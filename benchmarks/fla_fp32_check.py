"""How far FLA's fp32 chunk_gated_delta_rule lands from the fp32 reference (why deltapack sends fp32 to the reference).

Usage: python benchmarks/fla_fp32_check.py
"""

import torch
import torch.nn.functional as F

from deltapack.ops import fla, reference

gen = torch.Generator(device="cuda").manual_seed(0)
lengths = [300, 64, 1, 900, 130]
host = [0]
for n in lengths:
    host.append(host[-1] + n)
cu = torch.tensor(host, dtype=torch.int32, device="cuda")
total = host[-1]
q, k = (torch.randn(1, total, 2, 16, device="cuda", generator=gen) for _ in range(2))
v = torch.randn(1, total, 4, 16, device="cuda", generator=gen)
g = -F.softplus(torch.randn(1, total, 4, device="cuda", generator=gen)) * 0.05
beta = torch.rand(1, total, 4, device="cuda", generator=gen)
out, _ = fla._fla_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
ref, _ = reference.gated_delta_rule_ref(q, k, v, g, beta, cu_seqlens=cu, cu_seqlens_host=host)
print("fla fp32 vs reference: relative error", float((out - ref).double().norm() / ref.double().norm()))
