"""Flash attention with in-kernel dropout on the probabilities: a Pallas (Triton backend) kernel.

What: out = (keep ∘ softmax(scale q kᵀ) / (1 - rate)) v, non-causal, no mask: PyTorch's / V1T's
attention with inverted dropout on the probabilities, an independent mask per (example, head,
query, key). Forward and backward (`jax.custom_vjp`, gradients for q, k, v) are Pallas kernels for
GPUs (Triton lowering); tests run them on CPU with `interpret=True`. Adapted from jax's
`jax/experimental/pallas/ops/gpu/attention.py` (FlashAttention-2 forward, Triton-tutorial backward).

Layout: q, k, v are [N, H, T, D] (head-major); the output is [N, H, T, D] in q's dtype. Operands
float32 or bfloat16; dots accumulate in float32, softmax statistics are float32 (base-2 logits,
exp2). float32 operands give IEEE float32 dots on a GPU (Pallas' default; exact, slow): use bf16.

Padding (in the wrapper, exact): T is padded to a multiple of the largest block -- padded keys
get a -0.7*float32.max logit inside the kernel (weight exactly 0), padded query rows are zeros and
are sliced off -- and D to the next power of two (155 -> 256; Triton blocks are powers of two):
zero columns add nothing to q·k and give zero output columns, sliced off.

Dropout hash (counter based, the seed a traced uint32[2], e.g. `jax.random.bits(key, (2,),
jnp.uint32)`): plain jnp outside the kernel derives per (n, h) two bases from the seed, then one
32-bit key per query row a[n,h,i] = mix(i + base_a) and per key column b[n,h,j] = mix(j + base_b)
(mix = `lowbias32`, C. Wellons' 2-multiply murmur3-style finaliser, a bijection: keys are distinct
within a head). The kernel loads the [block] slices of a and b like the logsumexp and computes
keep[i,j] = mix(a_i ^ b_j) >= round(rate·2^32): per logit 1 xor, 2 integer multiplies, 3 shifts,
3 xors and a compare (~10 integer ops; the backward regenerates the same bits in both kernels).
Why this and not one hash of a linear counter (i*T + j): rows and columns enter through
pseudo-random keys, so there is no structural way for two rows to share a (shifted) run of bits;
coincidences are isolated elements, as for any 32-bit generator. `keep_mask` computes the same
bits in jnp, for a reference implementation.

Memory: O(T) per query row besides q, k, v, o: the float32 logsumexp (saved for the backward),
delta = rowsum(dO ∘ O) and the uint32 keys a, b ([N, H, T] each); never [T, T].
Backward (FlashAttention-2): P is recomputed from q, k and the logsumexp. With M the mask and
r = 1/(1-rate), O = (M∘P r) V: dV = (M∘P r)ᵀ dO, dP = (dO Vᵀ)∘M r, dS = P∘(dP - delta),
delta_i = Σ_j P_ij dP_ij = dO_i·O_i, dQ = scale dS K, dK = scale dSᵀ Q. Two kernels: dK/dV
(a program per key block) and dQ (a program per query block); delta is plain jnp.

Not yet measured on a GPU. The tests run the kernels in interpret mode and lower them to Triton
IR for 'cuda' on CPU; Triton's compilation (PTX), register pressure (D = 256 with 64-blocks may
spill: try smaller backward blocks), speed and the block/num_warps defaults are unchecked.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: no inf - inf = nan
LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------- dropout hash
def _mix32(x):
  """lowbias32 (Wellons): a bijective 32-bit finaliser, uint32 -> uint32, jnp and in-kernel."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _threshold(rate: float) -> int:
  """keep iff bits >= threshold: P(keep) = 1 - threshold / 2^32 (rate to 2^-32)."""
  return min(round(rate * 2.0**32), 2**32 - 1)


