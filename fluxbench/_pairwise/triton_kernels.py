"""The Triton kernels of :mod:`.triton_attend` (forward, and the two backward kernels).

Imported on first use only (this module needs Triton). Triton decides at decoration time
whether a kernel is compiled or interpreted (``TRITON_INTERPRET=1``), so
:func:`.triton_attend.fused_attend` reloads this module when that setting has changed
since it was imported; ``INTERPRET`` records the setting it was built under.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fluxbench._pairwise.triton_attend import interpreting

__all__ = ["INTERPRET", "forward", "backward_q", "backward_kv", "cdiv", "add", "maximum"]

INTERPRET = interpreting()
cdiv = triton.cdiv


# Only builtins of triton.language and jit functions of this module are called: the
# library's jit helpers (tl.sum, tl.max, tl.zeros) were decorated when triton was first
# imported, in compiled mode unless TRITON_INTERPRET was already set, and the interpreter
# cannot call those. Row sums and maxima go through tl.reduce with these combine functions.
@triton.jit
def add(a, b):
    return a + b


@triton.jit
def maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def forward(Q, K, V, B, O, LSE, L, M, E, EV, sq, sk, sv, sb, so,
            BQ: tl.constexpr, BK: tl.constexpr, EP: tl.constexpr, EVP: tl.constexpr):  # fmt: skip
    g = tl.program_id(1)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    ce, cv = tl.arange(0, EP), tl.arange(0, EVP)
    q = tl.load(Q + g * sq + rows[:, None] * E + ce[None, :], mask=(rows[:, None] < L) & (ce[None, :] < E), other=0.0)
    m_i = tl.full([BQ], float("-inf"), q.dtype)
    l_i = tl.full([BQ], 0.0, q.dtype)
    acc = tl.full([BQ, EVP], 0.0, q.dtype)
    for j0 in range(0, M, BK):
        keys = j0 + tl.arange(0, BK)
        kt = tl.load(K + g * sk + keys[None, :] * E + ce[:, None], mask=(keys[None, :] < M) & (ce[:, None] < E), other=0.0)
        b = tl.load(B + g * sb + keys, mask=keys < M, other=float("-inf"))
        s = tl.dot(q, kt, input_precision="ieee") + b[None, :]
        m_new = tl.maximum(m_i, tl.reduce(s, 1, maximum))
        # rows with no finite score yet: shift by 0 (their mass and sums are still 0)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, add)
        v = tl.load(V + g * sv + keys[:, None] * EV + cv[None, :], mask=(keys[:, None] < M) & (cv[None, :] < EV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + g * so + rows[:, None] * EV + cv[None, :], out, mask=(rows[:, None] < L) & (cv[None, :] < EV))
    tl.store(LSE + g * L + rows, m_i + tl.log(l_i), mask=rows < L)


@triton.jit
def backward_q(Q, K, V, B, DO, LSE, DELTA, DQ, L, M, E, EV, sq, sk, sv, sb,
               BQ: tl.constexpr, BK: tl.constexpr, EP: tl.constexpr, EVP: tl.constexpr):  # fmt: skip
    g = tl.program_id(1)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    ce, cv = tl.arange(0, EP), tl.arange(0, EVP)
    live = rows < L
    q = tl.load(Q + g * sq + rows[:, None] * E + ce[None, :], mask=live[:, None] & (ce[None, :] < E), other=0.0)
    do = tl.load(DO + g * L * EV + rows[:, None] * EV + cv[None, :], mask=live[:, None] & (cv[None, :] < EV), other=0.0)
    lse = tl.load(LSE + g * L + rows, mask=live, other=float("inf"))
    delta = tl.load(DELTA + g * L + rows, mask=live, other=0.0)
    dq = tl.full([BQ, EP], 0.0, q.dtype)
    for j0 in range(0, M, BK):
        keys = j0 + tl.arange(0, BK)
        kt = tl.load(K + g * sk + keys[None, :] * E + ce[:, None], mask=(keys[None, :] < M) & (ce[:, None] < E), other=0.0)
        vt = tl.load(V + g * sv + keys[None, :] * EV + cv[:, None], mask=(keys[None, :] < M) & (cv[:, None] < EV), other=0.0)
        b = tl.load(B + g * sb + keys, mask=keys < M, other=float("-inf"))
        p = tl.exp(tl.dot(q, kt, input_precision="ieee") + b[None, :] - lse[:, None])
        ds = p * (tl.dot(do, vt, input_precision="ieee") - delta[:, None])
        dq += tl.dot(ds, tl.trans(kt), input_precision="ieee")
    tl.store(DQ + g * L * E + rows[:, None] * E + ce[None, :], dq, mask=live[:, None] & (ce[None, :] < E))


@triton.jit
def backward_kv(Q, K, V, B, DO, LSE, DELTA, DK, DV, DB, L, M, E, EV, sq, sk, sv, sb,
                BQ: tl.constexpr, BK: tl.constexpr, EP: tl.constexpr, EVP: tl.constexpr):  # fmt: skip
    g = tl.program_id(1)
    keys = tl.program_id(0) * BK + tl.arange(0, BK)
    ce, cv = tl.arange(0, EP), tl.arange(0, EVP)
    live = keys < M
    kt = tl.load(K + g * sk + keys[None, :] * E + ce[:, None], mask=live[None, :] & (ce[:, None] < E), other=0.0)
    vt = tl.load(V + g * sv + keys[None, :] * EV + cv[:, None], mask=live[None, :] & (cv[:, None] < EV), other=0.0)
    b = tl.load(B + g * sb + keys, mask=live, other=float("-inf"))
    dk = tl.full([BK, EP], 0.0, kt.dtype)
    dv = tl.full([BK, EVP], 0.0, kt.dtype)
    db = tl.full([BK], 0.0, kt.dtype)
    for i0 in range(0, L, BQ):
        rows = i0 + tl.arange(0, BQ)
        rl = rows < L
        q = tl.load(Q + g * sq + rows[:, None] * E + ce[None, :], mask=rl[:, None] & (ce[None, :] < E), other=0.0)
        do = tl.load(DO + g * L * EV + rows[:, None] * EV + cv[None, :], mask=rl[:, None] & (cv[None, :] < EV), other=0.0)
        lse = tl.load(LSE + g * L + rows, mask=rl, other=float("inf"))
        delta = tl.load(DELTA + g * L + rows, mask=rl, other=0.0)
        p = tl.exp(tl.dot(q, kt, input_precision="ieee") + b[None, :] - lse[:, None])  # (BQ, BK)
        ds = p * (tl.dot(do, vt, input_precision="ieee") - delta[:, None])
        dv += tl.dot(tl.trans(p), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        db += tl.reduce(ds, 0, add)
    tl.store(DK + g * M * E + keys[:, None] * E + ce[None, :], dk, mask=live[:, None] & (ce[None, :] < E))
    tl.store(DV + g * M * EV + keys[:, None] * EV + cv[None, :], dv, mask=live[:, None] & (cv[None, :] < EV))
    tl.store(DB + g * M + keys, db, mask=live)
