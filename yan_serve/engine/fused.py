"""YAN's inference forward with few launches: packed weights, per-step constants, fused kernels.

The model's modules (`yan_serve.model`) are the reference. This engine computes the same
sample (encoder, T - 1 trunk passes with frozen routing, decoder argmax) from the same weights,
rearranged for inference, where at batch 1 the cost is the number of kernel launches:

- Per-step constants. The adaptive norms' scale and shift, the time embedding and the gate's
  time term depend only on t, and the time grid is fixed for a given number of steps, so they
  are computed once per `steps` (`_StepTables`) instead of once per trunk pass and block. An
  adaptive norm at a fixed t is then an ordinary LayerNorm affine.
- Packed projections. Self-attention reads one [3d, d] QKV projection; the cross-attention keys
  and values of every cross block depend only on the encoded source, so all of them come from
  one [n_cross * 2d, d] projection, once per sample rather than once per trunk pass.
- Fused residuals. Each `x = x + sublayer(...)` and the LayerNorm after it are one kernel
  (`yan_kernels.layer_norm.add_layer_norm`); attention masks are built once per sample.
  With `linears="fused"` they go further: each LayerNorm runs in the prologue of the GEMM that
  reads it, and each residual add (with its bias) in the epilogue of the GEMM that feeds it
  (`ops.fused_linear`), so a sub-layer is two launches plus its attention.
- Frozen routing. The gate and the routing choice are one kernel (`ops.gate_route`); tokens
  are grouped by expert once (`ops.expert_tiles`) and every Euler step runs the routed-expert
  kernel with the Euler update in its epilogue.
- The decoder's lm_head runs fused with the argmax (`ops.decoder_argmax`).
- Attention is SDPA with the additive key mask (on an H100 with torch 2.11 it dispatches to
  cuDNN's fused attention); FlashAttention's variable-length kernel (padded keys skipped, Q/K/V
  read in place from the packed projections) is the `attention="flash"` option.

Values at padded target positions differ from the reference (the engine does not zero them
after each sub-layer) but never reach a real position: padded keys are masked in every
attention, and the gate, experts and decoder act per position. Real positions agree with the
reference up to float rounding (tests/engine/test_fused.py).

The engine holds tensors derived from the weights (the packs and the step tables). `refresh()`
recomputes them in place (so captured CUDA graphs that read them stay valid); `stale()` says
whether any source parameter changed since (an optimizer step, `load_state_dict`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from yan_kernels import ops

from yan_serve.flow.solver import Routing, SolveResult, time_grid
from yan_serve.model.layers import LN_EPS, MultiHeadAttention, masked_mean
from yan_serve.model.yan import YAN


@dataclass
class _Attn:
    """One self-attention's packed projection: [3d, d] (+ [3d] bias)."""

    w_qkv: Tensor
    b_qkv: Tensor | None
    heads: int


@dataclass
class _StepTables:
    """Constants of one time grid: per trunk pass i (t_i, i < T - 1), per block, the adaptive
    norms' (scale, shift) for the self-attention, the FFN and the cross-attention; the Euler
    step sizes; and the gate's time term at t = 0."""

    mods: list[list[Tensor]]  # [pass][block] -> [6 or 4, d]
    dts: list[float]  # t_{i+1} - t_i in the model's dtype, as the reference computes them
    gate_t: Tensor  # [gate_dim]: W_t @ t_emb(0) + b of the gate's first layer


@dataclass
class KeyPadding:
    """Which keys of a padded [B, L] batch are real, in the forms the attention paths take.

    `mask` [B, L] bool, a prefix (length) mask as the sampler builds them. `bias()`: the
    additive SDPA mask [B, 1, 1, L] (0 / -inf; a row without a real key attends everywhere,
    as `key_padding_mask` does), built on first use. For FlashAttention's variable-length
    kernel (CUDA, when `flash`): `starts` [B + 1] int32, row b's offset b * L in the flattened
    [B * L] layout, and `used` [B] int32, the count of real keys of each row (L for a row
    without one)."""

    mask: Tensor
    dtype: torch.dtype
    starts: Tensor | None = None
    used: Tensor | None = None
    _bias: Tensor | None = None
    lengths: Tensor | None = None  # [B] int32 real keys per row, for attention="triton"

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def flash(self) -> bool:
        return self.used is not None

    def bias(self) -> Tensor:
        if self._bias is None:
            self._bias = FusedEngine.key_bias(self.mask, self.dtype)
        return self._bias


ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "cudnn", "triton")
LINEAR_MODES = ("cublas", "gelu", "fused")