def _keep_bits(a_Q, b_K, rate: float):
  """[Q, K] keep mask from the row keys [Q] and column keys [K] (jnp and in-kernel)."""
  return _mix32(a_Q[:, None] ^ b_K[None, :]) >= np.uint32(_threshold(rate))


def _row_col_keys(seed_u32x2, n: int, h: int, tq: int, tk: int):
  """Row keys a [N, H, Tq] and column keys b [N, H, Tk] (uint32) from the seed."""
  seed_u32x2 = jnp.asarray(seed_u32x2)
  if seed_u32x2.shape != (2,) or seed_u32x2.dtype != jnp.uint32:
    raise ValueError(f"seed must be uint32[2], got {seed_u32x2.dtype}{list(seed_u32x2.shape)}")
  s = _mix32(seed_u32x2[1] ^ _mix32(seed_u32x2[0] + np.uint32(0x9E3779B9)))  # both words
  u_NxH = _mix32(jnp.arange(n * h, dtype=jnp.uint32).reshape(n, h) + s)  # distinct per head
  base_a_NxH = _mix32(u_NxH ^ np.uint32(0x85EBCA6B))
  base_b_NxH = _mix32(u_NxH ^ np.uint32(0xC2B2AE35))
  a_NxHxTq = _mix32(jnp.arange(tq, dtype=jnp.uint32) + base_a_NxH[..., None])
  b_NxHxTk = _mix32(jnp.arange(tk, dtype=jnp.uint32) + base_b_NxH[..., None])
  return a_NxHxTq, b_NxHxTk


def keep_mask(seed_u32x2, shape, rate: float) -> jax.Array:
  """bool [N, H, Tq, Tk]: the kernel's keep bits (True = kept), P(keep) = 1 - rate."""
  n, h, tq, tk = shape
  a_NxHxTq, b_NxHxTk = _row_col_keys(seed_u32x2, n, h, tq, tk)
  bits = _mix32(a_NxHxTq[..., :, None] ^ b_NxHxTk[..., None, :])
  return bits >= np.uint32(_threshold(rate))


def reference_attention(q, k, v, *, scale, keep_mask_or_None, rate: float) -> jax.Array:
  """Plain jnp attention, [N, H, T, D] -> float32 [N, H, T, D]: float32 softmax, inverted
  dropout with the given mask (or none). `scale`: a float or a per-head [H] array."""
  scale_H11 = jnp.asarray(scale, jnp.float32).reshape(-1, 1, 1)
  logits_NxHxTxT = jnp.einsum("nhqd,nhkd->nhqk", q, k, preferred_element_type=jnp.float32,
                              precision=jax.lax.Precision.HIGHEST) * scale_H11
  p_NxHxTxT = jax.nn.softmax(logits_NxHxTxT, axis=-1)
  if keep_mask_or_None is not None:
    p_NxHxTxT = jnp.where(keep_mask_or_None, p_NxHxTxT / (1.0 - rate), 0.0)
  return jnp.einsum("nhqk,nhkd->nhqd", p_NxHxTxT, v.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- kernels
@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  rate: float
  dropout: bool
  t: int  # true sequence length (keys at >= t are padding)
  t_pad: int
  block_q: int  # the kernel's query / key block (forward values; the backward replaces them)
  block_k: int
  bwd_blocks: tuple[int, int]
  num_warps: int
  num_stages: int
  interpret: bool


def _logits2(q_QxD, k_KxD, start_k, cfg: _Config):
  """Base-2 scaled logits [Q, K] (float32), padded keys masked."""
  s_QxK = plgpu.dot(q_QxD, k_KxD, trans_b=True) * (cfg.scale * LOG2E)
  if cfg.t_pad != cfg.t:
    pos_K = start_k + jnp.arange(k_KxD.shape[0])
    s_QxK = jnp.where(pos_K[None, :] < cfg.t, s_QxK, MASK_VALUE)
  return s_QxK


def _split(refs, cfg: _Config, n_in: int):
  """Kernel refs -> (inputs without keys, a_ref, b_ref, outputs); keys only with dropout."""
  if cfg.dropout:
    return refs[:n_in], refs[n_in], refs[n_in + 1], refs[n_in + 2:]
  return refs[:n_in], None, None, refs[n_in:]


def _fwd_kernel(*refs, cfg: _Config):
  # q [bq, Dp]; k, v [Tp, Dp]; a [bq]; b [Tp] -> o [bq, Dp], lse [bq] (base 2).
  (q_ref, k_ref, v_ref), a_ref, b_ref, (o_ref, lse_ref) = _split(refs, cfg, 3)
  bq, bk = cfg.block_q, cfg.block_k
  q_QxD = q_ref[...]
  a_Q = a_ref[...] if cfg.dropout else None

  def body(kb, carry):  # online softmax over key blocks (stats of the *undropped* p)
    acc_QxD, m_Q, l_Q = carry
    start = kb * bk
    s_QxK = _logits2(q_QxD, k_ref[pl.ds(start, bk), :], start, cfg)
    m_next_Q = jnp.maximum(m_Q, jnp.max(s_QxK, axis=-1))
    corr_Q = jnp.exp2(m_Q - m_next_Q)
    p_QxK = jnp.exp2(s_QxK - m_next_Q[:, None])
    l_Q = corr_Q * l_Q + jnp.sum(p_QxK, axis=-1)
    if cfg.dropout:
      p_QxK = jnp.where(_keep_bits(a_Q, b_ref[pl.ds(start, bk)], cfg.rate), p_QxK, 0.0)
    v_KxD = v_ref[pl.ds(start, bk), :]
    acc_QxD = corr_Q[:, None] * acc_QxD + plgpu.dot(p_QxK.astype(v_KxD.dtype), v_KxD)
    return acc_QxD, m_next_Q, l_Q

  init = (jnp.zeros(q_QxD.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc_QxD, m_Q, l_Q = jax.lax.fori_loop(0, cfg.t_pad // bk, body, init)
  inv_keep = 1.0 / (1.0 - cfg.rate) if cfg.dropout else 1.0
  o_ref[...] = (acc_QxD * (inv_keep / l_Q)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m_Q + jnp.log2(l_Q)


def _ds(p_QxK, dpd_QxK, delta_Q, keep_QxK, cfg: _Config):
  """dS = P ∘ (dP - delta) · scale, dP = dP_dropped ∘ M / (1-rate) (see module docstring)."""
  if keep_QxK is not None:
    dpd_QxK = jnp.where(keep_QxK, dpd_QxK * (1.0 / (1.0 - cfg.rate)), 0.0)
  return p_QxK * (dpd_QxK - delta_Q[:, None]) * cfg.scale


def _dkdv_kernel(*refs, cfg: _Config):
  # One key block per program; loop over query blocks. q, do [Tp, Dp]; k, v [bk, Dp];
  # lse, delta [Tp]; a [Tp]; b [bk] -> dk, dv [bk, Dp].
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), a_ref, b_ref, (dk_ref, dv_ref) = (
      _split(refs, cfg, 6))
  bq = cfg.block_q
  start_k = pl.program_id(0) * cfg.block_k
  k_KxD, v_KxD = k_ref[...], v_ref[...]
  b_K = b_ref[...] if cfg.dropout else None

  def body(qb, carry):
    dk_KxD, dv_KxD = carry
    rows = pl.ds(qb * bq, bq)
    q_QxD, do_QxD = q_ref[rows, :], do_ref[rows, :]
    p_QxK = jnp.exp2(_logits2(q_QxD, k_KxD, start_k, cfg) - lse_ref[rows][:, None])
    keep_QxK = _keep_bits(a_ref[rows], b_K, cfg.rate) if cfg.dropout else None
    pd_QxK = p_QxK if keep_QxK is None else jnp.where(
        keep_QxK, p_QxK * (1.0 / (1.0 - cfg.rate)), 0.0)
    dv_KxD += plgpu.dot(pd_QxK.astype(do_QxD.dtype), do_QxD, trans_a=True)
    dpd_QxK = plgpu.dot(do_QxD, v_KxD, trans_b=True)
    ds_QxK = _ds(p_QxK, dpd_QxK, delta_ref[rows], keep_QxK, cfg)
    dk_KxD += plgpu.dot(ds_QxK.astype(q_QxD.dtype), q_QxD, trans_a=True)
    return dk_KxD, dv_KxD

  zeros = jnp.zeros(k_KxD.shape, jnp.float32)
  dk_KxD, dv_KxD = jax.lax.fori_loop(0, cfg.t_pad // bq, body, (zeros, zeros))
  dk_ref[...] = dk_KxD.astype(dk_ref.dtype)
  dv_ref[...] = dv_KxD.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Config):
  # One query block per program; loop over key blocks. q, do [bq, Dp]; k, v [Tp, Dp];
  # lse, delta [bq]; a [bq]; b [Tp] -> dq [bq, Dp].
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), a_ref, b_ref, (dq_ref,) = (
      _split(refs, cfg, 6))
  bk = cfg.block_k
  q_QxD, do_QxD, lse_Q, delta_Q = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  a_Q = a_ref[...] if cfg.dropout else None

  def body(kb, dq_QxD):
    start = kb * bk
    k_KxD, v_KxD = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    p_QxK = jnp.exp2(_logits2(q_QxD, k_KxD, start, cfg) - lse_Q[:, None])
    keep_QxK = _keep_bits(a_Q, b_ref[pl.ds(start, bk)], cfg.rate) if cfg.dropout else None
    ds_QxK = _ds(p_QxK, plgpu.dot(do_QxD, v_KxD, trans_b=True), delta_Q, keep_QxK, cfg)
    return dq_QxD + plgpu.dot(ds_QxK.astype(k_KxD.dtype), k_KxD)

  dq_QxD = jax.lax.fori_loop(0, cfg.t_pad // bk, body, jnp.zeros(q_QxD.shape, jnp.float32))
  dq_ref[...] = dq_QxD.astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls
def _call(kernel, cfg: _Config, name, args, in_blocks, out_shape, out_blocks, own_q: bool):
  """pallas_call on grid (own blocks, N, H) (consecutive programs share (n, h): L2 reuse).
  Blocks: ('own', D?) = this program's block, ('all', D?) = the whole padded sequence."""
  n, h = args[0].shape[:2]
  own = cfg.block_q if own_q else cfg.block_k

  def spec(block):
    rows, has_d = block
    size = own if rows == "own" else cfg.t_pad
    if has_d:
      return pl.BlockSpec((None, None, size, args[0].shape[-1]),
                          lambda i, b, hh: (b, hh, i if rows == "own" else 0, 0))
    return pl.BlockSpec((None, None, size), lambda i, b, hh: (b, hh, i if rows == "own" else 0))

  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), grid=(cfg.t_pad // own, n, h),
      in_specs=[spec(b) for b in in_blocks], out_specs=[spec(b) for b in out_blocks],
      out_shape=out_shape, interpret=cfg.interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
  )(*args)


def _forward(q, k, v, keys, cfg: _Config):
  n, h, tp, _ = q.shape
  key_args, key_blocks = (list(keys), [("own", False), ("all", False)]) if cfg.dropout else ([], [])
  o, lse = _call(_fwd_kernel, cfg, "flash_attention_fwd", [q, k, v] + key_args,
                 [("own", True), ("all", True), ("all", True)] + key_blocks,
                 [jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((n, h, tp), jnp.float32)],
                 [("own", True), ("own", False)], own_q=True)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, keys, cfg: _Config):
  return _forward(q, k, v, keys, cfg)[0]


def _flash_fwd(q, k, v, keys, cfg: _Config):
  o, lse = _forward(q, k, v, keys, cfg)
  return o, (q, k, v, keys, o, lse)


def _flash_bwd(cfg: _Config, res, do):
  q, k, v, keys, o, lse = res
  cfg = dataclasses.replace(cfg, block_q=cfg.bwd_blocks[0], block_k=cfg.bwd_blocks[1])
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [N, H, Tp]
  do = do.astype(q.dtype)
  args = [q, k, v, do, lse, delta]
  key_args = list(keys) if cfg.dropout else []
  # dK, dV: each program owns a key block, everything query-indexed is 'all'.
  dkdv_keys = [("all", False), ("own", False)] if cfg.dropout else []
  dk, dv = _call(_dkdv_kernel, cfg, "flash_attention_dkdv", args + key_args,
                 [("all", True), ("own", True), ("own", True), ("all", True), ("all", False),
                  ("all", False)] + dkdv_keys,
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 [("own", True), ("own", True)], own_q=False)
  # dQ: each program owns a query block, loops over key blocks.
  dq_keys = [("own", False), ("all", False)] if cfg.dropout else []
  (dq,) = _call(_dq_kernel, cfg, "flash_attention_dq", args + key_args,
                [("own", True), ("all", True), ("all", True), ("own", True), ("own", False),
                 ("own", False)] + dq_keys,
                [jax.ShapeDtypeStruct(q.shape, q.dtype)], [("own", True)], own_q=True)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, scale: float | jax.Array, dropout_rate: float,
                    seed: jax.Array | None, block_q: int = 64, block_k: int = 64,
                    interpret: bool = False, block_q_bwd: int | None = None,
                    block_k_bwd: int | None = None, num_warps: int | None = None,
                    num_stages: int = 2) -> jax.Array:
  """Attention with dropout on the probabilities, [N, H, T, D] -> [N, H, T, D] in q's dtype.

  scale: a Python float (static), or an array (scalar or per-head [H]) folded into q (q·s)
  outside the kernel. seed: uint32[2]; None or dropout_rate 0 = no dropout. block_q, block_k
  (forward), block_q_bwd, block_k_bwd (backward, default the forward's): powers of two >= 16
  (Triton dot tiles). num_warps (default 4 if the padded D <= 64, else 8), num_stages: Triton
  launch settings. interpret: Pallas interpret mode (the CPU tests)."""
  n, h, t, d = q.shape
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must have one shape [N, H, T, D]: {q.shape} {k.shape} {v.shape}")
  blocks = (block_q, block_k, block_q_bwd or block_q, block_k_bwd or block_k)
  if any(b < 16 or b & (b - 1) for b in blocks):
    raise ValueError(f"block sizes must be powers of two >= 16, got {blocks}")
  rate = float(dropout_rate)
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
  dropout = seed is not None and rate > 0.0
  if not isinstance(scale, (int, float)):  # traced / per-head: (s q)·k = s (q·k); autodiff'd
    scale_H11 = jnp.asarray(scale, jnp.float32).reshape(-1, 1, 1)
    q, scale = (q.astype(jnp.float32) * scale_H11).astype(q.dtype), 1.0
  t_pad = -(-t // max(blocks)) * max(blocks)  # every block size divides t_pad
  d_pad = pl.next_power_of_2(d)
  cfg = _Config(scale=float(scale), rate=rate if dropout else 0.0, dropout=dropout, t=t,
                t_pad=t_pad, block_q=block_q, block_k=block_k, bwd_blocks=blocks[2:],
                num_warps=num_warps or (4 if d_pad <= 64 else 8), num_stages=num_stages,
                interpret=interpret)
  keys = _row_col_keys(seed, n, h, t_pad, t_pad) if dropout else None
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t), (0, d_pad - d)))
  return _flash(pad(q), pad(k), pad(v), keys, cfg)[:, :, :t, :d]