def flash_varlen_available() -> bool:
    """Whether this torch build has the variable-length FlashAttention operator."""
    return hasattr(torch.ops.aten, "_flash_attention_forward")


class FusedEngine:
    """The inference forward of a YAN model in eval mode (see the module docstring).

    `attention`: "sdpa" runs every attention through `F.scaled_dot_product_attention` with an
    additive key-padding mask (the reference; the only path off CUDA); "flash" through
    FlashAttention's variable-length kernel, which skips padded keys instead of masking them
    and reads Q, K and V straight out of the packed projections (no transposes); "cudnn" SDPA
    restricted to cuDNN's fused attention; "triton" our kernel (`ops.attention`), which also
    splits the keys over more programs when a small batch leaves SMs idle (flash-decoding
    style), reading Q, K and V in place and the key lengths instead of a mask; "auto" is SDPA:
    measured on an H100 (torch 2.11, yan-paper, bf16), SDPA, which picks cuDNN's fused
    attention there, was as fast as flash or faster at 1 x 512, 1 x 1024 and 64 x 512 and
    within 1% at 64 x 1024 ("triton" is not yet measured).

    `linears`, how the Transformer blocks' linear layers run:
    - "cublas": cuBLAS GEMMs (bias in their epilogue), a separate exact-GELU pass, and each
      residual add fused with the LayerNorm after it (`ops.add_layer_norm`);
    - "gelu": as "cublas", but every FFN's up-projection, bias and exact GELU in one Triton GEMM
      (`ops.linear_gelu`): one launch fewer per FFN, no second pass over the [tokens, 4d]
      activation;
    - "fused": every linear layer of the encoder, the trunk and the decoder's residual blocks
      in one Triton GEMM with the LayerNorm before it in its prologue and the GELU or the
      residual add after it in its epilogue (`ops.fused_linear`): a Transformer block with
      cross-attention is 8 launches instead of 11 ("gelu") or 12 ("cublas"). The norms are
      recomputed by every column tile, which is free at batch 1 and not at 64 x 1024 tokens.
    The default stays "cublas" until a GPU measurement (`bench sampler --compare`) says which
    pays at which size."""

    def __init__(self, model: YAN, attention: str = "auto", linears: str = "cublas") -> None:
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        if linears not in LINEAR_MODES:
            raise ValueError(f"linears must be one of {LINEAR_MODES}, got {linears!r}")
        self.model = model
        self.cfg = model.config
        self.attention = attention
        self.linears = linears
        self._attn: dict[int, _Attn] = {}  # id(MultiHeadAttention) -> pack
        self._cross_kv_w: Tensor | None = None
        self._cross_kv_b: Tensor | None = None
        self._tables: dict[int, _StepTables] = {}
        self._fingerprint: tuple = ()
        self.refresh()

    # ------------------------------------------------------------------------- derived state
    def _sources(self) -> list[Tensor]:
        """The parameters the derived tensors are computed from."""
        m = self.model
        out: list[Tensor] = [*m.flow.time_emb.parameters(), *m.flow.gate[0].parameters()]
        for blk in m.flow.trf_blocks:
            out += list(blk.adaLN.parameters())
        for att in self._attentions():
            out += [p for lin in (att.W_q, att.W_k, att.W_v) for p in lin.parameters()]
        return out

    def _attentions(self) -> list[MultiHeadAttention]:
        m = self.model
        blocks = [*m.encoder.trf_blocks, *m.flow.trf_blocks]
        out = [b.self_att for b in blocks if isinstance(b.self_att, MultiHeadAttention)]
        return out + [b.cross_att for b in m.flow.trf_blocks if b.has_cross]

    def _fingerprint_now(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self._source_params)

    def stale(self) -> bool:
        """Whether a source parameter was modified in place or moved (`load_state_dict`, an
        optimizer step, `.to()`) since the last `refresh`. It runs before every sample, so it
        reads a parameter list gathered at `refresh` (~8 us for yan-paper instead of ~200 us
        walking the modules): a Parameter object swapped for another by attribute assignment
        is not seen; call `refresh()` after such surgery."""
        return self._fingerprint_now() != self._fingerprint

    @torch.no_grad()
    def refresh(self) -> None:
        """(Re)compute the packed weights and every cached step table, in place where they
        exist (captured graphs keep reading the same buffers)."""
        m = self.model

        def put(old: Tensor | None, new: Tensor) -> Tensor:
            if old is not None and old.shape == new.shape and old.dtype == new.dtype:
                return old.copy_(new)
            return new

        for blk in [*m.encoder.trf_blocks, *m.flow.trf_blocks]:
            att = blk.self_att
            if not isinstance(att, MultiHeadAttention):
                continue
            old = self._attn.get(id(att))
            w = torch.cat([att.W_q.weight, att.W_k.weight, att.W_v.weight])
            b = None
            if att.W_q.bias is not None:
                b = torch.cat([att.W_q.bias, att.W_k.bias, att.W_v.bias])
            self._attn[id(att)] = _Attn(
                put(old and old.w_qkv, w),
                None if b is None else put(old and old.b_qkv, b),
                att.n_heads,
            )
        cross = [blk.cross_att for blk in m.flow.trf_blocks if blk.has_cross]
        if cross:
            w = torch.cat([t for a in cross for t in (a.W_k.weight, a.W_v.weight)])
            self._cross_kv_w = put(self._cross_kv_w, w)
            if cross[0].W_k.bias is not None:
                b = torch.cat([t for a in cross for t in (a.W_k.bias, a.W_v.bias)])
                self._cross_kv_b = put(self._cross_kv_b, b)
        for steps, old in self._tables.items():
            new = self._build_tables(steps)
            for pa, pb in zip(old.mods, new.mods, strict=True):
                for a, b in zip(pa, pb, strict=True):
                    a.copy_(b)
            old.gate_t.copy_(new.gate_t)
            old.dts[:] = new.dts
        self._source_params = self._sources()
        self._fingerprint = self._fingerprint_now()

    def tables(self, steps: int) -> _StepTables:
        if steps not in self._tables:
            self._tables[steps] = self._build_tables(steps)
        return self._tables[steps]

    @torch.no_grad()
    def _build_tables(self, steps: int) -> _StepTables:
        m = self.model
        flow = m.flow
        dtype = next(m.parameters()).dtype
        dev = next(m.parameters()).device
        ts = time_grid(steps, dev, dtype)
        mods = []
        for i in range(max(steps - 1, 1)):
            t_emb = flow.time_emb(ts[i].reshape(1))  # [1, d], exactly as the trunk computes it
            per_block = []
            for blk in flow.trf_blocks:
                n = 6 if blk.has_cross else 4
                per_block.append(blk.adaLN(t_emb).view(n, -1).contiguous())  # [n, d]
            mods.append(per_block)
        d = self.cfg.d_model
        t0 = flow.time_emb(ts[0].reshape(1))[0]  # [d]
        g = flow.gate[0]
        gate_t = F.linear(t0, g.weight[:, 2 * d :], g.bias)  # [gate_dim]
        dts = [float(ts[i + 1] - ts[i]) for i in range(steps - 1)]
        return _StepTables(mods, dts, gate_t)

    # ------------------------------------------------------------------------------ pieces
    @staticmethod
    def key_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, L] bool prefix mask -> [B, 1, 1, L] additive SDPA mask (0 / -inf); a row without
        a real key (its first position is not real) attends everywhere, as `key_padding_mask`
        does. log(1) = 0 and log(0) = -inf: four small launches, not seven."""
        keep = mask | ~mask[:, :1]
        return keep.to(dtype).log_()[:, None, None, :]

    def uses_flash(self, x: Tensor) -> bool:
        """Whether attention on activations like `x` runs FlashAttention: only when asked
        (`attention="flash"`), which needs CUDA, 16-bit weights and a supported head size."""
        if self.attention != "flash":
            return False
        hd = self.cfg.d_model // self.cfg.attention_heads
        able = (
            x.is_cuda
            and x.dtype in (torch.bfloat16, torch.float16)
            and hd % 8 == 0
            and hd <= 256
            and flash_varlen_available()
        )
        if not able:
            raise ValueError(
                "attention='flash' needs CUDA, 16-bit weights and a head size that is a "
                f"multiple of 8 up to 256 (got {x.device.type}, {x.dtype}, head size {hd})"
            )
        return True

    def key_padding(
        self, mask: Tensor, dtype: torch.dtype, flash: bool, bias: Tensor | None = None
    ) -> KeyPadding:
        """[B, L] bool prefix mask -> `KeyPadding` (the flash fields only when `flash`; `bias`
        [B, L], the additive form when the caller has it already)."""
        B, L = mask.shape
        if self.attention == "triton":  # the kernel reads each row's count of real keys
            return KeyPadding(mask, dtype, lengths=mask.sum(-1, dtype=torch.int32))
        if not flash:
            return KeyPadding(mask, dtype, _bias=None if bias is None else bias[:, None, None, :])
        starts = torch.arange(0, (B + 1) * L, L, device=mask.device, dtype=torch.int32)
        used = mask.sum(-1, dtype=torch.int32)
        used = torch.where(used > 0, used, L).to(torch.int32)
        return KeyPadding(mask, dtype, starts, used)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, qpad: KeyPadding, kpad: KeyPadding
    ) -> Tensor:
        """q [B * Lq, H, hd], k / v [B * Lk, H, hd] (views with a unit inner stride) ->
        [B * Lq, H * hd], each query attending to its own row's real keys."""
        H, hd = q.shape[1], q.shape[2]
        Lq, Lk = qpad.length, kpad.length
        B = q.shape[0] // Lq
        if kpad.lengths is not None:
            return ops.attention(q, k, v, kpad.lengths, Lq, Lk)
        if kpad.flash:  # the paddings carry flash fields exactly when flash was chosen
            out = torch.ops.aten._flash_attention_forward(
                q, k, v, qpad.starts, kpad.starts, Lq, Lk, 0.0, False, False, seqused_k=kpad.used
            )[0]
            return out.reshape(B * Lq, H * hd)
        qt, kt, vt = (t.view(B, -1, H, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, L, hd]
        backends = contextlib.nullcontext()
        if self.attention == "cudnn":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        with backends:
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=kpad.bias())
        return o.transpose(1, 2).reshape(B * Lq, H * hd)

    def _self_attention(self, att: MultiHeadAttention, h: Tensor, pad: KeyPadding) -> Tensor:
        """h [B, L, d] -> attention output before out_proj, [B * L, d]."""
        B, L, d = h.shape
        pack = self._attn[id(att)]
        H = pack.heads
        qkv = F.linear(h, pack.w_qkv, pack.b_qkv).view(B * L, 3, H, d // H)
        return self._attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], pad, pad)

    def _mix(self, blk, h: Tensor, mask: Tensor, pad: KeyPadding) -> tuple[Tensor, Tensor | None]:
        """The block's sequence mixer: (output [B * L, d] before the residual, its bias)."""
        att = blk.self_att
        B, L, d = h.shape
        if isinstance(att, MultiHeadAttention):
            o = self._self_attention(att, h, pad)
            return F.linear(o, att.out_proj.weight), att.out_proj.bias
        return att(h, mask).reshape(B * L, d), None  # a Mamba mixer runs as the module

    def _ffn(self, ff, h: Tensor, with_bias: bool = False) -> Tensor:
        """FeedForward without its output bias (the fused residual adds it), unless asked.
        The up-projection's bias is in its GEMM. With `linears="gelu"` the exact GELU is in that
        GEMM's epilogue too (`ops.linear_gelu`, one launch); otherwise it is a separate pass
        after cuBLAS (cuBLASLt's own GELU epilogue is the tanh form, which moved the bf16
        latents measurably off the modules' erf form, so it is not used)."""
        up, down = ff.layers[0], ff.layers[2]
        if self.linears == "gelu":
            a = ops.linear_gelu(h, up.weight, up.bias)
        else:
            a = F.gelu(F.linear(h, up.weight, up.bias))
        return F.linear(a, down.weight, down.bias if with_bias else None)

    # -------------------------------------------------- linears="fused": the residual stream
    def _fused_mix(self, blk, x: Tensor, norm: tuple, mask: Tensor, pad: KeyPadding,
                   L: int) -> Tensor:  # fmt: skip
        """x + mixer(norm(x)): x [B * L, d] -> the stream after the block's sequence mixer."""
        att = blk.self_att
        d = x.shape[-1]
        B = x.shape[0] // L
        if not isinstance(att, MultiHeadAttention):  # a Mamba mixer runs as the module
            _, h = ops.add_layer_norm(x, None, norm[0], norm[1], eps=norm[2])
            return x + att(h.view(B, L, d), mask).reshape(B * L, d)
        pack = self._attn[id(att)]
        H = pack.heads
        qkv = ops.fused_linear(x, pack.w_qkv, pack.b_qkv, norm=norm).view(B * L, 3, H, d // H)
        o = self._attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], pad, pad)
        return ops.fused_linear(o, att.out_proj.weight, att.out_proj.bias, residual=x)

    def _fused_cross(self, ca, x: Tensor, norm: tuple, kv: tuple[Tensor, Tensor],
                     qpad: KeyPadding, kpad: KeyPadding) -> Tensor:  # fmt: skip
        """x + cross_attention(norm(x), source): x [B * Lq, d] -> the stream after it."""
        d = x.shape[-1]
        H = self.cfg.attention_heads
        q = ops.fused_linear(x, ca.W_q.weight, ca.W_q.bias, norm=norm).view(-1, H, d // H)
        a = self._attend(q, kv[0], kv[1], qpad, kpad)
        return ops.fused_linear(a, ca.out_proj.weight, ca.out_proj.bias, residual=x)

    @staticmethod
    def _fused_ffn(ff, x: Tensor, norm: tuple) -> Tensor:
        """x + FFN(norm(x)): two launches."""
        up, down = ff.layers[0], ff.layers[2]
        a = ops.fused_linear(x, up.weight, up.bias, norm=norm, gelu=True)
        return ops.fused_linear(a, down.weight, down.bias, residual=x)

    @staticmethod
    def _norm(ln) -> tuple[Tensor, Tensor, float]:
        """A LayerNorm module's (scale, shift, eps), as `ops.fused_linear` takes them."""
        return ln.scale, ln.shift, ln.eps

    # ----------------------------------------------------------------------------- encoder
    @torch.no_grad()
    def encode(
        self, src: Tensor, src_mask: Tensor, src_bias: Tensor | None = None
    ) -> tuple[Tensor, KeyPadding]:
        """src [B, Lx] long, src_mask [B, Lx] (a prefix mask; `src_bias` its additive form, if
        the caller has it) -> (latents [B, Lx, d] zero at padding, the source's key padding
        for attending to them, with the flash fields when attention runs FlashAttention)."""
        m = self.model
        B, Lx = src.shape
        d = self.cfg.d_model
        w = m.tok_emb.weight
        pad = self.key_padding(src_mask, w.dtype, self.uses_flash(w), src_bias)
        x = F.embedding(src, m.tok_emb.weight) + m.positions(Lx)  # [B, Lx, d]
        x = x.reshape(B * Lx, d)
        blocks = m.encoder.trf_blocks
        if self.linears == "fused":
            for blk in blocks:
                x = self._fused_mix(blk, x, self._norm(blk.norm_self_att), src_mask, pad, Lx)
                x = self._fused_ffn(blk.ff, x, self._norm(blk.norm_ff))
            fin = m.encoder.final_norm
            _, h = ops.add_layer_norm(x, None, fin.scale, fin.shift, eps=fin.eps)
            return h.view(B, Lx, d) * src_mask[..., None].to(h.dtype), pad
        n0 = blocks[0].norm_self_att
        x, h = ops.add_layer_norm(x, None, n0.scale, n0.shift, eps=n0.eps)
        for j, blk in enumerate(blocks):
            o, ob = self._mix(blk, h.view(B, Lx, d), src_mask, pad)
            x, h = ops.add_layer_norm(x, o, blk.norm_ff.scale, blk.norm_ff.shift, ob, LN_EPS)
            f = self._ffn(blk.ff, h)
            nxt = blocks[j + 1].norm_self_att if j + 1 < len(blocks) else m.encoder.final_norm
            x, h = ops.add_layer_norm(x, f, nxt.scale, nxt.shift, blk.ff.layers[2].bias, nxt.eps)
        if not blocks:
            fin = m.encoder.final_norm
            _, h = ops.add_layer_norm(x, None, fin.scale, fin.shift, eps=fin.eps)
        out = h.view(B, Lx, d) * src_mask[..., None].to(h.dtype)
        return out, pad

    # ------------------------------------------------------------------------------- trunk
    def _cross_kv(self, src_h: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Keys and values [B * Lx, H, hd] (views) of every cross block, from one projection."""
        if self._cross_kv_w is None:
            return []
        B, Lx, d = src_h.shape
        H = self.cfg.attention_heads
        kv = F.linear(src_h, self._cross_kv_w, self._cross_kv_b)  # [B, Lx, n * 2d]
        kv = kv.view(B * Lx, -1, 2, H, d // H)
        return [(kv[:, i, 0], kv[:, i, 1]) for i in range(kv.shape[1])]

    def _trunk(
        self,
        z: Tensor,
        mods: list[Tensor],
        tgt_mask: Tensor,
        tgt_pad: KeyPadding,
        cross_kv: list[tuple[Tensor, Tensor]],
        src_pad: KeyPadding,
    ) -> Tensor:
        """One trunk pass at a fixed t: z [B, L, d] -> h [B * L, d] (after the final norm)."""
        flow = self.model.flow
        B, L, d = z.shape
        H = self.cfg.attention_heads
        x = (z + self.model.positions(L)).reshape(B * L, d)
        blocks = flow.trf_blocks
        if self.linears == "fused":
            ci = 0
            for blk, mj in zip(blocks, mods, strict=True):
                x = self._fused_mix(blk, x, (mj[0], mj[1], LN_EPS), tgt_mask, tgt_pad, L)
                if blk.has_cross:
                    x = self._fused_cross(blk.cross_att, x, (mj[4], mj[5], LN_EPS),
                                          cross_kv[ci], tgt_pad, src_pad)  # fmt: skip
                    ci += 1
                x = self._fused_ffn(blk.ff, x, (mj[2], mj[3], LN_EPS))
            fin = flow.final_norm
            return ops.add_layer_norm(x, None, fin.scale, fin.shift, eps=fin.eps)[1]
        x, h = ops.add_layer_norm(x, None, mods[0][0], mods[0][1], eps=LN_EPS)
        ci = 0
        for j, blk in enumerate(blocks):
            mj = mods[j]
            o, ob = self._mix(blk, h.view(B, L, d), tgt_mask, tgt_pad)
            if blk.has_cross:
                x, h = ops.add_layer_norm(x, o, mj[4], mj[5], ob, LN_EPS)
                ca = blk.cross_att
                q = F.linear(h, ca.W_q.weight, ca.W_q.bias).view(B * L, H, d // H)
                k, v = cross_kv[ci]
                ci += 1
                a = self._attend(q, k, v, tgt_pad, src_pad)
                o = F.linear(a, ca.out_proj.weight)
                ob = ca.out_proj.bias
            x, h = ops.add_layer_norm(x, o, mj[2], mj[3], ob, LN_EPS)
            f = self._ffn(blk.ff, h)
            if j + 1 < len(blocks):
                ns, nb, eps = mods[j + 1][0], mods[j + 1][1], LN_EPS
            else:
                ns, nb, eps = flow.final_norm.scale, flow.final_norm.shift, flow.final_norm.eps
            x, h = ops.add_layer_norm(x, f, ns, nb, blk.ff.layers[2].bias, eps)
        if not blocks:
            fin = flow.final_norm
            _, h = ops.add_layer_norm(x, None, fin.scale, fin.shift, eps=fin.eps)
        return h

    def _route(
        self,
        h: Tensor,
        src_pooled: Tensor,
        tables: _StepTables,
        B: int,
        routing: Routing,
        uniforms: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """pi(z_0, 0) and the frozen choice: h [B * L, d] -> (gate probabilities [B, L, K]
        fp32, experts [B, L] long) (padding is not masked: unused there). The gate's hidden
        layer splits into a per-token GEMM and a per-row term (the pooled source and the time
        embedding, one small GEMM); the token part, the GELU, the output layer, the softmax
        and the choice are one launch (`ops.gate_route`)."""
        flow = self.model.flow
        d = self.cfg.d_model
        g0, g2 = flow.gate[0], flow.gate[2]
        row = torch.addmm(tables.gate_t, src_pooled, g0.weight[:, d : 2 * d].t())  # [B, gd]
        return ops.gate_route(h.view(B, -1, d), row, g0.weight[:, :d], g2.weight, g2.bias,
                              flow.gate_temperature, routing, uniforms)  # fmt: skip

    @torch.no_grad()
    def solve(
        self,
        src: Tensor,
        src_mask: Tensor,
        tgt_mask: Tensor,
        z0: Tensor,
        uniforms: Tensor,
        steps: int,
        routing: Routing = "sample",
        step_hook: Callable[[int, Tensor], None] | None = None,
        src_bias: Tensor | None = None,
        tgt_bias: Tensor | None = None,
    ) -> SolveResult:
        """Encode and integrate: the same contract as `Sampler.solve` on the modules (z at
        t = 1, the frozen experts, the gate probabilities). `step_hook(i, z)` sees each state.
        `src_bias` / `tgt_bias` [B, L]: the masks' additive forms, when the caller built them
        (`ops.length_masks`), instead of deriving them here."""
        if steps < 1:
            raise ValueError(f"steps counts time points and must be >= 1, got {steps}")
        flow = self.model.flow
        B, L, d = z0.shape
        tables = self.tables(steps)
        src_h, src_pad = self.encode(src, src_mask, src_bias)
        src_pooled = masked_mean(src_h, src_mask)
        tgt_pad = self.key_padding(tgt_mask, z0.dtype, src_pad.flash, tgt_bias)
        cross_kv = self._cross_kv(src_h)
        h = self._trunk(z0, tables.mods[0], tgt_mask, tgt_pad, cross_kv, src_pad)
        probs, expert = self._route(h, src_pooled, tables, B, routing, uniforms)
        flat_e = expert.reshape(-1)
        ex = flow.experts
        tiles = ops.expert_tiles(flat_e, ex.n_experts, h)
        if step_hook is not None:
            step_hook(0, z0)
        z = z0.reshape(B * L, d)
        for i in range(steps - 1):
            if i > 0:
                h = self._trunk(z.view(B, L, d), tables.mods[i], tgt_mask, tgt_pad, cross_kv,
                                src_pad)  # fmt: skip
            z = ops.routed_expert_euler(h, flat_e, ex.w1, ex.b1, ex.w2, ex.b2, z, tables.dts[i],
                                        tiles=tiles)  # fmt: skip
            if step_hook is not None:
                step_hook(i + 1, z.view(B, L, d))
        return SolveResult(z=z.view(B, L, d), expert=expert, gate_probs=probs)

    # ----------------------------------------------------------------------------- decoder
    def features(self, z: Tensor) -> Tensor:
        """The decoder's hidden state before lm_head: z [..., d] -> [N, d]."""
        dec = self.model.decoder
        d = self.cfg.d_model
        x = z.reshape(-1, d)
        blocks = dec.resi_blocks
        if not blocks:
            return x
        if self.linears == "fused":
            for blk in blocks:
                x = self._fused_ffn(blk.ff, x, self._norm(blk.norm))
            return x
        x, h = ops.add_layer_norm(x, None, blocks[0].norm.scale, blocks[0].norm.shift,
                                  eps=blocks[0].norm.eps)  # fmt: skip
        for j, blk in enumerate(blocks[:-1]):
            nxt = blocks[j + 1].norm
            f = self._ffn(blk.ff, h)
            x, h = ops.add_layer_norm(x, f, nxt.scale, nxt.shift, blk.ff.layers[2].bias, nxt.eps)
        return x + self._ffn(blocks[-1].ff, h, with_bias=True)

    def logits(self, z: Tensor) -> Tensor:
        """z [..., d] -> fp32 logits [N, V] (materialized: for the rows that sample)."""
        return self.model.decoder.lm_head(self.features(z)).float()

    def greedy(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, L, d] -> (argmax tokens [B, L] long, their probabilities [B, L] fp32), on the
        device (no host sync)."""
        head = self.model.decoder.lm_head
        res = ops.decoder_argmax(self.features(z), head.weight, head.bias)
        return res.token.view(z.shape[:-1]), res.prob.view(z.shape[:-1])
