"""The networks of the four paper scripts: one UNet in three flavours (plus, below, DiT and the KL-f8 autoencoder).

`UNet(arch=...)` expresses three published denoisers with one skeleton (input blocks, middle block, output blocks
with skip concatenation, as in guided-diffusion's UNetModel):

- `arch='ddpmpp'`: DDPM++ as re-implemented in EDM (Karras et al., "Elucidating the Design Space of Diffusion-Based
  Generative Models", NeurIPS 2022, App. F.2; NVlabs/edm training/networks.py `SongUNet`), used by Ambient Diffusion
  and the ambient scaling laws. Same maths, parameter count and initialisation as EDM; `gated=True` adds the gated
  convolutions of ambient-diffusion's networks.py.
- `arch='adm'`: the ADM UNet of Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021
  (openai/guided-diffusion unet.py), used by DDPM-IP. Its state_dict keys and shapes equal guided-diffusion's, so
  released guided-diffusion / DDPM-IP checkpoints load with `load_state_dict(strict=True)` (see `load_network`).
- `arch='ldm'`: the latent-diffusion UNet of Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
  Models", CVPR 2022 (CompVis/latent-diffusion openaimodel.py + attention.py): ADM residual blocks with spatial
  transformers (self-attention, cross-attention on a context, GEGLU feed-forward), used by ldm_labelnoise.py.

Usage:
    net = nets.UNet(**nets.UNET_PRESETS['ddpmpp-cifar10'])
    net = nets.UNet(**{**nets.UNET_PRESETS['ddpmpp-64'], 'in_channels': 6, 'out_channels': 6, 'gated': True})
    out = net(x, c_noise)                                   # ddpmpp: t is EDM's c_noise, (B,) float
    out = net(x, timesteps, class_labels=y)                 # adm: t is the original-scale timestep, (B,)
    out = net(x, timesteps, context=c)                      # ldm: c is (B, L, context_dim)
    net = nets.load_network('ADM_IP_015.pt')                # a released guided-diffusion / DDPM-IP / DiT checkpoint

All attention runs through F.scaled_dot_product_attention on (B, heads, L, d) tensors whose last dimension is
contiguous. The networks run in fp32 on CPU and under bf16 autocast with channels_last activations on GPU; the
noise-level embedding always runs in fp32, as in both official codes.
"""

import argparse
import collections
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import pickle
import re
import secrets
import struct
import threading
import types
import unicodedata
import urllib.parse

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# Building blocks shared by the three UNets


def timestep_embedding(t, dim, max_period=10000, endpoint=False, sin_first=False):
    """Sinusoidal embedding of a (B,) float tensor: [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / n),
    n = dim/2 (guided-diffusion, LDM) or dim/2 - 1 (`endpoint`, EDM's DDPM++, so f runs from 1 to 1/max_period).
    EDM's DDPM++ also swaps the halves to [sin, cos] (`sin_first`). Returns (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - int(endpoint)))
    args = t.float()[:, None] * freqs[None]                                  # (B, dim/2)
    parts = [args.sin(), args.cos()] if sin_first else [args.cos(), args.sin()]
    return torch.cat(parts, dim=1)                                           # (B, dim)


def group_norm(channels, eps=1e-5, min_group_size=1):
    """GroupNorm with 32 groups. EDM caps the number of groups at channels // 4 (min_group_size=4); guided-diffusion
    always uses 32. Under autocast, torch runs group_norm in fp32, like guided-diffusion's GroupNorm32."""
    return nn.GroupNorm(min(32, channels // min_group_size), channels, eps=eps)


def resample(x, mode):
    """Nearest-neighbour 2x upsampling ('up') or 2x2 average pooling ('down'). These are guided-diffusion's
    parameter-free Upsample/Downsample and exactly EDM's resampling with its DDPM++ filter [1, 1]."""
    if mode == 'up':
        return F.interpolate(x, scale_factor=2, mode='nearest')
    if mode == 'down':
        return F.avg_pool2d(x, 2)
    return x


def ambient_gate(gate_logits):
    """Ambient Diffusion's gate (ambient-diffusion training/networks.py Conv2d): the official code applies the
    sigmoid twice, so the gate lies in (0.5, 0.73); a gate weight near zero gives ~0.62."""
    return torch.sigmoid(torch.sigmoid(gate_logits))


class Conv2d(nn.Conv2d):
    """Same-padded nn.Conv2d. With `gated` (Ambient Diffusion) a second weight G, shaped like W, gates the output:
    conv(x, W) * ambient_gate(conv(x, G)) + b."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, gated=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
        self.gate_weight = nn.Parameter(torch.empty_like(self.weight)) if gated else None
        if gated:
            nn.init.kaiming_uniform_(self.gate_weight, a=math.sqrt(5))  # PyTorch's default, as for the weight

    def forward(self, x):
        if self.gate_weight is None:
            return super().forward(x)
        out = self._conv_forward(x, self.weight, None) * ambient_gate(self._conv_forward(x, self.gate_weight, None))
        return out + self.bias.to(out.dtype)[:, None, None]


class TokenConv1d(nn.Conv1d):
    """A 1x1 Conv1d, guided-diffusion's parameter shape for attention qkv / proj_out (so checkpoints load), applied
    as a linear map to (B, L, C) tokens: on channels_last activations the tokens are a free view. `gated` as in
    Conv2d (Ambient Diffusion gates the attention projections too)."""

    def __init__(self, in_channels, out_channels, gated=False):
        super().__init__(in_channels, out_channels, 1)
        self.gate_weight = nn.Parameter(torch.empty_like(self.weight)) if gated else None
        if gated:
            nn.init.kaiming_uniform_(self.gate_weight, a=math.sqrt(5))

    def forward(self, tokens):
        if self.gate_weight is None:
            return F.linear(tokens, self.weight[:, :, 0], self.bias)
        out = F.linear(tokens, self.weight[:, :, 0]) * ambient_gate(F.linear(tokens, self.gate_weight[:, :, 0]))
        return out + self.bias.to(out.dtype)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding (guided-diffusion ResBlock; the same maths as EDM's UNetBlock).

    h = conv(SiLU(GN(x))), resampled between the activation and the conv when up/down; then either
    h = GN(h + Linear(SiLU(emb))) (DDPM++, LDM) or FiLM h = GN(h) * (1 + scale) + shift (`use_scale_shift_norm`, ADM);
    then h = conv(dropout(SiLU(h))), the conv zero-initialised; out = (skip(x) + h) * skip_scale.
    DDPM++ uses skip_scale sqrt(1/2), GroupNorm eps 1e-6 with groups of >= 4 channels, and a 1x1 conv on the skip of
    up/down blocks (EDM's resample_proj). Keys: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection.
    """

    def __init__(self, in_channels, out_channels, emb_channels, dropout=0.0, up=False, down=False,
                 use_scale_shift_norm=False, skip_scale=1.0, eps=1e-5, min_group_size=1, project_skip=False,
                 gated=False):
        super().__init__()
        self.updown = 'up' if up else 'down' if down else None
        self.use_scale_shift_norm = use_scale_shift_norm
        self.skip_scale = skip_scale
        self.in_layers = nn.Sequential(
            group_norm(in_channels, eps, min_group_size), nn.SiLU(), Conv2d(in_channels, out_channels, 3, gated=gated))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, eps, min_group_size), nn.SiLU(), nn.Dropout(dropout),
            Conv2d(out_channels, out_channels, 3, gated=gated))
        if out_channels != in_channels or (project_skip and self.updown):
            self.skip_connection = Conv2d(in_channels, out_channels, 1, gated=gated)
        else:
            self.skip_connection = nn.Identity()

    def forward(self, x, emb):
        norm, act, conv = self.in_layers
        h = resample(act(norm(x)), self.updown)
        h = conv(h)                                                          # (B, C_out, H', W')
        x = resample(x, self.updown)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]               # (B, C_out or 2 C_out, 1, 1)
        norm, act, dropout, conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + e)
        h = conv(dropout(act(h)))
        out = self.skip_connection(x) + h
        return out if self.skip_scale == 1 else out * self.skip_scale


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels, added to the input (guided-diffusion AttentionBlock; EDM's
    attention inside UNetBlock for DDPM++, with its skip_scale and GroupNorm settings).

    The qkv channels are ordered [q | k | v] then heads (`use_new_attention_order`, guided-diffusion QKVAttention)
    or heads then [q | k | v] (QKVAttentionLegacy). Both orders have the same parameter shapes, so a checkpoint
    loaded with the wrong flag runs without error and gives garbage. EDM orders them per channel ([c, qkv]); for
    DDPM++ (one head, i.i.d. init) that is only a fixed relabelling of qkv's output rows, so we keep the layout whose
    q, k, v slices are contiguous for SDPA. The softmax scale is 1/sqrt(head_dim) in all three codes.
    """

    def __init__(self, channels, num_heads=1, use_new_attention_order=False, skip_scale=1.0, eps=1e-5,
                 min_group_size=1, gated=False):
        super().__init__()
        assert channels % num_heads == 0, f'{channels} channels do not split into {num_heads} heads'
        self.num_heads = num_heads
        self.use_new_attention_order = use_new_attention_order
        self.skip_scale = skip_scale
        self.norm = group_norm(channels, eps, min_group_size)
        self.qkv = TokenConv1d(channels, 3 * channels, gated=gated)
        self.proj_out = TokenConv1d(channels, channels, gated=gated)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                     # (B, L, C), L = H W
        qkv = self.qkv(tokens)                                               # (B, L, 3C)
        if self.use_new_attention_order:
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = qkv.unflatten(-1, (self.num_heads, 3, -1)).permute(3, 0, 2, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)                          # (B, heads, L, C / heads)
        a = self.proj_out(a.transpose(1, 2).flatten(2))                      # (B, L, C)
        out = x + a.transpose(1, 2).reshape(B, C, H, W)
        return out if self.skip_scale == 1 else out * self.skip_scale


class Downsample(nn.Module):
    """Strided 3x3 conv (guided-diffusion / LDM Downsample with conv_resample; key `op`)."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (guided-diffusion / LDM Upsample with conv_resample; key `conv`)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(resample(x, 'up'))


# ----------------------------------------------------------------------------------------------------------------------
# LDM spatial transformer (CompVis/latent-diffusion ldm/modules/attention.py; same key names)


class CrossAttention(nn.Module):
    """Multi-head attention of tokens x (B, L, dim) to a context (B, S, context_dim); self-attention without one.
    q/k/v have no bias; the heads split dim evenly (LDM's inner_dim = heads * dim_head = dim)."""

    def __init__(self, dim, num_heads, context_dim=None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))                     # LDM's to_out.1 is Dropout(p=0)

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = [proj(inp).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)   # (B, heads, L or S, d)
                   for proj, inp in ((self.to_q, x), (self.to_k, context), (self.to_v, context))]
        a = F.scaled_dot_product_attention(q, k, v)                          # (B, heads, L, d)
        return self.to_out(a.transpose(1, 2).flatten(2))                     # (B, L, dim)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): x W_a * GELU(x W_b)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x wider hidden layer (LDM FeedForward with glu=True)."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))  # net.1: Dropout(0)

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the context, GEGLU feed-forward
    (LDM BasicTransformerBlock)."""

    def __init__(self, dim, num_heads, context_dim=None):
        super().__init__()
        self.attn1 = CrossAttention(dim, num_heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, num_heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), 1x1 conv to tokens, transformer blocks, 1x1 conv back (zero-initialised), plus the input
    (LDM SpatialTransformer). LDM wraps it in fp16 autocast; here the caller's autocast applies."""

    def __init__(self, channels, num_heads, depth=1, context_dim=None):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, num_heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)            # (B, L, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))     # (B, C, H, W)


# ----------------------------------------------------------------------------------------------------------------------
# The UNet


class EmbedSequential(nn.Sequential):
    """nn.Sequential that hands the embedding to residual blocks and the context to spatial transformers
    (guided-diffusion's TimestepEmbedSequential)."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """DDPM++ (EDM SongUNet), ADM (guided-diffusion UNetModel) or LDM (latent-diffusion UNetModel), see the module
    docstring. Keyword names are shared across arches; the UNET_PRESETS hold the published configurations.

    Skeleton (all arches): input_blocks = [conv] + per level (num_blocks x [ResBlock (+ attention)] + a downsampler
    except at the last level); middle_block = [ResBlock, attention, ResBlock]; output_blocks = per level, deepest
    first, (num_blocks + 1) x [ResBlock on concat(h, skip) (+ attention)] + an upsampler after the last block except
    at level 0; out = [GroupNorm, SiLU, conv]. EDM's enc/dec order is the same sequence (its `in0`/`in1` blocks are
    the middle block; its `_up` block is our upsampler), with these differences, all reproduced:
    DDPM++'s first conv outputs model_channels (ADM: model_channels * channel_mult[0]); its decoder attends only in
    the last block of a level; its resamplers are ResBlocks (ADM/LDM: with resblock_updown, else strided conv /
    nearest + conv); its label and augmentation embeddings are added before the embedding MLP, ADM's label
    embedding after it.
    """

    def __init__(
        self,
        arch='ddpmpp',                  # 'ddpmpp' (EDM SongUNet), 'adm' (guided-diffusion) or 'ldm' (latent-diffusion)
        img_resolution=32,              # input height and width in pixels (or latent pixels)
        in_channels=3,                  # input channels (Ambient Diffusion: 6, the masked image and the mask)
        out_channels=3,                 # output channels (ADM with learned sigma: 2 x in_channels)
        model_channels=128,             # base width C
        channel_mult=(2, 2, 2),         # width multiplier per resolution level
        num_blocks=4,                   # residual blocks per level in the encoder (decoder: num_blocks + 1)
        attn_resolutions=(16,),         # resolutions, in pixels, with attention
        dropout=0.0,                    # dropout inside residual blocks
        label_dim=0,                    # number of classes, 0 = unconditional
        num_heads=1,                    # attention heads, used when num_head_channels is -1
        num_head_channels=-1,           # channels per attention head (guided-diffusion), -1 = use num_heads
        augment_dim=0,                  # ddpmpp/adm: dimension of EDM's augmentation labels (9), 0 = none
        label_dropout=0.0,              # ddpmpp: EDM's label dropout in training (zeroed one-hot rows)
        gated=False,                    # ddpmpp/adm: Ambient Diffusion's gated convolutions
        use_scale_shift_norm=False,     # adm/ldm: FiLM conditioning in residual blocks
        resblock_updown=False,          # adm/ldm: ResBlocks resample (else strided conv / nearest + conv)
        use_new_attention_order=False,  # adm: qkv channel order [q|k|v]-then-heads (else heads-then-[q|k|v])
        norm_min_group_size=1,          # adm/ldm: fewest channels per GroupNorm group (EDM's DhariwalUNet: 4)
        context_dim=None,               # ldm: width of the cross-attention context (None: self-attention only)
        transformer_depth=1,            # ldm: transformer blocks per spatial transformer
    ):
        config = dict(locals())  # the constructor arguments: UNet(**net.config) rebuilds the network
        config.pop('self'), config.pop('__class__', None)
        super().__init__()
        if arch not in ('ddpmpp', 'adm', 'ldm'):
            raise ValueError(f'arch must be ddpmpp, adm or ldm, not {arch!r}')
        if arch != 'ddpmpp' and label_dropout:
            raise ValueError('label_dropout is an option of arch="ddpmpp" (EDM)')
        if arch == 'ldm' and (augment_dim or gated):
            raise ValueError('augment_dim and gated are options of arch="ddpmpp" or "adm" (EDM, ambient-diffusion)')
        if arch != 'ldm' and context_dim is not None:
            raise ValueError('context_dim is an option of arch="ldm"')
        self.config = {**config, 'channel_mult': tuple(channel_mult), 'attn_resolutions': tuple(attn_resolutions)}
        self.arch = arch
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = 4 * model_channels
        # EDM's DDPM++ settings (SongUNet); guided-diffusion / LDM use the defaults of group_norm and the blocks.
        ddpmpp = arch == 'ddpmpp'
        norm_kwargs = dict(eps=1e-6, min_group_size=4) if ddpmpp else dict(min_group_size=norm_min_group_size)
        block_kwargs = dict(**norm_kwargs, skip_scale=math.sqrt(0.5) if ddpmpp else 1.0, gated=gated)

        def res_block(cin, cout, **updown):
            return ResBlock(cin, cout, emb_channels, dropout, use_scale_shift_norm=use_scale_shift_norm,
                            project_skip=ddpmpp, **updown, **block_kwargs)

        def attention(ch):
            heads = ch // num_head_channels if num_head_channels > 0 else num_heads
            if arch == 'ldm':
                return SpatialTransformer(ch, heads, transformer_depth, context_dim)
            return AttentionBlock(ch, heads, use_new_attention_order, **block_kwargs)

        def downsampler(ch):
            return res_block(ch, ch, down=True) if ddpmpp or resblock_updown else Downsample(ch)

        def upsampler(ch):
            return res_block(ch, ch, up=True) if ddpmpp or resblock_updown else Upsample(ch)

        # Embedding of the noise level (and of labels / augmentations): C -> 4C -> 4C (EDM map_layer0/1).
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.map_label = nn.Linear(label_dim, model_channels) if ddpmpp and label_dim else None
        self.map_augment = nn.Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.label_emb = nn.Embedding(label_dim, emb_channels) if not ddpmpp and label_dim else None

        # Encoder.
        ch = model_channels if ddpmpp else int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(Conv2d(in_channels, ch, 3, gated=gated))])
        skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if img_resolution >> level in attn_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(downsampler(ch)))
                skip_channels.append(ch)

        # Middle, at the lowest resolution, always with attention.
        self.middle_block = EmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        # Decoder.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if img_resolution >> level in attn_resolutions and (i == num_blocks or not ddpmpp):
                    layers.append(attention(ch))
                if level > 0 and i == num_blocks:
                    layers.append(upsampler(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        # Output head (EDM aux_norm / aux_conv).
        self.out = nn.Sequential(group_norm(ch, **norm_kwargs), nn.SiLU(), Conv2d(ch, out_channels, 3, gated=gated))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Initialise as the official code does. The last layer of every residual branch (and the output conv) is
        zero-initialised in guided-diffusion / LDM (zero_module), and scaled to 1e-5 of Xavier in EDM (init_zero),
        which is why DDPM++'s output is tiny but not zero at init. Everything else keeps PyTorch's default init
        (guided-diffusion, LDM) or becomes Xavier-uniform with zero biases, qkv with gain sqrt(0.2) (EDM)."""
        branch_outputs = {self.out[-1]}
        qkv_layers = set()
        for m in self.modules():
            if isinstance(m, ResBlock):
                branch_outputs.add(m.out_layers[-1])
            elif isinstance(m, AttentionBlock):
                branch_outputs.add(m.proj_out)
                qkv_layers.add(m.qkv)
            elif isinstance(m, SpatialTransformer):
                branch_outputs.add(m.proj_out)
        if self.arch != 'ddpmpp':
            for m in branch_outputs:
                m.weight.zero_()
                m.bias.zero_()
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                gain = 1e-5 if m in branch_outputs else math.sqrt(0.2) if m in qkv_layers else 1.0
                for weight in (m.weight, getattr(m, 'gate_weight', None)):
                    if weight is not None:
                        nn.init.xavier_uniform_(weight, gain=gain)
                if m.bias is not None:
                    m.bias.zero_()

    def embedding(self, t, class_labels=None, augment_labels=None):
        """The conditioning vector fed to every residual block, (B, 4C) in fp32, before the blocks' SiLU."""
        B = t.shape[0]
        if self.arch == 'ddpmpp':
            # EDM SongUNet mapping: [sin, cos] features of c_noise, plus label and augmentation projections, then the
            # MLP. A missing label is the zero vector, EDM's unconditional label (also what its label dropout makes);
            # missing augment labels are zeros, EDM's label of a non-augmented image, which adds exactly nothing but
            # keeps map_augment in the graph (DDP needs every parameter used).
            e = timestep_embedding(t, self.model_channels, endpoint=True, sin_first=True)   # (B, C)
            if self.map_label is not None:
                labels = self._one_hot(class_labels, B, t.device)
                if self.training and self.label_dropout:
                    labels = labels * (torch.rand([B, 1], device=t.device) >= self.label_dropout).to(labels.dtype)
                e = e + self.map_label(labels * math.sqrt(self.label_dim))
            if self.map_augment is not None:
                augment_labels = e.new_zeros(B, self.map_augment.in_features) if augment_labels is None \
                    else augment_labels.float()
                e = e + self.map_augment(augment_labels)
            return self.time_embed(e)
        # guided-diffusion / LDM: [cos, sin] features of the timestep, the MLP, then the class embedding.
        e = timestep_embedding(t, self.model_channels)                       # (B, C)
        if self.map_augment is not None:  # EDM's DhariwalUNet adds its augmentation labels before the MLP
            e = e + self.map_augment(e.new_zeros(B, self.map_augment.in_features) if augment_labels is None
                                     else augment_labels.float())
        emb = self.time_embed(e)                                             # (B, 4C)
        if self.label_emb is not None:
            if class_labels is None:
                raise ValueError('this network is class-conditional: pass class_labels')
            if class_labels.is_floating_point():  # (B, label_dim) one-hot or soft rows
                emb = emb + self._one_hot(class_labels, B, t.device) @ self.label_emb.weight
            else:
                emb = emb + self.label_emb(class_labels.reshape(-1))
        return emb

    def _one_hot(self, class_labels, batch_size, device):
        """(B,) int64 class ids or (B, label_dim) float one-hot rows -> (B, label_dim) float32; None -> zeros."""
        if class_labels is None:
            return torch.zeros(batch_size, self.label_dim, device=device)
        if not class_labels.is_floating_point():
            return F.one_hot(class_labels.reshape(-1), self.label_dim).float()
        return class_labels.float().reshape(-1, self.label_dim)

    def forward(self, x, t, class_labels=None, augment_labels=None, context=None):
        """x (B, in_channels, H, W); t (B,) (or one value for all): EDM's c_noise for ddpmpp, the timestep for
        adm/ldm; class_labels (B,) int64 or (B, label_dim) float; augment_labels (B, augment_dim);
        context (B, L, context_dim). Returns (B, out_channels, H, W)."""
        # Both official codes keep the embedding MLP in fp32 (EDM passes fp32 c_noise, guided-diffusion never
        # converts time_embed to fp16), so autocast is switched off for it.
        t = torch.as_tensor(t, device=x.device).reshape(-1).float().expand(x.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            emb = self.embedding(t, class_labels, augment_labels)                   # (B, 4C)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)                                                   # (B, out_channels, H, W)


# ----------------------------------------------------------------------------------------------------------------------
# Presets: the published configurations, all with the same keyword names


UNET_PRESETS = {
    # EDM DDPM++ for CIFAR-10 (NVlabs/edm train.py --arch=ddpmpp, --augment 0.12 gives augment_dim 9): 55,733,891
    # parameters. Also the ambient laws' network; Ambient Diffusion's own CIFAR setting has no published command.
    'ddpmpp-cifar10': dict(arch='ddpmpp', img_resolution=32, in_channels=3, out_channels=3, model_channels=128,
                           channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13, label_dim=0,
                           augment_dim=9),
    # EDM DDPM++ at 64x64 (--cres=1,2,2,2, FFHQ/AFHQv2-64), as in ambient-diffusion's CelebA README command
    # (dropout 0.1, augment 0.15): 61,805,571 parameters with 3 channels.
    'ddpmpp-64': dict(arch='ddpmpp', img_resolution=64, in_channels=3, out_channels=3, model_channels=128,
                      channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.1, label_dim=0,
                      augment_dim=9),
    # DDPM-IP (forever208/DDPM-IP README commands; guided-diffusion ADM with learned sigma, hence 6 output channels).
    'adm-cifar10': dict(arch='adm', img_resolution=32, in_channels=3, out_channels=6, model_channels=128,
                        channel_mult=(1, 2, 2, 2), num_blocks=3, attn_resolutions=(16, 8), dropout=0.3,
                        label_dim=0, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
                        use_new_attention_order=True),
    'adm-imagenet32': dict(arch='adm', img_resolution=32, in_channels=3, out_channels=6, model_channels=128,
                           channel_mult=(1, 2, 2, 2), num_blocks=3, attn_resolutions=(16, 8), dropout=0.3,
                           label_dim=0, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
                           use_new_attention_order=True),  # README: dropout 0.3, "you can also choose 0.1"
    'adm-lsun64': dict(arch='adm', img_resolution=64, in_channels=3, out_channels=6, model_channels=192,
                       channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.1,
                       label_dim=0, num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                       use_new_attention_order=True),
    'adm-celeba64': dict(arch='adm', img_resolution=64, in_channels=3, out_channels=6, model_channels=192,
                         channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.1,
                         label_dim=0, num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                         use_new_attention_order=True),
    'adm-ffhq128': dict(arch='adm', img_resolution=128, in_channels=3, out_channels=6, model_channels=256,
                        channel_mult=(1, 1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.1,
                        label_dim=0, num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                        use_new_attention_order=True),
    # LDM-4 of the label-noise paper (Chen et al. 2024, App. B.3 Table 3 = latent-diffusion cin256-v2.yaml): 64x64x3
    # VQ-f4 latents, attention (one head) at latent resolutions 32, 16, 8; the class embedding (or BERT for CC3M)
    # is the cross-attention context.
    'ldm-cin256': dict(arch='ldm', img_resolution=64, in_channels=3, out_channels=3, model_channels=192,
                       channel_mult=(1, 2, 3, 5), num_blocks=2, attn_resolutions=(32, 16, 8), dropout=0.0,
                       label_dim=0, num_heads=1, context_dim=512, transformer_depth=1),
    'ldm-cc3m': dict(arch='ldm', img_resolution=64, in_channels=3, out_channels=3, model_channels=192,
                     channel_mult=(1, 2, 3, 5), num_blocks=2, attn_resolutions=(32, 16, 8), dropout=0.0,
                     label_dim=0, num_heads=1, context_dim=768, transformer_depth=1),
    # Small versions of the three for CPU runs and tests.
    'tiny': dict(arch='ddpmpp', img_resolution=32, in_channels=3, out_channels=3, model_channels=32,
                 channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16,), dropout=0.0, label_dim=0,
                 augment_dim=0),
    'tiny-adm': dict(arch='adm', img_resolution=32, in_channels=3, out_channels=6, model_channels=32,
                     channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16,), dropout=0.0, label_dim=0,
                     num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
                     use_new_attention_order=True),
    'tiny-ldm': dict(arch='ldm', img_resolution=32, in_channels=3, out_channels=3, model_channels=32,
                     channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16, 8), dropout=0.0, label_dim=0,
                     num_heads=1, context_dim=32, transformer_depth=1),
}


# ----------------------------------------------------------------------------------------------------------------------
# Loading released checkpoints


# guided-diffusion's default channel_mult per image size (script_util.py; DDPM-IP adds 32), used to guess the size.
_ADM_RESOLUTION_BY_CHANNEL_MULT = {(1, 2, 2, 2): 32, (1, 2, 3, 4): 64, (1, 1, 2, 3, 4): 128, (1, 1, 2, 2, 4, 4): 256,
                                   (0.5, 1, 1, 2, 2, 4, 4): 512}


def adm_config_from_state_dict(state_dict, **overrides):
    """UNet kwargs (arch='adm') for a guided-diffusion-layout state dict, inferred from its keys and shapes: widths,
    channel_mult, num_blocks, attention levels, scale-shift norm, resblock up/down, classes, in/out channels.

    Not inferable from shapes, hence defaults that `overrides` replace: img_resolution (guessed from channel_mult
    with guided-diffusion's defaults table, else 64; it only sets attn_resolutions, since the net is convolutional),
    num_head_channels (DDPM-IP: 32 at 32x32, else 64) and use_new_attention_order (DDPM-IP and guided-diffusion
    64x64: True). Guided-diffusion's 128x128 models need num_heads=4, num_head_channels=-1,
    use_new_attention_order=False; its 256/512 models use_new_attention_order=False.
    """
    keys = set(state_dict)
    C = state_dict['time_embed.0.weight'].shape[1]
    num_outputs = 1 + max(int(k.split('.')[1]) for k in keys if k.startswith('output_blocks.'))

    def has_upsampler(i):  # a second ResBlock (resblock_updown) or an Upsample conv after the first layer
        return any(re.fullmatch(rf'output_blocks\.{i}\.[12]\.(in_layers\.0|conv)\.weight', k) for k in keys)

    up_blocks = [i for i in range(num_outputs) if has_upsampler(i)]
    num_blocks = up_blocks[0] if up_blocks else num_outputs - 1
    num_levels = num_outputs // (num_blocks + 1)
    first_of_level = [1 + level * (num_blocks + 1) for level in range(num_levels)]   # input_blocks index
    widths = [state_dict[f'input_blocks.{i}.0.out_layers.3.weight'].shape[0] for i in first_of_level]
    channel_mult = tuple(w // C if w % C == 0 else w / C for w in widths)
    img_resolution = overrides.get('img_resolution', _ADM_RESOLUTION_BY_CHANNEL_MULT.get(channel_mult, 64))
    config = dict(
        arch='adm', img_resolution=img_resolution,
        in_channels=state_dict['input_blocks.0.0.weight'].shape[1],
        out_channels=state_dict['out.2.weight'].shape[0],
        model_channels=C, channel_mult=channel_mult, num_blocks=num_blocks,
        attn_resolutions=tuple(img_resolution >> level for level, i in enumerate(first_of_level)
                               if f'input_blocks.{i}.1.qkv.weight' in keys),
        dropout=0.0,
        label_dim=state_dict['label_emb.weight'].shape[0] if 'label_emb.weight' in keys else 0,
        num_head_channels=32 if img_resolution == 32 else 64,
        use_scale_shift_norm=state_dict['input_blocks.1.0.emb_layers.1.weight'].shape[0] == 2 * widths[0],
        resblock_updown=f'input_blocks.{num_blocks + 1}.0.op.weight' not in keys,
        use_new_attention_order=True,
    )
    return {**config, **overrides}


# ----------------------------------------------------------------------------------------------------------------------
# Weight files: a safetensors reader and writer, torch pickles, downloads into a cache

SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'F8_E4M3': torch.float8_e4m3fn, 'F8_E5M2': torch.float8_e5m2,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool,
}


class WeightsNotFoundError(RuntimeError):
    """Weights neither on disk nor downloadable; the one-line message names the file and where to put it."""


def load_safetensors(path):
    """Read a .safetensors file into a dict of CPU tensors, without the safetensors package.

    The format (huggingface/safetensors): an unsigned 64-bit little-endian header length N, then N bytes of JSON that
    map each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets counted from the end of the
    header) plus an optional "__metadata__" entry (skipped), then the raw little-endian tensor bytes.
    """
    with open(path, 'rb') as f:
        data = f.read()

    def invalid(why):
        return ValueError(f'{path} is not a valid safetensors file: {why}')

    # Parse the header.
    if len(data) < 8:
        raise invalid('shorter than the 8-byte header length')
    header_len = struct.unpack('<Q', data[:8])[0]
    if 8 + header_len > len(data):
        raise invalid(f'header length {header_len} runs past the end of the file (truncated?)')
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise invalid(f'header is not JSON ({" ".join(str(error).split())[:120] or type(error).__name__})') from None
    if not isinstance(header, dict):
        raise invalid('header is not a JSON object')

    # Copy each tensor out of the byte buffer (a copy is aligned, whatever the offsets).
    buffer = np.frombuffer(data, dtype=np.uint8, offset=8 + header_len)
    tensors = {}
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry['dtype']]
            shape, offsets = list(entry['shape']), list(entry['data_offsets'])
            if len(offsets) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                            for n in shape + offsets):
                raise ValueError(f'shape {shape} and data_offsets {offsets} must be non-negative integers')
            begin, end = offsets
        except (KeyError, TypeError, ValueError) as error:
            raise invalid(f'bad header entry for {name!r} ({error})') from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(buffer) or end - begin != nbytes:
            raise invalid(f'{name!r} needs {nbytes} bytes but has data_offsets [{begin}, {end}) in a data section '
                          f'of {len(buffer)} bytes (truncated?)')
        raw = torch.from_numpy(buffer[begin:end].copy())
        tensors[name] = raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return tensors


def save_safetensors(path, tensors, metadata=None):
    """Write a dict of tensors as a .safetensors file (atomically), readable by load_safetensors and the HF library."""
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {'dtype': dtype_names[tensor.dtype], 'shape': list(tensor.shape),
                        'data_offsets': [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header['__metadata__'] = {str(key): str(value) for key, value in metadata.items()}
    header_bytes = json.dumps(header, separators=(',', ':')).encode()
    header_bytes += b' ' * (-len(header_bytes) % 8)  # the data starts 8-byte aligned, as the reference writer does
    write_atomic(path, [struct.pack('<Q', len(header_bytes)), header_bytes, *chunks])


def write_atomic(path, data):
    """Write a file so that `path` is never left half-written: the bytes go to a temporary file with a unique name
    (`.{name}.{pid}.{random}.tmp`) in the same folder, which is renamed over `path` (os.replace) once complete and
    removed on any failure. data: bytes, an iterable of byte chunks, or a callable that writes into the binary file
    object it is given (e.g. `lambda f: torch.save(obj, f)`)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp_path = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        with open(temp_path, 'xb') as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            elif callable(data):
                data(f)
            else:
                for chunk in data:
                    f.write(chunk)
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp_path)
        raise


def load_weights_file(path):
    """Load a .safetensors file, or a torch pickle (.pt / .pth / .bin / .ckpt) with weights_only=True, onto the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f'weights file not found: {path}')
    if path.endswith('.safetensors'):
        return load_safetensors(path)
    torch.serialization.add_safe_globals([argparse.Namespace])  # DiT's training checkpoints pickle their 'args'
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, MemoryError, OverflowError) as error:
        found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(error))
        if found:  # weights_only refuses to build arbitrary objects, whose unpickling could run code
            raise ValueError(f'{path} pickles a {found[1]} object, which is not loaded for safety; save its state '
                             'dict alone and load that') from None
        reason = ' '.join(str(error).split())[:200] or 'no reason given'
        raise ValueError(f'{path} is not a readable torch file ({type(error).__name__}: {reason})') from None
    check_tensor_sizes(data, path)
    return data


def check_tensor_sizes(data, what):
    """Refuse tensors that claim more elements than the bytes behind them: a stride-0 or overlapping view (e.g. shape
    (10**5, 10**5) over one float) costs nothing to load but its full size the moment it is copied or cast. Each
    tensor must fit inside its own storage without overlap, and all tensors together may hold at most four times the
    bytes of their distinct storages (tied weights share a storage). Walks dicts, lists and tuples."""
    tensors, stack, seen = [], [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > 10_000_000:
            raise ValueError(f'{what}: more than 10,000,000 objects in a weights file')
        if isinstance(item, torch.Tensor):
            tensors.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    storages, total = {}, 0
    for tensor in tensors:
        if tensor.is_meta:  # shapes only (never read from a file): nothing to check
            continue
        if tensor.layout != torch.strided:
            raise ValueError(f'{what}: a {tensor.layout} tensor is not plain weights')
        storage = tensor.untyped_storage()
        size = tensor.numel() * tensor.element_size()
        if tensor.numel() > 1:
            # Non-overlapping: sorted by stride, each stride at least the span of the dimensions inside it.
            span = 1
            for stride, dim_size in sorted((abs(st), s) for s, st in zip(tensor.shape, tensor.stride()) if s > 1):
                if stride < span:
                    raise ValueError(f'{what}: a tensor of shape {tuple(tensor.shape)} with strides '
                                     f'{tensor.stride()} overlaps itself (stride-0 or overlapping view)')
                span = stride * dim_size
        end = (tensor.storage_offset() + sum((s - 1) * st for s, st in zip(tensor.shape, tensor.stride())
                                             if s > 0) + 1) * tensor.element_size() if tensor.numel() else 0
        if tensor.numel() and (end > storage.nbytes() or size > storage.nbytes()):
            raise ValueError(f'{what}: a tensor of shape {tuple(tensor.shape)} needs {size} bytes but its storage '
                             f'holds {storage.nbytes()}')
        storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
        total += size
    if total > 4 * sum(storages.values()) + (1 << 20):
        raise ValueError(f'{what}: its tensors hold {total} bytes, more than four times the {sum(storages.values())} '
                         'bytes stored (views repeating the same data)')


def build_checked(make, state_dict, what):
    """make() built on the meta device (no memory), checked against state_dict, then given its tensors.

    Every key of the network must be in state_dict and vice versa, with the same shape; the first mismatch raises a
    one-line ValueError naming `what` and the key. Floating tensors are cast to the network's dtype. Nothing is
    allocated from sizes written in a file: the network's tensors are the state dict's own (load_state_dict with
    assign=True). Returns the network (train mode; call .eval() as needed)."""
    with torch.device('meta'):
        try:
            net = make()
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError, RuntimeError) as error:
            reason = ' '.join(str(error).split())[:200] or type(error).__name__
            raise ValueError(f'{what}: cannot build the network it describes ({reason})') from None
    expected = net.state_dict()
    for key, reference in expected.items():
        if key not in state_dict:
            raise ValueError(f'{what}: no tensor {key} (the network it describes has {len(expected)} tensors, '
                             f'the file {len(state_dict)})')
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f'{what}: {key} is a {type(tensor).__name__}, not a tensor')
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(f'{what}: {key} has shape {tuple(tensor.shape)}, the network needs '
                             f'{tuple(reference.shape)}')
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        raise ValueError(f'{what}: unexpected tensor {unexpected[0]} (not in the network it describes)')
    check_tensor_sizes(dict(state_dict), what)
    tensors = {key: state_dict[key].to(reference.dtype)
               if state_dict[key].is_floating_point() and reference.is_floating_point() else state_dict[key]
               for key, reference in expected.items()}
    net.load_state_dict(tensors, strict=True, assign=True)
    return net


def default_cache_dir():
    """Where downloaded weights are kept: $CORRUPTED_DIFFUSION_CACHE, else ~/.cache/corrupted-diffusion."""
    default = os.path.join(os.path.expanduser('~'), '.cache', 'corrupted-diffusion')
    return os.environ.get('CORRUPTED_DIFFUSION_CACHE') or default


def download_cached(url, cache_dir=None, path=None, validate=None):
    """Return the path of a cached copy of url, downloading it on first use with download_file (atomic, resumable,
    size- and format-checked). The default path is keyed on the whole URL (scheme, host, port, path and query):
    `{cache_dir}/url/{first 16 hex digits of its SHA-256}/{its file name}`, so that the same path on two hosts are
    two files. validate: see download_file."""
    if path is None:
        name = re.sub(r'[^A-Za-z0-9._-]+', '_', urllib.parse.urlsplit(url).path.rstrip('/').rsplit('/', 1)[-1])
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        path = os.path.join(cache_dir or default_cache_dir(), 'url', digest, name.strip('.') or 'download')
    if not os.path.isfile(path):
        download_file(url, path, validate=validate)
    return path


# A download must bring at least DOWNLOAD_STALL_MIN_BYTES in every DOWNLOAD_STALL_WINDOW_S seconds, and end within
# DOWNLOAD_DEADLINE_S seconds, else it stops (keeping its .part to resume): a server that drips a byte at a time
# never trips requests' per-read timeout.
DOWNLOAD_STALL_WINDOW_S = 60.0
DOWNLOAD_STALL_MIN_BYTES = 64 << 10
DOWNLOAD_DEADLINE_S = 6 * 3600.0


def _pickle_check(path):
    """The file is one whole pickle: its opcodes parse up to STOP (pickletools.genops; nothing is built or run)."""
    import pickletools
    with open(path, 'rb') as f:
        last = None
        for last, _, _ in pickletools.genops(f):
            pass
    if last is None or last.name != 'STOP':
        raise ValueError('the pickle does not end with STOP')


def _zip_check(path):
    import zipfile
    with zipfile.ZipFile(path) as archive:
        if not archive.infolist():
            raise ValueError('an empty zip')


def _torch_file_check(path):
    import zipfile
    if zipfile.is_zipfile(path):
        _zip_check(path)
    else:
        _pickle_check(path)  # the legacy format starts with pickles; a truncated one fails here


def _gzip_check(path):
    import gzip
    with gzip.open(path, 'rb') as f:
        while f.read(1 << 20):
            pass


def _text_check(path):
    with open(path, 'rb') as f:
        f.read().decode('utf-8')


def _json_check(path):
    with open(path, encoding='utf-8') as f:
        json.load(f)


def _safetensors_check(path):
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError('shorter than the 8-byte header length')
        header_len = struct.unpack('<Q', head)[0]
        if header_len > os.path.getsize(path) - 8:
            raise ValueError('the header runs past the end of the file')
        header = json.loads(f.read(header_len))
    end = max([int(entry['data_offsets'][1]) for name, entry in header.items() if name != '__metadata__'] or [0])
    if 8 + header_len + end != os.path.getsize(path):
        raise ValueError(f'the header describes {end} data bytes, the file holds '
                         f'{os.path.getsize(path) - 8 - header_len}')


# What a downloaded file must parse as, by the suffix of the name it is saved under.
FORMAT_CHECKS = {'.pkl': _pickle_check, '.pt': _torch_file_check, '.pth': _torch_file_check,
                 '.bin': _torch_file_check, '.ckpt': _torch_file_check, '.safetensors': _safetensors_check,
                 '.json': _json_check, '.npz': _zip_check, '.zip': _zip_check, '.gz': _gzip_check,
                 '.tgz': _gzip_check, '.txt': _text_check, '.yaml': _text_check, '.yml': _text_check}


def format_check(path):
    """The check FORMAT_CHECKS gives the file name's suffix, or None."""
    return FORMAT_CHECKS.get(os.path.splitext(os.fspath(path))[1].lower())


def download_file(url, path, headers=None, validate=None):
    """GET url into path with requests: atomic, resumable, size- and format-checked, with a deadline.

    The bytes go to `path + '.part'` and are renamed to path only once complete: their count equals the size the
    server announced (Content-Length, or the total of Content-Range), and the file passes validate(part_path) (a
    callable that raises on a bad file; default: format_check(path), e.g. a .pkl must be a whole pickle, a .json
    JSON, a .safetensors as long as its header says). A body without a length, or with a Content-Encoding, counts
    as complete only through that check, so without one (an unknown suffix and no validate) it is refused. So path
    is never a partial or wrong file (an HTML login page is no pickle). A `.part` left by an interrupted download is
    resumed with a Range request (a server that ignores Range sends the whole file, which replaces the partial one).
    A download that stalls (DOWNLOAD_STALL_*) or passes DOWNLOAD_DEADLINE_S stops. Processes downloading the same
    file at once (torchrun ranks) take turns through a lock on the .part file. Failure (offline, HTTP error,
    interrupted, stalled, wrong size or format) raises WeightsNotFoundError with one line naming the URL and the path
    to save it at by hand; an interrupted download keeps its .part for the next call to resume.
    """
    part = path + '.part'
    reason = 'the server keeps changing the partial file'
    check = validate or format_check(path)
    try:
        for _ in range(3):  # a retry only when another process wrote to the .part between our request and our lock
            offset = _size_or_zero(part)
            range_header = {'Range': f'bytes={offset}-'} if offset else {}
            with requests.get(url, headers={**(headers or {}), **range_header}, stream=True, timeout=30) as response:
                if response.status_code == 416:  # the partial file is not a prefix of this file: start again
                    _remove_if_present(part)
                    continue
                response.raise_for_status()
                resumed = offset > 0 and response.status_code == 206
                total = _announced_size(response, offset if resumed else 0)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(part, 'ab') as f:
                    locked = _lock_file(f)
                    if os.path.isfile(path):  # another process finished it while we waited for the lock
                        if f.seek(0, os.SEEK_END) == 0:  # the empty .part our open() made after its rename
                            _remove_if_present(part)
                        return path
                    if f.seek(0, os.SEEK_END) != offset:
                        continue
                    if not resumed:
                        f.truncate(0)
                    for chunk in _received_chunks(response):
                        f.write(chunk)
                    f.flush()
                    size = f.tell()
                    whole = size == total if total is not None else check is not None
                    problem = None
                    if whole and check is not None:
                        try:
                            check(part)
                        except Exception as error:  # noqa: BLE001 -- any failure of the check means "not that file"
                            problem = ' '.join(str(error).split())[:160] or type(error).__name__
                            whole = False
                    if whole and locked:  # rename under the lock, so that a process waiting for it finds the file
                        os.replace(part, path)
            if not whole:
                if problem is not None:
                    _remove_if_present(part)
                    reason = (f'got {size} bytes that are not a valid {os.path.splitext(path)[1] or "expected"} '
                              f'file: {problem}')
                elif total is None:
                    reason = f'got {size} bytes with no size announced and no format to check them against'
                    _remove_if_present(part)
                else:
                    if size > total:  # more than announced: the partial file belongs to another version
                        _remove_if_present(part)
                    reason = f'got {size} bytes, the server announced {total}'
                break
            if not locked:
                os.replace(part, path)
            return path
    except (requests.RequestException, OSError) as error:
        response = getattr(error, 'response', None)
        reason = f'HTTP {response.status_code}' if response is not None else \
            (str(error) if isinstance(error, _DownloadStalled) else type(error).__name__)
        if os.path.isfile(part):
            reason += f', {os.path.getsize(part)} bytes kept in {os.path.basename(part)} to resume'
    raise WeightsNotFoundError(f'cannot download {url} ({reason}); download it by hand and save it as {path}')


class _DownloadStalled(requests.RequestException):
    """The transfer broke the stall or deadline rule."""


def _announced_size(response, offset):
    """The full file size a response announces: the total of Content-Range ('bytes a-b/total'), else offset plus
    Content-Length; None when the server says neither (then only the transfer itself is trusted)."""
    content_range = response.headers.get('Content-Range', '')
    if offset and re.fullmatch(rf'bytes {offset}-\d+/\d+', content_range):
        return int(content_range.rsplit('/', 1)[1])
    if offset:
        raise requests.RequestException(f'Content-Range {content_range!r} does not start at byte {offset}')
    length = response.headers.get('Content-Length')
    return int(length) if length and 'Content-Encoding' not in response.headers else None


def _received_chunks(response):
    """The body of a streamed response as it arrives (read1), so that the bytes before a dropped connection reach
    the .part file; urllib3's errors become requests.ConnectionError."""
    import time
    import urllib3  # installed with requests
    start = window_start = time.monotonic()
    window_bytes = 0
    try:
        while chunk := response.raw.read1(1 << 20, decode_content=True):
            yield chunk
            now = time.monotonic()
            window_bytes += len(chunk)
            if now - start > DOWNLOAD_DEADLINE_S:
                raise _DownloadStalled(f'not done after {DOWNLOAD_DEADLINE_S:g} s')
            if now - window_start >= DOWNLOAD_STALL_WINDOW_S:
                if window_bytes < DOWNLOAD_STALL_MIN_BYTES:
                    raise _DownloadStalled(f'stalled: {window_bytes} bytes in {now - window_start:.0f} s')
                window_start, window_bytes = now, 0
    except urllib3.exceptions.HTTPError as error:
        raise requests.ConnectionError(error) from None


def _lock_file(f):
    """Block until this process holds an exclusive lock on the open file f; False where there is no flock
    (not POSIX), which then only loses the protection against simultaneous downloads."""
    try:
        import fcntl
    except ImportError:
        return False
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return True


def _size_or_zero(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _remove_if_present(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


HF_REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')  # owner/name on the Hugging Face Hub
LOCAL_SUFFIXES = ('.pkl', '.pt', '.pth', '.bin', '.ckpt', '.safetensors', '.json', '.npz', '.zip')


def _hf_cache_root(cache_dir=None):
    """{cache}/hf: Hub files are keyed on repository, revision and file name, whatever HF_ENDPOINT served them (a
    mirror serves the same files; the tests switch endpoints to go offline)."""
    return os.path.join(cache_dir or default_cache_dir(), 'hf')


def hf_hub_download(repo_id, filename, revision='main', cache_dir=None):
    """Download one file of a Hugging Face Hub repository with requests and return its local path.

    GETs `{HF_ENDPOINT}/{repo_id}/resolve/{revision}/{filename}` (HF_ENDPOINT defaults to https://huggingface.co; the
    tests point it at a local server; HF_TOKEN, when set, is sent for gated repositories) into
    `{cache_dir}/hf/{repo_id}/{revision}/{filename}` (cache_dir: default_cache_dir()). The copy is reused from then on;
    the download is atomic, resumable and size-checked (download_file).
    """
    if not HF_REPO_ID.fullmatch(repo_id) or '..' in f'{repo_id}/{revision}/{filename}'.split('/'):
        raise ValueError(f'not a Hugging Face repository and file name: {repo_id!r}, {revision!r}, {filename!r}')
    endpoint = (os.environ.get('HF_ENDPOINT') or 'https://huggingface.co').rstrip('/')
    url = f'{endpoint}/{repo_id}/resolve/{urllib.parse.quote(revision, safe="")}/{urllib.parse.quote(filename)}'
    path = os.path.join(_hf_cache_root(cache_dir), *repo_id.split('/'), revision, *filename.split('/'))
    headers = {'Authorization': f'Bearer {os.environ["HF_TOKEN"]}'} if os.environ.get('HF_TOKEN') else None
    if not os.path.isfile(path):
        download_file(url, path, headers)
    return path


def cached_file_hint(message, source, path):
    """message, plus (when `source` is a URL or Hub id that was cached at `path`) the cached file's name and that
    deleting it makes the next run download it again."""
    source = os.fspath(source)
    if os.path.exists(source) or os.path.abspath(source) == os.path.abspath(path):
        return message
    return f'{message} (cached copy of {source} at {path}: delete it to download it again)'


def resolve_source(source, filenames=(), cache_dir=None):
    """A local file or folder for `source`: a local path (returned as is), an http(s) URL (downloaded into the
    cache, the file's path returned), or a Hugging Face repository, `hf://owner/name[@revision][/sub/folder]` or a
    bare `owner/name` that is not a local path: then each of `filenames` (relative to the sub-folder; a tuple in the
    list means "the first of these that exists") is downloaded with hf_hub_download, and the local folder that holds
    them is returned. A missing local file raises WeightsNotFoundError."""
    source = os.fspath(source)
    if os.path.exists(source):
        return source
    if source.startswith(('http://', 'https://')):
        return download_cached(source, cache_dir)
    spec = source[len('hf://'):] if source.startswith('hf://') else source
    repo_match = re.fullmatch(r'([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([\w.-]+))?(?:/(.+?))?/?', spec)
    looks_local = not source.startswith('hf://') and (source.endswith(LOCAL_SUFFIXES) or spec.count('/') != 1)
    if repo_match is None or looks_local:
        raise WeightsNotFoundError(f'{source}: no such file or folder (nor an http(s) URL or Hugging Face repo id)')
    repo_id, revision, sub = repo_match[1], repo_match[2] or 'main', repo_match[3] or ''
    folder = os.path.join(_hf_cache_root(cache_dir), *repo_id.split('/'), revision, *sub.split('/'))
    for names in filenames:
        names = (names,) if isinstance(names, str) else tuple(names)
        for i, name in enumerate(names):
            try:
                hf_hub_download(repo_id, f'{sub}/{name}' if sub else name, revision, cache_dir)
                break
            except WeightsNotFoundError as error:  # try the next alternative only when this one is absent (404)
                if i == len(names) - 1 or '(HTTP 404' not in str(error):
                    prefix = '' if source.startswith('hf://') else f'{source} is no local path; as a Hub repo: '
                    raise WeightsNotFoundError(prefix + str(error)) from None
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# DiT: a ViT over latent patches, conditioned on timestep + class through adaLN-Zero (Peebles & Xie, Sec. 3.2)

def dit_modulate(x, shift, scale):
    """adaLN: shift and scale the normalised tokens x (B, T, D) with per-sample (B, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def dit_timestep_embedding(t, dim=256, max_period=10000, freq_shift=0):
    """Sinusoidal embedding (B,) -> (B, dim) of (possibly fractional) timesteps: [cos | sin] at frequencies
    max_period**(-i / (dim / 2 - freq_shift)), i = 0 .. dim/2 - 1 (DiT models.py, from GLIDE: freq_shift 0;
    diffusers' DiT embeds with Timesteps(downscale_freq_shift=1), so its lowest frequency is 1/max_period)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def dit_pos_embed(hidden_size, grid_size):
    """Fixed 2-D sin-cos position embedding (MAE) of a grid_size x grid_size token grid, (grid_size**2, hidden_size).

    Tokens are row-major. The first half of the channels encodes the token's column, the second half its row (DiT's
    meshgrid puts the w axis first); each half is [sin | cos] of the coordinate times 10000**(-i / (hidden_size / 4)).
    """
    omega = 1.0 / 10000 ** (torch.arange(hidden_size // 4, dtype=torch.float64) / (hidden_size / 4))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing='ij')  # (h, w) each

    def embed_1d(position):  # (T,) -> (T, D/2)
        angles = position.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([embed_1d(col), embed_1d(row)], dim=1).float()  # (T, D)


class DiTPatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens, (B, C, H, W) -> (B, H*W/p**2, D) row-major (timm PatchEmbed keys)."""

    def __init__(self, in_channels, hidden_size, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DiTTimestepEmbedder(nn.Module):
    """Timestep -> 256-d sinusoid -> Linear-SiLU-Linear -> (B, D)."""

    def __init__(self, hidden_size, frequency_embedding_size=256, freq_shift=0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(dit_timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift))


class DiTLabelEmbedder(nn.Module):
    """Class-label table. With class_dropout_prob > 0 it has one extra row, id num_classes, the null label of
    classifier-free guidance; unlike DiT's LabelEmbedder it never drops labels itself (the training loop does)."""

    def __init__(self, num_classes, hidden_size, class_dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class DiTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm Attention: rows of qkv are [q; k; v], heads
    contiguous within each), computed with scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                       # (B, H, T, D/H) each
        x = F.scaled_dot_product_attention(q, k, v)                                # softmax(q k^T / sqrt(D/H)) v
        return self.proj(x.transpose(1, 2).reshape(B, T, D))                      # (B, T, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: c regresses shift/scale of both LayerNorms and a gate on both residual
    branches; the gates start at zero, so every block starts as the identity (DiT paper Sec. 3.2)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, mlp_norm_eps=1e-6):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = nn.Sequential(collections.OrderedDict(  # timm Mlp's keys
            fc1=nn.Linear(hidden_size, mlp_hidden),
            act=nn.GELU(approximate='tanh'),
            fc2=nn.Linear(mlp_hidden, hidden_size)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(dit_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(dit_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiTFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its p x p x out_channels patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(dit_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer (facebookresearch/DiT models.py), predicting eps and, with learn_sigma, the
    interpolation v of the log-variance (IDDPM) as out_channels = 2 * in_channels.

    forward(x, t, y, embedding_noise=None): x (B, in_channels, input_size, input_size), t (B,) timesteps (integer
    indices, also under respacing), y (B,) int64 in [0, num_classes] where num_classes is the null label,
    embedding_noise (B, hidden_size) added to the label embedding before it joins the timestep embedding (CEP);
    embedding_hook, a function (B, hidden_size) -> (B, hidden_size), applied to the label embedding at that point.
    timestep_freq_shift=1 and mlp_norm_eps=1e-5 (diffusers' norm_eps) give diffusers' DiT function
    (DiTTransformer2DModel, see dit_from_diffusers); the defaults are facebookresearch/DiT's.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, timestep_freq_shift=0,
                 mlp_norm_eps=1e-6):
        super().__init__()
        if input_size % patch_size or hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f'DiT needs input_size ({input_size}) divisible by patch_size ({patch_size}) and '
                             f'hidden_size ({hidden_size}) divisible by num_heads ({num_heads}) and by 4')
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob  # used by the training loop, which drops labels itself
        self.learn_sigma = learn_sigma

        self.x_embedder = DiTPatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = DiTTimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = DiTLabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A frozen Parameter rather than a buffer, as in DiT: it sits in the state dict (and the EMA) under this name.
        self.pos_embed = nn.Parameter(dit_pos_embed(hidden_size, input_size // patch_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, mlp_norm_eps) for _ in range(depth))
        self.final_layer = DiTFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: Xavier-uniform linears with zero bias, the patch conv initialised like a linear,
        N(0, 0.02) embeddings, and zero adaLN modulations and output layer (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_init = [block.adaLN_modulation[1] for block in self.blocks]
        zero_init += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x):
        """Tokens (B, T, p * p * C) back to images (B, C, H, W); token (i, j) holds the patch at rows i*p .. i*p+p-1,
        columns j*p .. j*p+p-1, its features ordered (row in patch, column in patch, channel)."""
        p, c, h = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], h, h, p, p, c)      # (B, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)               # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, h * p)  # (B, C, H, W)

    def forward(self, x, t, y, embedding_noise=None, embedding_hook=None):
        x = self.x_embedder(x) + self.pos_embed     # (B, T, D), T = H * W / p**2
        t = self.t_embedder(t)                      # (B, D)
        y = self.y_embedder(y)                      # (B, D)
        if embedding_noise is not None:
            y = y + embedding_noise                 # CEP perturbs the condition embedding only
        if embedding_hook is not None:
            y = embedding_hook(y)                   # the caller's function of the label embedding (B, D), e.g. CEP
        c = t + y                                   # (B, D)
        for block in self.blocks:
            x = block(x, c)                         # (B, T, D)
        x = self.final_layer(x, c)                  # (B, T, p * p * out_channels)
        return self.unpatchify(x)                   # (B, out_channels, H, W)


DIT_SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}  # depth, width, heads
DiT_models = {f'DiT-{size}/{patch}': functools.partial(DiT, depth=depth, hidden_size=width, num_heads=heads,
                                                       patch_size=patch)
              for size, (depth, width, heads) in DIT_SIZES.items() for patch in (2, 4, 8)}


def dit_from_state_dict(state_dict, num_classes=None, num_heads=None):
    """Build the DiT whose shapes match a state dict and load it strictly (fp32, eval mode).

    Accepts a plain state dict (the released DiT-XL-2-256x256.pt) or a DiT training checkpoint {'model', 'ema', 'opt',
    'args'}, of which the EMA weights are taken, as in DiT's find_model. Depth, width, patch size, channels, input
    size (from pos_embed) and learn_sigma are read from the shapes; the heads from the preset of that width (else pass
    num_heads). Every released DiT was trained with label dropout, so the table's last row is taken to be the null
    label (num_classes = rows - 1) unless num_classes is given.
    """
    state_dict = state_dict.get('ema', state_dict.get('model', state_dict))
    hidden_size, in_channels, patch_size, _ = state_dict['x_embedder.proj.weight'].shape
    rows = state_dict['y_embedder.embedding_table.weight'].shape[0]
    out_channels = state_dict['final_layer.linear.weight'].shape[0] // patch_size ** 2
    num_classes = rows - 1 if num_classes is None else num_classes
    num_heads = num_heads or {width: heads for _, width, heads in DIT_SIZES.values()}.get(hidden_size)
    if num_heads is None:
        raise ValueError(f'no DiT preset has hidden size {hidden_size}: pass num_heads')
    if out_channels not in (in_channels, 2 * in_channels) or rows not in (num_classes, num_classes + 1):
        raise ValueError(f'state dict does not look like a DiT ({out_channels} output channels for {in_channels} '
                         f'input channels, {rows} label rows for {num_classes} classes)')
    net = build_checked(lambda: DiT(
        input_size=round(math.sqrt(state_dict['pos_embed'].shape[1])) * patch_size, patch_size=patch_size,
        in_channels=in_channels, hidden_size=hidden_size,
        depth=len({key.split('.')[1] for key in state_dict if key.startswith('blocks.')}),
        num_heads=num_heads, mlp_ratio=state_dict['blocks.0.mlp.fc1.weight'].shape[0] / hidden_size,
        class_dropout_prob=0.1 if rows > num_classes else 0.0, num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels), state_dict, 'DiT state dict')
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------------
# AutoencoderKL: the KL-f8 autoencoder of Stable Diffusion (LDM Sec. 3.1, App. G), with diffusers' module names

class VAEResnetBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) twice plus the skip, 1x1-projected when the width changes (diffusers
    ResnetBlock2D without time embedding; dropout 0)."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual (the mid-block Attention of diffusers'
    VAE: to_q / to_k / to_v / to_out.0; heads = channels / attention_head_dim = 1)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                                # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)                           # softmax(q k^T / sqrt(C)) v
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)                # (B, C, H, W)


class VAEDownsample(nn.Module):
    """Stride-2 3x3 conv after one zero row and column on the bottom and right only (LDM's Downsample, diffusers
    Downsample2D with padding 0): output pixel (i, j) sees input rows and columns 2i .. 2i+2, 2j .. 2j+2."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEUpsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (diffusers Upsample2D with use_conv)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


def vae_resnets(in_channels, out_channels, num_layers, groups):
    """num_layers resnet blocks, the first one changing the width."""
    return nn.ModuleList(VAEResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                         for i in range(num_layers))


class VAEDownBlock(nn.Module):
    """One encoder level: resnets, then an optional 2x downsampler (diffusers DownEncoderBlock2D)."""

    def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample):
        super().__init__()
        self.resnets = vae_resnets(in_channels, out_channels, num_layers, groups)
        self.downsamplers = nn.ModuleList([VAEDownsample(out_channels)] if add_downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class VAEUpBlock(nn.Module):
    """One decoder level: resnets, then an optional 2x upsampler (diffusers UpDecoderBlock2D)."""

    def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample):
        super().__init__()
        self.resnets = vae_resnets(in_channels, out_channels, num_layers, groups)
        self.upsamplers = nn.ModuleList([VAEUpsample(out_channels)] if add_upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class VAEMidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (diffusers UNetMidBlock2D)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = vae_resnets(channels, channels, 2, groups)
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAEEncoder(nn.Module):
    """Image (B, in_channels, H, W) -> Gaussian moments (B, 2 * latent_channels, H/f, W/f), f = 2**(levels - 1)."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        widths = block_out_channels
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            VAEDownBlock(widths[max(i - 1, 0)], widths[i], layers_per_block, groups, i < len(widths) - 1)
            for i in range(len(widths)))
        self.mid_block = VAEMidBlock(widths[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f); one more resnet per level than the
    encoder."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        widths = block_out_channels[::-1]
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.mid_block = VAEMidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            VAEUpBlock(widths[max(i - 1, 0)], widths[i], layers_per_block + 1, groups, i < len(widths) - 1)
            for i in range(len(widths)))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z):
        z = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            z = block(z)
        return self.conv_out(F.silu(self.conv_norm_out(z)))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion; the defaults are SD's KL-f8 (sd-vae-ft-ema / -mse,
    83,653,863 parameters), the keyword names those of diffusers' config.json.

    encode_moments(x) -> (mean, logvar) of the posterior, x in [-1, 1]; encode(x) -> a posterior sample times
    scaling_factor (the diffusion model's data, as in DiT train.py); decode(z) takes such scaled latents and returns
    images in about [-1, 1] (not clamped, as in diffusers).
    """

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, scaling_factor=0.18215):
        super().__init__()
        self.scaling_factor = scaling_factor
        self.downscale_factor = 2 ** (len(block_out_channels) - 1)  # image side / latent side
        self.latent_channels = latent_channels
        self.encoder = VAEEncoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = VAEDecoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                                  norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode_moments(self, x):
        """(B, C, H, W) -> mean, logvar (B, latent_channels, H/f, W/f) in fp32; logvar clamped to [-30, 20]."""
        mean, logvar = self.quant_conv(self.encoder(x)).float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, generator=None):
        """Sample z ~ N(mean, exp(logvar)) and scale it: (B, C, H, W) -> (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.encode_moments(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + torch.exp(0.5 * logvar) * noise) * self.scaling_factor

    def decode(self, z):
        """Scaled latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f) in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z / self.scaling_factor))

    def forward(self, x, generator=None):
        return self.decode(self.encode(x, generator))


AUTOENCODER_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)  # f = 2, for CPU tests

VAE_URLS = {  # decoders fine-tuned by Stability AI: DiT's train.py and sample_ddp.py use 'ema', its sample.py 'mse'
    'ema': 'https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors',
    'mse': 'https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors',
}


def vae_state_dict_to_diffusers(state_dict):
    """Rename the keys of a released KL autoencoder file to the current diffusers layout used by AutoencoderKL.

    Reads (1) CompVis LDM / Stable Diffusion checkpoints ('state_dict', optional 'first_stage_model.' prefix,
    encoder.down.{i}.block.{j}, mid.attn_1.{q,k,v,proj_out} as 1x1 convs, decoder.up.{i} numbered from the
    highest resolution); (2) diffusers files written before the attention refactor, with mid-block attention
    query / key / value / proj_attn: the layout of the sd-vae-ft-ema / -mse files on the Hub; (3) the current layout.
    Keys of other parts (the LPIPS/discriminator 'loss.', the UNet of a full checkpoint) are dropped.
    """
    state_dict = state_dict.get('state_dict', state_dict)
    if any(key.startswith('first_stage_model.') for key in state_dict):
        state_dict = {key[len('first_stage_model.'):]: value for key, value in state_dict.items()
                      if key.startswith('first_stage_model.')}
    parts = ('encoder.', 'decoder.', 'quant_conv.', 'post_quant_conv.')
    state_dict = {key: value for key, value in state_dict.items() if key.startswith(parts)}

    # LDM numbers decoder levels from the highest resolution, diffusers in execution order.
    up_levels = {int(m[1]) for m in (re.match(r'decoder\.up\.(\d+)\.', key) for key in state_dict) if m}
    last_level = max(up_levels, default=0)
    renames = [
        (r'^encoder\.down\.(\d+)\.block\.', r'encoder.down_blocks.\1.resnets.'),
        (r'^encoder\.down\.(\d+)\.downsample\.', r'encoder.down_blocks.\1.downsamplers.0.'),
        (r'^decoder\.up\.(\d+)\.block\.', lambda m: f'decoder.up_blocks.{last_level - int(m[1])}.resnets.'),
        (r'^decoder\.up\.(\d+)\.upsample\.', lambda m: f'decoder.up_blocks.{last_level - int(m[1])}.upsamplers.0.'),
        (r'\.mid\.block_(\d)\.', lambda m: f'.mid_block.resnets.{int(m[1]) - 1}.'),
        (r'\.mid\.attn_1\.norm\.', '.mid_block.attentions.0.group_norm.'),
        (r'\.mid\.attn_1\.(q|k|v)\.', r'.mid_block.attentions.0.to_\1.'),
        (r'\.mid\.attn_1\.proj_out\.', '.mid_block.attentions.0.to_out.0.'),
        (r'\.nin_shortcut\.', '.conv_shortcut.'),
        (r'\.norm_out\.', '.conv_norm_out.'),
        (r'\.attentions\.0\.query\.', '.attentions.0.to_q.'),  # diffusers before the attention refactor
        (r'\.attentions\.0\.key\.', '.attentions.0.to_k.'),
        (r'\.attentions\.0\.value\.', '.attentions.0.to_v.'),
        (r'\.attentions\.0\.proj_attn\.', '.attentions.0.to_out.0.'),
    ]
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if '.attentions.' in key and key.endswith('.weight') and value.ndim == 4:
            value = value[:, :, 0, 0]  # LDM's 1x1 conv q/k/v/proj_out -> Linear weights
        converted[key] = value
    return converted


def vae_config_from_state_dict(state_dict):
    """AutoencoderKL keyword arguments read from the shapes of a diffusers-layout state dict (norm groups: 32)."""
    try:
        levels = 1 + max(int(key.split('.')[2]) for key in state_dict if key.startswith('encoder.down_blocks.'))
        return dict(
            in_channels=state_dict['encoder.conv_in.weight'].shape[1],
            out_channels=state_dict['decoder.conv_out.weight'].shape[0],
            block_out_channels=tuple(state_dict[f'encoder.down_blocks.{i}.resnets.0.conv1.weight'].shape[0]
                                     for i in range(levels)),
            layers_per_block=len({key.split('.')[4] for key in state_dict
                                  if key.startswith('encoder.down_blocks.0.resnets.')}),
            latent_channels=state_dict['post_quant_conv.weight'].shape[0])
    except (KeyError, ValueError) as error:
        raise ValueError(f'state dict does not look like a KL autoencoder (missing {error})') from None


def load_autoencoder(path_or_url, cache_dir=None):
    """Load a KL autoencoder, frozen and in eval mode, from 'ema' / 'mse' (stabilityai/sd-vae-ft-*), an http(s) URL
    (downloaded once into cache_dir, default default_cache_dir()), or a local .safetensors / .bin / .ckpt file in the
    diffusers, old-diffusers or CompVis layout (see vae_state_dict_to_diffusers). Strict: every key must match."""
    source = VAE_URLS.get(path_or_url, path_or_url)
    is_url = source.startswith(('http://', 'https://'))
    path = download_cached(source, cache_dir) if is_url else source
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f'autoencoder weights not found: {path} (download {VAE_URLS["ema"]} there, or pass '
                                   "'ema' or 'mse' to download it into the cache)")
    try:
        state_dict = vae_state_dict_to_diffusers(load_weights_file(path))
    except ValueError as error:
        raise ValueError(cached_file_hint(str(error), source, path)) from None
    net = build_checked(lambda: AutoencoderKL(**vae_config_from_state_dict(state_dict)), state_dict, path_or_url)
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# VQ-f4 autoencoder: the vector-quantised first stage of LDM-4 (LDM Sec. 3.1), in diffusers' VQModel layout


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation of (B, C, h, w) latents (taming-transformers VectorQuantizer2 as diffusers
    runs it: Euclidean cdist, first minimum on ties). Key `embedding.weight` (num_embeddings, C)."""

    def __init__(self, num_embeddings, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embed_dim)

    def forward(self, z):
        """(B, C, h, w) -> quantised latents (B, C, h, w) and code indices (B, h, w). The straight-through form
        z + (z_q - z) keeps gradients flowing to z and rounds exactly as diffusers does."""
        B, C, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, C)                                  # (B h w, C)
        indices = torch.cdist(z_flat, self.embedding.weight.to(z_flat.dtype)).argmin(dim=1)
        z_q = self.embedding(indices).to(z.dtype).reshape(B, h, w, C).permute(0, 3, 1, 2)
        return z + (z_q - z).detach(), indices.reshape(B, h, w)


class VQModel(nn.Module):
    """The VQ-regularised autoencoder of latent diffusion (CompVis vq-f4 / diffusers VQModel). The defaults are
    LDM-4's VQ-f4: 256x256x3 images <-> 64x64x3 latents, 8192 codes (CompVis models/first_stage_models/vq-f4).

    Encoder and decoder are the KL autoencoder's (VAEEncoder / VAEDecoder) with a single-width encoder output
    (no posterior log-variance), then quant_conv -> codebook `quantize` -> post_quant_conv, as in diffusers:
    encode(x) -> the PRE-quantisation latents quant_conv(encoder(x)) (diffusers VQModel.encode().latents);
    decode(h, force_not_quantize=False) -> images, quantising h to the nearest codes first unless
    force_not_quantize (diffusers VQModel.decode; CompVis VQModelInterface.decode). Neither scales: scaling_factor
    is what a pipeline divides sampled latents by before decode (diffusers' pipelines do; LDM's VQ models use 1).
    """

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512), layers_per_block=2,
                 latent_channels=3, num_vq_embeddings=8192, vq_embed_dim=None, norm_num_groups=32,
                 scaling_factor=1.0):
        super().__init__()
        vq_embed_dim = vq_embed_dim or latent_channels
        self.scaling_factor = scaling_factor
        self.downscale_factor = 2 ** (len(block_out_channels) - 1)
        self.latent_channels = vq_embed_dim  # the channels of what encode returns and decode takes
        self.encoder = VAEEncoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.encoder.conv_out = nn.Conv2d(block_out_channels[-1], latent_channels, 3, padding=1)  # double_z=False
        self.quant_conv = nn.Conv2d(latent_channels, vq_embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, vq_embed_dim)
        self.post_quant_conv = nn.Conv2d(vq_embed_dim, latent_channels, 1)
        self.decoder = VAEDecoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                                  norm_num_groups)

    def encode(self, x):
        """Images (B, in_channels, H, W) in [-1, 1] -> pre-quantisation latents (B, vq_embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h, force_not_quantize=False):
        """Latents (B, vq_embed_dim, h, w) -> images (B, out_channels, h*f, w*f) in about [-1, 1] (not clamped)."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x):
        return self.decode(self.encode(x))


VQMODEL_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, num_vq_embeddings=64)  # f = 2, for CPU tests
VQMODEL_CONFIG_KEYS = ('in_channels', 'out_channels', 'block_out_channels', 'layers_per_block', 'latent_channels',
                       'num_vq_embeddings', 'vq_embed_dim', 'norm_num_groups', 'scaling_factor')


def vq_state_dict_to_diffusers(state_dict):
    """Keys of a released VQ autoencoder -> the diffusers VQModel layout: a CompVis/taming first-stage checkpoint
    (`state_dict`, optional `first_stage_model.` prefix of a full LDM checkpoint, `quantize.embedding.weight`) or a
    diffusers file (old or current attention names); see vae_state_dict_to_diffusers for the encoder/decoder."""
    state_dict = state_dict.get('state_dict', state_dict)
    prefix = 'first_stage_model.' if any(key.startswith('first_stage_model.') for key in state_dict) else ''
    codebook = state_dict.get(prefix + 'quantize.embedding.weight')
    converted = vae_state_dict_to_diffusers(state_dict)
    if codebook is not None:
        converted['quantize.embedding.weight'] = codebook
    return converted


def vq_config_from_state_dict(state_dict):
    """VQModel keyword arguments read from the shapes of a diffusers-layout state dict (norm groups: 32)."""
    if 'quantize.embedding.weight' not in state_dict:
        raise ValueError('state dict does not look like a VQ autoencoder (no quantize.embedding.weight)')
    config = vae_config_from_state_dict(state_dict)
    num_vq_embeddings, vq_embed_dim = state_dict['quantize.embedding.weight'].shape
    return {**config, 'num_vq_embeddings': num_vq_embeddings, 'vq_embed_dim': vq_embed_dim}


def vq_config_from_diffusers(config):
    """VQModel keyword arguments from a diffusers VQModel config.json; the variants nets.VQModel does not implement
    (MoVQ's spatial norm, codebook-index decoding, no mid-block attention, other blocks or activations) are refused."""
    unsupported = {'norm_type': 'group', 'act_fn': 'silu', 'mid_block_add_attention': True,
                   'lookup_from_codebook': False}
    for key, supported in unsupported.items():
        if config.get(key, supported) != supported:
            raise ValueError(f'VQModel with {key}={config[key]!r} is not supported (only {key}={supported!r})')
    block_types = set(config.get('down_block_types', ())) | set(config.get('up_block_types', ()))
    if block_types - {'DownEncoderBlock2D', 'UpDecoderBlock2D'}:
        raise ValueError(f'VQModel blocks {sorted(block_types)} are not supported (only DownEncoderBlock2D / '
                         'UpDecoderBlock2D)')
    # diffusers VQModel's defaults, for entries a config.json omits (scaling_factor too: 0.18215, not LDM's 1).
    defaults = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1, latent_channels=3,
                    num_vq_embeddings=256, vq_embed_dim=None, norm_num_groups=32, scaling_factor=0.18215)
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in {**defaults, **{k: config[k] for k in VQMODEL_CONFIG_KEYS if k in config}}.items()}


def read_diffusers_weights(folder, names=('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')):
    """The state dict of a diffusers/transformers model folder: the first of `names` present (safetensors first)."""
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return load_weights_file(os.path.join(folder, name))
    raise WeightsNotFoundError(f'{folder}: none of {", ".join(names)} found')


def read_json(path):
    """A JSON file that holds an object, as a dict; otherwise (unreadable, not JSON, nested too deeply, a list...)
    a one-line ValueError naming the file."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = ' '.join(str(error).split())[:160] or type(error).__name__
        raise ValueError(f'{path}: not a readable JSON file ({reason})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a JSON object, found a {type(data).__name__}')
    return data


def vqmodel_from_diffusers(config, state_dict):
    """nets.VQModel of a diffusers VQModel folder's config.json and weights, strict, frozen."""
    kwargs = vq_config_from_diffusers(config)
    net = build_checked(lambda: VQModel(**kwargs), vq_state_dict_to_diffusers(state_dict), 'VQ model')
    net.config = kwargs
    return net.eval().requires_grad_(False)


def load_vqmodel(path_or_folder, cache_dir=None):
    """Load a VQ autoencoder, frozen and in eval mode, from a diffusers folder (config.json +
    diffusion_pytorch_model.safetensors or .bin; a pipeline folder with a vqvae/ sub-folder also works), a file of
    weights (.safetensors / .bin / .ckpt / .pt: diffusers layout or a CompVis first-stage / full LDM checkpoint, shapes
    giving the config, scaling_factor 1.0 unless the LDM checkpoint stores a scale_factor), or a Hugging Face repo
    id / hf:// / URL resolved with resolve_source. Strict: every key must match."""
    files = ('config.json', ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin'))
    try:
        source = resolve_source(path_or_folder, files, cache_dir)
    except WeightsNotFoundError as error:  # a hub pipeline repository: its autoencoder is in vqvae/
        repo = str(path_or_folder).rstrip('/').removeprefix('hf://')
        if '(HTTP 404' not in str(error) or repo.endswith('/vqvae') or repo.startswith(('http://', 'https://')):
            raise
        source = resolve_source(f'hf://{repo}/vqvae', files, cache_dir)
    if os.path.isdir(source):
        folder = source if os.path.isfile(os.path.join(source, 'config.json')) else os.path.join(source, 'vqvae')
        return vqmodel_from_diffusers(read_json(os.path.join(folder, 'config.json')), read_diffusers_weights(folder))
    try:
        raw = load_weights_file(source)
    except ValueError as error:
        raise ValueError(cached_file_hint(str(error), path_or_folder, source)) from None
    state_dict = vq_state_dict_to_diffusers(raw)
    scale = raw.get('state_dict', raw).get('scale_factor')
    config = {**vq_config_from_state_dict(state_dict), 'scaling_factor': float(scale) if scale is not None else 1.0}
    net = build_checked(lambda: VQModel(**config), state_dict, 'VQ model')
    net.config = config
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# diffusers layouts: DiTTransformer2DModel -> DiT, UNet2DConditionModel / UNet2DModel -> UNet(arch='ldm' / 'adm')


def _refuse_unsupported(config, supported, what):
    """ValueError naming the first config entry whose value nets' counterpart of `what` does not implement."""
    for key, value in supported.items():
        if key in config and config[key] != value and not (value is None and config[key] in ((), [], 0)):
            raise ValueError(f'{what} with {key}={config[key]!r} is not supported (only {key}={value!r})')


class DiTPerBlockConditioning(DiT):
    """DiT with a timestep and a label embedder in every block, as diffusers' DiT has them: each block's
    AdaLayerNormZero owns a CombinedTimestepLabelEmbeddings, and the final layer uses block 0's. Converting a
    facebookresearch DiT copies one pair into every block (then plain DiT is the same function and is used); a model
    trained in diffusers has different pairs, which this class keeps. embedding_noise (CEP) joins every block's label
    embedding. Extra keys: block_t_embedders.{i-1}.*, block_y_embedders.{i-1}.* for blocks i >= 1."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        shift = self.t_embedder.freq_shift
        self.block_t_embedders = nn.ModuleList(DiTTimestepEmbedder(self.hidden_size, freq_shift=shift)
                                               for _ in self.blocks[1:])
        self.block_y_embedders = nn.ModuleList(
            DiTLabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob) for _ in self.blocks[1:])

    def forward(self, x, t, y, embedding_noise=None, embedding_hook=None):
        x = self.x_embedder(x) + self.pos_embed                                  # (B, T, D)
        conditions = []
        for t_embedder, y_embedder in zip([self.t_embedder, *self.block_t_embedders],
                                          [self.y_embedder, *self.block_y_embedders]):
            label = y_embedder(y) if embedding_noise is None else y_embedder(y) + embedding_noise
            label = label if embedding_hook is None else embedding_hook(label)  # as DiT.forward, per block
            conditions.append(t_embedder(t) + label)                             # (B, D) per block
        for block, c in zip(self.blocks, conditions):
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, conditions[0]))               # (B, out_channels, H, W)


def dit_state_dict_from_diffusers(state_dict):
    """Keys of diffusers' DiTTransformer2DModel (or Transformer2DModel with norm_type 'ada_norm_zero') -> nets.DiT
    keys: pos_embed.proj -> x_embedder.proj, transformer_blocks.0.norm1.emb.{timestep_embedder.linear_1/2,
    class_embedder.embedding_table} -> t_embedder.mlp.0/2, y_embedder.embedding_table, attn1.to_q/k/v stacked into
    attn.qkv, attn1.to_out.0 -> attn.proj, ff.net.0.proj / ff.net.2 -> mlp.fc1 / fc2, norm1.linear ->
    adaLN_modulation.1, proj_out_1 / proj_out_2 -> final_layer.adaLN_modulation.1 / final_layer.linear (same chunk
    orders: shift, scale, gate). The embedders of blocks >= 1 go to block_t_embedders / block_y_embedders
    (DiTPerBlockConditioning). The fixed sin-cos pos_embed is not stored by diffusers (computed, the same table)."""
    renames = [(r'^pos_embed\.proj\.', 'x_embedder.proj.'),
               (r'^transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.linear_(\d)\.',
                lambda m: f't_embedder.mlp.{2 * int(m[1]) - 2}.'),
               (r'^transformer_blocks\.0\.norm1\.emb\.class_embedder\.', 'y_embedder.'),
               (r'^transformer_blocks\.(\d+)\.norm1\.emb\.timestep_embedder\.linear_(\d)\.',
                lambda m: f'block_t_embedders.{int(m[1]) - 1}.mlp.{2 * int(m[2]) - 2}.'),
               (r'^transformer_blocks\.(\d+)\.norm1\.emb\.class_embedder\.',
                lambda m: f'block_y_embedders.{int(m[1]) - 1}.'),
               (r'^transformer_blocks\.(\d+)\.norm1\.linear\.', r'blocks.\1.adaLN_modulation.1.'),
               (r'^transformer_blocks\.(\d+)\.attn1\.to_out\.0\.', r'blocks.\1.attn.proj.'),
               (r'^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.', r'blocks.\1.mlp.fc1.'),
               (r'^transformer_blocks\.(\d+)\.ff\.net\.2\.', r'blocks.\1.mlp.fc2.'),
               (r'^proj_out_1\.', 'final_layer.adaLN_modulation.1.'),
               (r'^proj_out_2\.', 'final_layer.linear.')]
    converted, qkv = {}, collections.defaultdict(dict)
    for key, value in state_dict.items():
        found = re.fullmatch(r'transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)', key)
        if found:
            qkv[f'blocks.{found[1]}.attn.qkv.{found[3]}'][found[2]] = value
            continue
        new_key = key
        for pattern, replacement in renames:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key == key:
            raise ValueError(f'unexpected key in a diffusers DiT state dict: {key}')
        converted[new_key] = value
    for key, parts in qkv.items():
        converted[key] = torch.cat([parts['q'], parts['k'], parts['v']])
    return converted


def dit_from_diffusers(config, state_dict):
    """The nets.DiT (DiTPerBlockConditioning when the blocks' embedders differ) of a diffusers DiT transformer folder's
    config.json and weights, loaded strictly, fp32, eval mode. diffusers' function differs from facebookresearch's in
    two constants, both reproduced: the timestep sinusoid uses downscale_freq_shift=1 (frequencies 10000^(-i/127)
    instead of 10000^(-i/128)) and the LayerNorm before the MLP has eps norm_eps (1e-5 by default, DiT: 1e-6)."""
    _refuse_unsupported(config, {'norm_type': 'ada_norm_zero', 'activation_fn': 'gelu-approximate',
                                 'attention_bias': True, 'norm_elementwise_affine': False, 'cross_attention_dim': None,
                                 'num_vector_embeds': None, 'use_linear_projection': False, 'dropout': 0.0,
                                 'only_cross_attention': False, 'double_self_attention': False,
                                 'caption_channels': None}, 'diffusers DiT')
    if not config.get('patch_size') or not config.get('num_embeds_ada_norm'):
        raise ValueError('diffusers transformer without patch_size / num_embeds_ada_norm is not a DiT')
    # Transformer2DModel divides the pos-embed grid by interpolation_scale (default: sample_size // 64, at least 1).
    interpolation = config.get('interpolation_scale') or max(config.get('sample_size', 32) // 64, 1)
    if config.get('_class_name') == 'Transformer2DModel' and interpolation != 1:
        raise ValueError(f'diffusers DiT with a position-embedding interpolation scale of {interpolation} is not '
                         'supported (only 1)')
    heads, in_channels = config.get('num_attention_heads', 16), config.get('in_channels', 4)
    hidden_size = heads * config.get('attention_head_dim', 72)
    out_channels = config.get('out_channels') or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f'diffusers DiT with {out_channels} output channels for {in_channels} inputs')
    state_dict = dit_state_dict_from_diffusers(state_dict)
    num_classes = config['num_embeds_ada_norm']
    per_block = any(key.startswith(('block_t_embedders.', 'block_y_embedders.')) and not torch.equal(
        value, state_dict[re.sub(r'^block_(\w)_embedders\.\d+\.', r'\1_embedder.', key)])
        for key, value in state_dict.items())
    if not per_block:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith('block_')}
    kwargs = dict(input_size=config.get('sample_size', 32), patch_size=config['patch_size'], in_channels=in_channels,
                  hidden_size=hidden_size, depth=config.get('num_layers', 28), num_heads=heads,
                  mlp_ratio=state_dict['blocks.0.mlp.fc1.weight'].shape[0] / hidden_size,
                  class_dropout_prob=0.1 if state_dict['y_embedder.embedding_table.weight'].shape[0] > num_classes
                  else 0.0, num_classes=num_classes, learn_sigma=out_channels == 2 * in_channels,
                  timestep_freq_shift=1, mlp_norm_eps=config.get('norm_eps', 1e-5))
    grid = int(kwargs['input_size']) // int(kwargs['patch_size'])
    if not 0 < grid * grid * hidden_size <= sum(value.numel() for value in state_dict.values()):
        raise ValueError(f'diffusers DiT: sample_size {kwargs["input_size"]} / patch_size {kwargs["patch_size"]} '
                         f'gives a position table larger than the whole network')
    state_dict['pos_embed'] = dit_pos_embed(hidden_size, grid)[None]  # not stored by diffusers; sized above
    net = build_checked(lambda: (DiTPerBlockConditioning if per_block else DiT)(**kwargs), state_dict, 'diffusers DiT')
    net.config = {**kwargs, 'per_block_conditioning': per_block}
    return net.eval()


UNET_RESNET_KEYS = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_emb_proj': 'emb_layers.1',
                    'norm2': 'out_layers.0', 'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection'}
UNET_ATTENTION_KEYS = {'group_norm': 'norm', 'to_out.0': 'proj_out', 'proj_attn': 'proj_out',  # old names too
                       'query': 'to_q', 'key': 'to_k', 'value': 'to_v'}


def unet_module_map(levels, num_blocks, attention_levels):
    """diffusers UNet module path -> (nets.UNet module path, kind) for a UNet of `levels` levels with num_blocks
    resnets per encoder level (num_blocks + 1 per decoder level) and attention at `attention_levels` (encoder
    level numbers; diffusers' up_blocks run from the deepest level)."""
    modules = {'conv_in': ('input_blocks.0.0', 'plain'), 'time_embedding.linear_1': ('time_embed.0', 'plain'),
               'time_embedding.linear_2': ('time_embed.2', 'plain'), 'class_embedding': ('label_emb', 'plain'),
               'conv_norm_out': ('out.0', 'plain'), 'conv_out': ('out.2', 'plain'),
               'mid_block.resnets.0': ('middle_block.0', 'resnet'),
               'mid_block.attentions.0': ('middle_block.1', 'attn'),
               'mid_block.resnets.1': ('middle_block.2', 'resnet')}
    index = 1
    for level in range(levels):
        for j in range(num_blocks):
            modules[f'down_blocks.{level}.resnets.{j}'] = (f'input_blocks.{index}.0', 'resnet')
            modules[f'down_blocks.{level}.attentions.{j}'] = (f'input_blocks.{index}.1', 'attn')
            index += 1
        if level < levels - 1:
            modules[f'down_blocks.{level}.downsamplers.0.conv'] = (f'input_blocks.{index}.0.op', 'plain')
            index += 1
    index = 0
    for up in range(levels):
        for j in range(num_blocks + 1):
            modules[f'up_blocks.{up}.resnets.{j}'] = (f'output_blocks.{index}.0', 'resnet')
            modules[f'up_blocks.{up}.attentions.{j}'] = (f'output_blocks.{index}.1', 'attn')
            if up < levels - 1 and j == num_blocks:
                upsampler = 2 if levels - 1 - up in attention_levels else 1
                modules[f'up_blocks.{up}.upsamplers.0.conv'] = (f'output_blocks.{index}.{upsampler}.conv', 'plain')
            index += 1
    return modules


def unet_state_dict_from_diffusers(state_dict, levels, num_blocks, attention_levels, arch):
    """Keys of a diffusers UNet2DConditionModel / UNet2DModel -> nets.UNet keys (see unet_module_map). Resnets:
    norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut -> in_layers.0/2, emb_layers.1, out_layers.0/3,
    skip_connection. arch 'ldm': the Transformer2DModel keys equal SpatialTransformer's (Linear proj_in/proj_out of
    use_linear_projection become 1x1 convs). arch 'adm': attention group_norm -> norm, to_q/to_k/to_v stacked into
    qkv ([q|k|v] then heads: use_new_attention_order) and to_out.0 -> proj_out, as (C_out, C_in, 1) weights."""
    modules = unet_module_map(levels, num_blocks, attention_levels)
    converted, qkv = {}, collections.defaultdict(dict)
    for key, value in state_dict.items():
        module = max((m for m in modules if key.startswith(m + '.')), key=len, default=None)
        if module is None:
            raise ValueError(f'unexpected key in a diffusers UNet state dict: {key}')
        target, kind = modules[module]
        rest = key[len(module) + 1:]
        if kind == 'resnet':
            name, _, leaf = rest.partition('.')
            rest = f'{UNET_RESNET_KEYS.get(name, name)}.{leaf}'
        elif kind == 'attn' and arch == 'adm':
            name, leaf = rest.rsplit('.', 1)
            name = UNET_ATTENTION_KEYS.get(name, name)
            if name in ('to_q', 'to_k', 'to_v'):
                qkv[f'{target}.qkv.{leaf}'][name] = value
                continue
            value = value[:, :, None] if name == 'proj_out' and leaf == 'weight' else value
            rest = f'{name}.{leaf}'
        elif kind == 'attn' and re.fullmatch(r'proj_(in|out)\.weight', rest) and value.ndim == 2:
            value = value[:, :, None, None]  # use_linear_projection: a Linear, the same map as a 1x1 conv
        converted[f'{target}.{rest}'] = value
    for key, parts in qkv.items():
        stacked = torch.cat([parts['to_q'], parts['to_k'], parts['to_v']])
        converted[key] = stacked[:, :, None] if key.endswith('weight') else stacked
    return converted


def unet_from_diffusers(config, state_dict):
    """The nets.UNet of a diffusers UNet2DConditionModel (arch 'ldm': ResnetBlock2D + Transformer2DModel with
    cross-attention, the CompVis LDM UNets converted to diffusers, e.g. ldm-text2im-large-256) or UNet2DModel (arch
    'adm': ResnetBlock2D + self-attention blocks), weights loaded strictly, fp32, eval mode. Both time embeddings are
    [cos | sin] at frequencies 10000^(-i/half) (flip_sin_to_cos=True, freq_shift=0), nets' convention; configs
    outside what nets.UNet expresses (other block types, embeddings, shifts, paddings) are refused with one line."""
    class_name = config.get('_class_name', 'UNet2DConditionModel')
    if class_name not in ('UNet2DConditionModel', 'UNet2DModel'):
        raise ValueError(f'diffusers {class_name} is not a UNet that nets.UNet expresses')
    arch = 'ldm' if class_name == 'UNet2DConditionModel' else 'adm'
    attention_block = 'CrossAttn' if arch == 'ldm' else 'Attn'
    _refuse_unsupported(config, {
        'flip_sin_to_cos': True, 'freq_shift': 0, 'time_embedding_type': 'positional', 'act_fn': 'silu',
        'downsample_padding': 1, 'norm_num_groups': 32, 'norm_eps': 1e-5, 'center_input_sample': False,
        'class_embed_type': None, 'addition_embed_type': None, 'encoder_hid_dim': None, 'time_embedding_dim': None,
        'time_cond_proj_dim': None, 'conv_in_kernel': 3, 'conv_out_kernel': 3, 'dual_cross_attention': False,
        'only_cross_attention': False, 'resnet_skip_time_act': False, 'resnet_out_scale_factor': 1.0,
        'mid_block_scale_factor': 1, 'class_embeddings_concat': False, 'timestep_post_act': None,
        'attention_type': 'default', 'cross_attention_norm': None, 'add_attention': True,
        'attn_norm_num_groups': None, 'downsample_type': 'conv', 'upsample_type': 'conv',
        'reverse_transformer_layers_per_block': None,
        'mid_block_type': 'UNetMidBlock2DCrossAttn' if arch == 'ldm' else 'UNetMidBlock2D'}, f'diffusers {class_name}')
    if config.get('resnet_time_scale_shift', 'default') not in ('default', 'scale_shift'):
        raise ValueError(f'diffusers {class_name} with resnet_time_scale_shift={config["resnet_time_scale_shift"]!r} '
                         "is not supported (only 'default' or 'scale_shift')")
    widths = tuple(config['block_out_channels'])
    down, up = list(config['down_block_types']), list(config['up_block_types'])
    levels, num_blocks, C = len(widths), config.get('layers_per_block', 2), widths[0]
    attention_levels = [level for level, kind in enumerate(down) if kind.startswith(attention_block)]
    plain = {'DownBlock2D', 'UpBlock2D', f'{attention_block}DownBlock2D', f'{attention_block}UpBlock2D'}
    if (not isinstance(num_blocks, int) or set(down + up) - plain or len(up) != levels
            or sorted(levels - 1 - u for u, kind in enumerate(up) if kind.startswith(attention_block))
            != attention_levels or any(w % C for w in widths)):
        raise ValueError(f'diffusers {class_name} blocks {down} / {up} (layers_per_block {num_blocks}) have no '
                         'nets.UNet counterpart')
    depth = config.get('transformer_layers_per_block', 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise ValueError(f'transformer_layers_per_block={depth} (one depth per level) is not supported')
        depth = depth[0]

    # Heads per attention level: diffusers' UNet2DConditionModel names the head COUNT attention_head_dim (unless
    # num_attention_heads is set); UNet2DModel's attention_head_dim is the channels per head (None: one head).
    if arch == 'ldm':
        heads = config.get('num_attention_heads') or config.get('attention_head_dim', 8)
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    else:
        per_head = config.get('attention_head_dim', 8)
        heads = [w // per_head if per_head else 1 for w in widths]
    used = [(widths[level], heads[level]) for level in attention_levels] + [(widths[-1], heads[-1])]
    if len({h for _, h in used}) == 1:
        head_kwargs = dict(num_heads=used[0][1], num_head_channels=-1)
    elif len({w // h for w, h in used}) == 1:
        head_kwargs = dict(num_head_channels=used[0][0] // used[0][1])
    else:
        raise ValueError(f'attention heads {heads} for widths {widths} are neither a fixed count nor a fixed width')
    resolution = config.get('sample_size', 64)
    resolution = resolution[0] if isinstance(resolution, (list, tuple)) else resolution
    kwargs = dict(arch=arch, img_resolution=resolution, in_channels=config.get('in_channels', 4),
                  out_channels=config.get('out_channels', 4), model_channels=C,
                  channel_mult=tuple(w // C for w in widths), num_blocks=num_blocks,
                  attn_resolutions=tuple(resolution >> level for level in attention_levels), dropout=0.0,
                  label_dim=config.get('num_class_embeds') or 0, **head_kwargs,
                  use_scale_shift_norm=config.get('resnet_time_scale_shift') == 'scale_shift')
    if arch == 'ldm':
        kwargs.update(context_dim=config.get('cross_attention_dim', 1280), transformer_depth=depth)
    else:
        kwargs.update(use_new_attention_order=True)
    state_dict = unet_state_dict_from_diffusers(state_dict, levels, num_blocks, attention_levels, arch)
    net = build_checked(lambda: UNet(**kwargs), state_dict, 'diffusers UNet')
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------------
# LDM-BERT and WordPiece: the text encoder and tokenizer of LDM text-to-image (diffusers' LDMTextToImagePipeline)


class LDMBertAttention(nn.Module):
    """Multi-head self-attention, q/k/v without bias, heads * head_dim inner width (BART attention as LDM-BERT
    configures it), computed with scaled_dot_product_attention (softmax scale 1/sqrt(head_dim))."""

    def __init__(self, dim, num_heads, head_dim):
        super().__init__()
        self.num_heads = num_heads
        self.k_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x):
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)      # (B, heads, L, head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v)                                 # (B, heads, L, head_dim)
        return self.out_proj(a.transpose(1, 2).flatten(2))                         # (B, L, dim)


class LDMBertLayer(nn.Module):
    """Pre-LayerNorm encoder layer: x + attn(LN(x)), then x + fc2(GELU(fc1(LN(x)))) (exact GELU)."""

    def __init__(self, dim, num_heads, head_dim, ffn_dim):
        super().__init__()
        self.self_attn = LDMBertAttention(dim, num_heads, head_dim)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class LDMBertEncoder(nn.Module):
    """Token + learned position embeddings, the layers, a final LayerNorm (diffusers' LDMBertEncoder)."""

    def __init__(self, vocab_size, max_position_embeddings, d_model, encoder_layers, encoder_attention_heads,
                 head_dim, encoder_ffn_dim):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.embed_positions = nn.Embedding(max_position_embeddings, d_model)
        self.layers = nn.ModuleList(LDMBertLayer(d_model, encoder_attention_heads, head_dim, encoder_ffn_dim)
                                    for _ in range(encoder_layers))
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)         # (B, L, d_model)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class LDMBert(nn.Module):
    """LDM-BERT (Rombach et al. 2022, Sec. 4.3.1: the text encoder of LDM text-to-image; diffusers LDMBertModel,
    keys model.* and to_logits.*): token ids (B, L) -> (B, L, d_model), the last hidden state that LDM's UNet
    cross-attends to. No attention mask, as the LDM pipeline calls it: padding tokens are ordinary tokens. The
    defaults are LDMBertConfig's (ldm-text2im-large-256: 32 layers, width 1280, 8 heads of 64, 77 positions).
    to_logits (a masked-LM head) is kept so that released files load strictly; forward does not use it."""

    def __init__(self, vocab_size=30522, max_position_embeddings=77, d_model=1280, encoder_layers=32,
                 encoder_attention_heads=8, head_dim=64, encoder_ffn_dim=5120):
        super().__init__()
        self.model = LDMBertEncoder(vocab_size, max_position_embeddings, d_model, encoder_layers,
                                    encoder_attention_heads, head_dim, encoder_ffn_dim)
        self.to_logits = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids):
        return self.model(input_ids)


LDMBERT_CONFIG_KEYS = ('vocab_size', 'max_position_embeddings', 'd_model', 'encoder_layers',
                       'encoder_attention_heads', 'head_dim', 'encoder_ffn_dim')


def ldmbert_from_config(config, state_dict):
    """LDMBert from a transformers-style config.json (LDMBertConfig; activation gelu) and its weights, strict, eval."""
    if config.get('activation_function', 'gelu') != 'gelu':
        raise ValueError(f'LDM-BERT with activation_function={config["activation_function"]!r} is not supported')
    kwargs = {key: config[key] for key in LDMBERT_CONFIG_KEYS if key in config}
    net = build_checked(lambda: LDMBert(**kwargs), state_dict, 'LDMBert')
    return net.eval()


def _is_punctuation(char):
    """BERT's punctuation: every non-alphanumeric printable ASCII character, and Unicode category P*."""
    cp = ord(char)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(char).startswith('P')


def _is_cjk(cp):
    """CJK Unified Ideographs (and extensions, compatibility ideographs): BERT puts spaces around each of them."""
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                              (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                              (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class WordPieceTokenizer:
    """BERT's tokenizer (Devlin et al. 2019; transformers BertTokenizer) in pure Python, from a vocab.txt (one token
    per line, id = line number), as LDM text-to-image uses it: tokenizer(texts) -> (B, max_length) int64 ids of
    [CLS] tokens [SEP] [PAD]..., truncated to max_length (diffusers' LDM pipeline: padding='max_length',
    max_length=77, truncation=True).

    Basic tokenisation: special tokens ([CLS], [SEP], [PAD], [MASK], [UNK]) written in the text are kept whole;
    control characters, NUL and U+FFFD are dropped and whitespace becomes a space; spaces go around CJK ideographs;
    NFC normalisation; split on whitespace; lower-casing and accent stripping (NFD, drop marks) when do_lower_case
    (strip_accents None follows do_lower_case); each punctuation character becomes its own token. WordPiece: greedy
    longest-match-first against the vocabulary, continuation pieces prefixed '##'; a word that cannot be covered, or
    longer than 100 characters, becomes [UNK].
    """

    def __init__(self, vocab_path, do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True,
                 max_length=77):
        if isinstance(vocab_path, dict):  # {token: id}, e.g. from a tokenizer.json
            self.vocab = dict(vocab_path)
        else:
            with open(vocab_path, encoding='utf-8') as f:
                tokens = [line.rstrip('\n') for line in f]
            self.vocab = {token: i for i, token in enumerate(tokens)}  # a repeated line: the last id wins, as BERT's
        self.do_lower_case = do_lower_case
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.max_length = max_length
        self.special = [t for t in ('[UNK]', '[SEP]', '[PAD]', '[CLS]', '[MASK]') if t in self.vocab]
        missing = {'[UNK]', '[SEP]', '[PAD]', '[CLS]'} - set(self.special)
        if missing:
            raise ValueError(f'{vocab_path}: not a BERT vocabulary (no {", ".join(sorted(missing))})')
        self.special_pattern = re.compile('(' + '|'.join(re.escape(t) for t in self.special) + ')')

    @classmethod
    def from_folder(cls, folder, max_length=77):
        """A transformers tokenizer folder: vocab.txt (or, as transformers 5 writes it, only a tokenizer.json with a
        WordPiece model and a BertNormalizer), and tokenizer_config.json's do_lower_case / strip_accents /
        tokenize_chinese_chars when present."""
        config_path = os.path.join(folder, 'tokenizer_config.json')
        config = read_json(config_path) if os.path.isfile(config_path) else {}
        options = {key: config[key] for key in ('do_lower_case', 'strip_accents', 'tokenize_chinese_chars')
                   if key in config}
        if os.path.isfile(os.path.join(folder, 'vocab.txt')) or not os.path.isfile(os.path.join(folder,
                                                                                                 'tokenizer.json')):
            return cls(os.path.join(folder, 'vocab.txt'), **options, max_length=max_length)
        spec = read_json(os.path.join(folder, 'tokenizer.json'))
        model, normalizer = spec.get('model') or {}, spec.get('normalizer') or {}
        if model.get('type') != 'WordPiece' or normalizer.get('type', 'BertNormalizer') != 'BertNormalizer':
            raise ValueError(f'{folder}/tokenizer.json: not a BERT WordPiece tokenizer')
        options = {'do_lower_case': normalizer.get('lowercase', True), 'strip_accents': normalizer.get('strip_accents'),
                   'tokenize_chinese_chars': normalizer.get('handle_chinese_chars', True), **options}
        return cls(model['vocab'], **options, max_length=max_length)

    def basic_tokenize(self, text):
        """Text without special tokens -> whole words and punctuation marks."""
        text = ''.join(' ' if char in ' \t\n\r' or unicodedata.category(char) == 'Zs' else char
                       for char in text if not (ord(char) in (0, 0xFFFD) or (
                           char not in '\t\n\r' and unicodedata.category(char).startswith('C'))))
        if self.tokenize_chinese_chars:
            text = ''.join(f' {char} ' if _is_cjk(ord(char)) else char for char in text)
        words = []
        for word in unicodedata.normalize('NFC', text).split():
            word = word.lower() if self.do_lower_case else word
            if self.strip_accents:
                word = ''.join(c for c in unicodedata.normalize('NFD', word) if unicodedata.category(c) != 'Mn')
            words += re.sub(r'(.)', lambda m: f' {m[1]} ' if _is_punctuation(m[1]) else m[1], word).split()
        return words

    def wordpiece(self, word):
        """One word -> its greedy longest-match-first pieces, or ['[UNK]']."""
        if len(word) > 100:
            return ['[UNK]']
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and (('##' if start else '') + word[start:end]) not in self.vocab:
                end -= 1
            if end == start:
                return ['[UNK]']
            pieces.append(('##' if start else '') + word[start:end])
            start = end
        return pieces

    def tokenize(self, text):
        """Text -> WordPiece tokens (no [CLS] / [SEP])."""
        tokens = []
        for i, chunk in enumerate(self.special_pattern.split(text)):
            if i % 2:  # a special token written in the text
                tokens.append(chunk)
            else:
                tokens += [piece for word in self.basic_tokenize(chunk) for piece in self.wordpiece(word)]
        return tokens

    def encode(self, text, max_length=None):
        """Text -> ids [CLS] ... [SEP], the tokens truncated to max_length - 2, unpadded."""
        max_length = max_length or self.max_length
        ids = [self.vocab[token] for token in self.tokenize(text)][:max_length - 2]
        return [self.vocab['[CLS]'], *ids, self.vocab['[SEP]']]

    def __call__(self, texts, max_length=None):
        """A string or list of strings -> (B, max_length) int64 ids, padded with [PAD] on the right."""
        max_length = max_length or self.max_length
        rows = [self.encode(text, max_length) for text in ([texts] if isinstance(texts, str) else texts)]
        return torch.tensor([row + [self.vocab['[PAD]']] * (max_length - len(row)) for row in rows],
                            dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------------
# diffusers pipeline folders (model_index.json + one sub-folder per component), local or on the Hugging Face Hub

DIFFUSERS_WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
TRANSFORMERS_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
                          trained_betas=None, prediction_type='epsilon')  # diffusers' defaults for DDPM/DDIM/DPM++


def autoencoder_kl_from_diffusers(config, state_dict):
    """nets.AutoencoderKL of a diffusers AutoencoderKL folder (any of its attention key generations), strict, frozen."""
    _refuse_unsupported(config, {'act_fn': 'silu', 'use_quant_conv': True, 'use_post_quant_conv': True,
                                 'mid_block_add_attention': True, 'latents_mean': None, 'shift_factor': None},
                        'diffusers AutoencoderKL')
    keys = ('in_channels', 'out_channels', 'block_out_channels', 'layers_per_block', 'latent_channels',
            'norm_num_groups', 'scaling_factor')
    kwargs = {key: tuple(config[key]) if isinstance(config[key], list) else config[key]
              for key in keys if key in config}
    net = build_checked(lambda: AutoencoderKL(**kwargs), vae_state_dict_to_diffusers(state_dict), 'diffusers VAE')
    return net.eval().requires_grad_(False)


def diffusers_betas(scheduler, dtype=torch.float64):
    """The beta schedule of a scheduler config: 'linear' (DDPM, DiT), 'scaled_linear' (LDM: linear in sqrt(beta)),
    'squaredcos_cap_v2' (improved DDPM's cosine, beta <= 0.999) or trained_betas. diffusers builds them in float32;
    pass dtype=torch.float32 for its exact values."""
    T, start, end = scheduler['num_train_timesteps'], scheduler['beta_start'], scheduler['beta_end']
    if scheduler.get('trained_betas') is not None:
        return torch.tensor(scheduler['trained_betas'], dtype=dtype)
    if scheduler['beta_schedule'] == 'linear':
        return torch.linspace(start, end, T, dtype=dtype)
    if scheduler['beta_schedule'] == 'scaled_linear':
        return torch.linspace(start ** 0.5, end ** 0.5, T, dtype=dtype) ** 2
    if scheduler['beta_schedule'] == 'squaredcos_cap_v2':
        alpha_bar = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        return torch.tensor([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(T)], dtype=dtype)
    raise ValueError(f'beta_schedule {scheduler["beta_schedule"]!r} is not supported')


def _class_embedder_from(state_dict):
    """An nn.Embedding when a component's weights are one embedding table (LDM's ClassEmbedder), else None."""
    if len(state_dict) == 1:
        (key, weight), = state_dict.items()
        if re.fullmatch(r'(\w+\.)*(embedding|embedding_table)\.weight', key) and weight.ndim == 2:
            embedder = nn.Embedding(*weight.shape)
            embedder.weight.data.copy_(weight.float())
            return embedder.eval()
    return None


def load_diffusers_pipeline(source, cache_dir=None, skip_unknown=False):
    """The parts of a diffusers pipeline, from a local folder, `hf://owner/name[@revision]` or a bare Hub repo id
    (files fetched with hf_hub_download into the cache; offline, one line naming what to download and where).

    model_index.json names each component's class; the known ones become nets modules: DiTTransformer2DModel /
    Transformer2DModel (ada_norm_zero) -> DiT (dit_from_diffusers), UNet2DConditionModel / UNet2DModel -> UNet
    (unet_from_diffusers), AutoencoderKL -> AutoencoderKL, VQModel -> VQModel, LDMBertModel -> LDMBert, BertTokenizer
    -> WordPieceTokenizer, *Scheduler -> its scheduler_config.json; a component whose weights are a single embedding
    table is taken as the class embedder. Returns a dict: 'pipeline' (class name), 'network' and 'network_kind'
    ('dit' or 'unet'), 'autoencoder' (with 'autoencoder_kind' 'kl' or 'vq'), 'text_encoder', 'tokenizer',
    'class_embedder' (None where absent), 'scheduler' (the config over diffusers' defaults: num_train_timesteps,
    beta_start, beta_end, beta_schedule, prediction_type, ...; diffusers_betas gives the betas), 'id2label'
    ({int: str} from model_index.json or a component config, else None), 'components' (name -> [library, class]),
    'unsupported' (name -> why). A component of another class (a custom pipeline's own module, whose layout cannot
    be known from the files) raises ValueError naming it, unless skip_unknown, which records it in 'unsupported'.
    """
    root = resolve_source(source, ('model_index.json',), cache_dir)
    if not os.path.isdir(root):
        raise ValueError(f'{source}: a diffusers pipeline is a folder with model_index.json, not a file')
    index = read_json(os.path.join(root, 'model_index.json'))
    components = {name: value for name, value in index.items()
                  if not name.startswith('_') and isinstance(value, list) and len(value) == 2 and value[1]}
    for name, (library, class_name) in components.items():  # each names a sub-folder of the pipeline, nothing else
        if not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', name) or '..' in name or not isinstance(class_name, str):
            raise ValueError(f'{root}/model_index.json: component {name[:80]!r} is not a sub-folder name of the '
                             'pipeline (a path that leaves the folder is refused)')

    def fetch(name, files, optional=()):  # the component's folder, its files downloaded when source is a Hub repo
        if os.path.exists(source):
            return os.path.join(root, name)
        folder = resolve_source(source, [tuple(f'{name}/{f}' for f in alts) for alts in files], cache_dir)
        for file in optional:
            try:
                resolve_source(source, [f'{name}/{file}'], cache_dir)
            except WeightsNotFoundError as error:
                if '(HTTP 404' not in str(error):
                    raise
        return os.path.join(folder, name)

    parts = dict(pipeline=index.get('_class_name'), network=None, network_kind=None, autoencoder=None,
                 autoencoder_kind=None, text_encoder=None, tokenizer=None, class_embedder=None, scheduler=None,
                 id2label=None, components=components, unsupported={})
    id2label = index.get('id2label')
    for name, (library, class_name) in components.items():
        if class_name.endswith('Scheduler'):
            folder = fetch(name, [('scheduler_config.json',)])
            parts['scheduler'] = {**SCHEDULER_DEFAULTS, '_class_name': class_name,
                                  **read_json(os.path.join(folder, 'scheduler_config.json'))}
        elif class_name in ('BertTokenizer', 'BertTokenizerFast'):
            folder = fetch(name, [('vocab.txt', 'tokenizer.json')], ['tokenizer_config.json'])
            parts['tokenizer'] = WordPieceTokenizer.from_folder(folder)
        elif class_name == 'LDMBertModel':
            folder = fetch(name, [('config.json',), TRANSFORMERS_WEIGHTS])
            parts['text_encoder'] = ldmbert_from_config(read_json(os.path.join(folder, 'config.json')),
                                                        read_diffusers_weights(folder, TRANSFORMERS_WEIGHTS))
        else:
            builders = {'DiTTransformer2DModel': ('network', 'dit', dit_from_diffusers),
                        'Transformer2DModel': ('network', 'dit', dit_from_diffusers),
                        'UNet2DConditionModel': ('network', 'unet', unet_from_diffusers),
                        'UNet2DModel': ('network', 'unet', unet_from_diffusers),
                        'AutoencoderKL': ('autoencoder', 'kl', autoencoder_kl_from_diffusers),
                        'VQModel': ('autoencoder', 'vq', vqmodel_from_diffusers)}
            why = 'no weights'
            try:
                folder = fetch(name, [('config.json',), DIFFUSERS_WEIGHTS])
                config, state_dict = read_json(os.path.join(folder, 'config.json')), read_diffusers_weights(folder)
            except (WeightsNotFoundError, ValueError):
                if class_name in builders:
                    raise
                config, state_dict = {}, {}
                why = f'no config.json and {" / ".join(DIFFUSERS_WEIGHTS)} in {name}/ that nets could read'
            id2label = id2label or config.get('id2label')
            if class_name in builders:
                slot, kind, build = builders[class_name]
                parts[slot], parts[f'{slot}_kind'] = build({'_class_name': class_name, **config}, state_dict), kind
                continue
            parts['class_embedder'] = _class_embedder_from(state_dict)
            if parts['class_embedder'] is None:
                why = why if not state_dict else f'weights {", ".join(list(state_dict)[:4])} of unknown layout'
                message = (f'{source}: component {name!r} ({library}.{class_name}) is not supported: {why}; '
                           'the network, autoencoder, tokenizer/text encoder and scheduler of a pipeline load')
                if not skip_unknown:
                    raise ValueError(message)
                parts['unsupported'][name] = message
    try:
        parts['id2label'] = {int(key): str(value) for key, value in id2label.items()} if id2label else None
    except (AttributeError, TypeError, ValueError, OverflowError):
        raise ValueError(f'{source}: id2label is not a table of class numbers to names') from None
    return parts


# ----------------------------------------------------------------------------------------------------------------------
# DINOv2 (Oquab et al. 2023): the self-supervised ViT whose CLS features find training-set neighbours of samples

# The released backbones (facebookresearch/dinov2 hub/backbones.py, models/vision_transformer.py): all use patch 14,
# position embeddings for 518 px (37 x 37 patches), 64-wide heads, biases everywhere and LayerScale; g/14 swaps the GELU
# MLP for a SwiGLU. The `_reg4` models add 4 register tokens (Darcet et al. 2024) and interpolate position embeddings
# differently (see DINOv2.interpolate_pos_encoding).
DINOV2_SIZES = {
    'vits14': dict(embed_dim=384, depth=12, num_heads=6),
    'vitb14': dict(embed_dim=768, depth=12, num_heads=12),
    'vitl14': dict(embed_dim=1024, depth=24, num_heads=16),
    'vitg14': dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer='swiglu'),
}
DINOV2_CONFIGS = {  # DINOv2(**DINOV2_CONFIGS['dinov2_vitg14']) is the official hub model of that name
    **{f'dinov2_{size}': config for size, config in DINOV2_SIZES.items()},
    **{f'dinov2_{size}_reg4': {**config, 'num_register_tokens': 4, 'interpolate_antialias': True,
                               'interpolate_offset': 0.0} for size, config in DINOV2_SIZES.items()},
}
DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/{base}/{name}_pretrain.pth'


class DINOv2PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution: (B, 3, H, W) -> (B, H/p * W/p, D) tokens in row-major order."""

    def __init__(self, patch_size, embed_dim, in_channels=3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2LayerScale(nn.Module):
    """LayerScale (Touvron et al. 2021, CaiT): a learned per-channel gain on each residual branch."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DINOv2Mlp(nn.Module):
    """The ViT feed-forward: Linear -> exact (erf) GELU -> Linear."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DINOv2SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020) of ViT-g/14: w3(silu(x W1) * x W2), W1 and W2 packed into one `w12`.

    The hidden width is 2/3 of the MLP's, rounded up to a multiple of 8 (the official "swiglufused" layer).
    """

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class DINOv2Block(nn.Module):
    """Pre-norm transformer block, x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); LayerNorm eps 1e-6."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, ffn_layer='mlp'):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DiTAttention(dim, num_heads)  # the same timm Attention: fused qkv rows [q; k; v], then proj
        self.ls1 = DINOv2LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (DINOv2SwiGLU if ffn_layer == 'swiglu' else DINOv2Mlp)(dim, int(dim * mlp_ratio))
        self.ls2 = DINOv2LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """The DINOv2 ViT backbone (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR
    2024, arXiv:2304.07193; facebookresearch/dinov2 `DinoVisionTransformer`), inference only.

    Its state_dict keys and shapes equal those of the released `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` files
    (cls_token, pos_embed, register_tokens, mask_token, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1,
    norm2, mlp.fc1/fc2 or mlp.w12/w3, ls2}, norm), so they load with `load_state_dict(strict=True)`; `load_dinov2`
    builds the right size from a file. `mask_token` (iBOT's masked-patch token) is kept for that, unused here.

    forward(x): x (B, 3, H, W), H and W multiples of patch_size, already normalised as the caller's protocol wants
    (see dinov2_preprocess); returns the final-LayerNorm CLS token (B, embed_dim), the official `x_norm_clstoken`,
    which is also what the official `forward` returns (its head is the identity). forward_features(x) returns the
    official dict of normalised CLS / register / patch tokens.
    """

    def __init__(self, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, ffn_layer='mlp', patch_size=14,
                 img_size=518, num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1):
        super().__init__()
        if ffn_layer not in ('mlp', 'swiglu'):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', not {ffn_layer!r}")
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        registers = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.register_tokens = registers  # None without registers, as the official model (no key then)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = DINOv2PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList([DINOv2Block(embed_dim, num_heads, mlp_ratio, ffn_layer) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, height, width):
        """Position embeddings for the tokens x of an image of height x width pixels: the stored grid, resampled.

        As the official code: the stored embedding is used as is only for a square image with the stored number of
        patches; otherwise the grid is resized in fp32 with `scale_factor=((h + offset) / M, (w + offset) / M)` when
        interpolate_offset is non-zero (offset 0.1, no antialias: the original models) or to `size=(h, w)` (offset 0,
        antialias on: the `_reg4` models). The offset changes where the bicubic kernel samples, not only the size.
        """
        pos_embed = self.pos_embed
        num_patches = pos_embed.shape[1] - 1
        h, w = height // self.patch_size, width // self.patch_size
        if h * w == num_patches and height == width:
            return pos_embed
        M = math.isqrt(num_patches)
        grid = pos_embed[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)          # (1, D, M, M)
        if self.interpolate_offset:
            scale = ((h + self.interpolate_offset) / M, (w + self.interpolate_offset) / M)
            grid = F.interpolate(grid, scale_factor=scale, mode='bicubic', antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h, w), mode='bicubic', antialias=self.interpolate_antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)                               # (1, h * w, D)
        return torch.cat([pos_embed[:, :1].float(), grid], dim=1).to(x.dtype)    # in the tokens' dtype

    def forward_features(self, x):
        """Tokens after the last block: a dict with the official keys x_norm_clstoken (B, D), x_norm_regtokens
        (B, R, D), x_norm_patchtokens (B, H/p * W/p, D) and x_prenorm (B, 1 + R + H/p * W/p, D)."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f'DINOv2 needs a height and width that are multiples of {self.patch_size}, got {H}x{W} '
                             '(dinov2_preprocess pads images to such a size)')

        # Embed patches, prepend the CLS token, add position embeddings, then insert the registers after CLS.
        x = self.patch_embed(x)                                                # (B, H/p * W/p, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)            # (B, 1 + H/p * W/p, D)
        x = x + self.interpolate_pos_encoding(x, H, W)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)

        # Transformer blocks and the final LayerNorm.
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        R = self.num_register_tokens
        return {'x_norm_clstoken': x_norm[:, 0], 'x_norm_regtokens': x_norm[:, 1:1 + R],
                'x_norm_patchtokens': x_norm[:, 1 + R:], 'x_prenorm': x}

    def forward(self, x):
        return self.forward_features(x)['x_norm_clstoken']                    # (B, D)


def dinov2_config_from_state_dict(state_dict):
    """DINOv2 kwargs for a state dict in the official layout (sizes read off the tensors; heads are 64 wide in all
    released models). The `_reg4` models, recognised by their register_tokens, get the official hub's interpolation
    settings for them (antialias, no offset); the others offset 0.1 without antialias."""
    try:
        embed_dim = state_dict['cls_token'].shape[-1]
        patch_size = state_dict['patch_embed.proj.weight'].shape[-1]
        grid = math.isqrt(state_dict['pos_embed'].shape[1] - 1)
        depth = len({key.split('.')[1] for key in state_dict if key.startswith('blocks.')})
        swiglu = 'blocks.0.mlp.w12.weight' in state_dict
        hidden = 4 * embed_dim if swiglu else state_dict['blocks.0.mlp.fc1.weight'].shape[0]
    except (KeyError, IndexError) as error:
        raise ValueError(f'state dict does not look like a DINOv2 backbone (missing {error})') from None
    num_register_tokens = state_dict['register_tokens'].shape[1] if 'register_tokens' in state_dict else 0
    return dict(embed_dim=embed_dim, depth=depth, num_heads=embed_dim // 64, mlp_ratio=hidden / embed_dim,
                ffn_layer='swiglu' if swiglu else 'mlp', patch_size=patch_size, img_size=grid * patch_size,
                num_register_tokens=num_register_tokens, interpolate_antialias=num_register_tokens > 0,
                interpolate_offset=0.0 if num_register_tokens else 0.1)


def load_dinov2(path_or_name, cache_dir=None):
    """A released DINOv2 backbone, frozen, in eval mode on the CPU.

    path_or_name: a name of the official hub ('dinov2_vits14', 'dinov2_vitb14', 'dinov2_vitl14', 'dinov2_vitg14',
    each optionally with '_reg4', or '_reg' as torch.hub names them), downloaded once from dl.fbaipublicfiles.com into
    cache_dir (default default_cache_dir()); an http(s) URL (downloaded likewise); or a local .pth / .safetensors
    state dict in the official layout (the block-chunked layout of the official training checkpoints, blocks.C.N.*,
    is accepted too). Offline, raises WeightsNotFoundError with one line naming the URL and where to save it.
    Strict: every key must match.
    """
    source = os.fspath(path_or_name)
    if source.endswith('_reg') and source + '4' in DINOV2_CONFIGS:  # torch.hub's entry-point name of a _reg4 model
        source += '4'
    if source in DINOV2_CONFIGS:
        source = DINOV2_URL.format(base=source.removesuffix('_reg4'), name=source)
    url = source if source.startswith(('http://', 'https://')) else None
    if url:
        source = download_cached(source, cache_dir)
    elif not os.path.isfile(source):
        raise WeightsNotFoundError(f'DINOv2 weights not found: {source} (give a local file, a URL or one of the '
                                   f'official names {", ".join(DINOV2_CONFIGS)})')
    try:
        state_dict = load_weights_file(source)
    except ValueError as error:
        raise ValueError(cached_file_hint(str(error), url or source, source)) from None
    state_dict = {re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', key): value for key, value in state_dict.items()}
    net = build_checked(lambda: DINOv2(**dinov2_config_from_state_dict(state_dict)), state_dict, 'DINOv2')
    return net.eval().requires_grad_(False)


def dinov2_preprocess(images):
    """The input that giannisdaras/ambient-diffusion's find_dataset_neighbors.py feeds to DINOv2, from uint8 images.

    images: (B, C, H, W) uint8 (C = 3; C = 1 is repeated to 3 channels, where the official script fails). Returns
    (B, 3, H', W') float32 in [0, 1], H' and W' the next multiples of 14. The official lines it follows:
      - training/dataset.py `Dataset.__getitem__` (normalize=True, the default): `image / 127.5 - 1` in float32;
      - find_dataset_neighbors.py: `(pad_image(images) + 1) / 2.`, with dnnlib/util.py `pad_image`: reflect padding
        up to a multiple of 14 on each axis, the odd pixel going to the bottom/right.
    Nothing else: no resize to 224, no centre crop and no ImageNet mean/std normalisation (unlike the hub's usual
    transform), so a 32 x 32 CIFAR-10 image becomes 42 x 42 = 3 x 3 patches and a 64 x 64 image 70 x 70.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'dinov2_preprocess needs uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}')
    x = images.expand(-1, 3, -1, -1).float() / 127.5 - 1                   # (B, 3, H, W) in [-1, 1]
    pad_h, pad_w = -x.shape[2] % 14, -x.shape[3] % 14
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode='reflect')
    return (x + 1) / 2                                                      # (B, 3, H', W') in [0, 1]


@torch.no_grad()
def dinov2_features(model, images, normalize=True):
    """The feature find_dataset_neighbors.py compares, for uint8 images (B, C, H, W): (B, D) float32.

    The official script runs torch.hub's 'dinov2_vitg14' (no registers) on dinov2_preprocess(images) and keeps what
    its forward returns, the final-LayerNorm CLS token `x_norm_clstoken` (1536 wide), divided by its L2 norm
    (`--normalize`, default True; normalize=False gives the raw token).

    The official similarity rule, for each generated image g against the whole training set X:
        products = f(g) @ f(X).T                     # cosine similarity of the unit features
        neighbours = the 3 indices of the largest products (argsort, descending)
        max_products.pkl gets products.max(); softmax_products.pkl gets softmax(products).max() (temperature 1,
        over the whole training set)
    so memorisation is read off the largest cosine similarity.
    """
    device = next(model.parameters()).device
    features = model(dinov2_preprocess(images).to(device)).float()        # (B, D) x_norm_clstoken
    return features / features.norm(dim=1, keepdim=True) if normalize else features


# ----------------------------------------------------------------------------------------------------------------------
# Released EDM / ambient-diffusion checkpoints: EDM's network pickles and Hugging Face folders, read without running any
# code they carry, and the key maps from EDM's SongUNet / DhariwalUNet (NVlabs/edm training/networks.py) onto UNet


PersistentObject = collections.namedtuple(
    'PersistentObject', 'module_name class_name init_args init_kwargs state_dict attributes modules')
PersistentObject.__doc__ = """An object of a torch_utils.persistence class (EDM's persistent_class), rebuilt as data.

module_name: the official module that defines class_name ('training.networks', 'training.loss', 'training.augment';
'' for a class EDM does not have); init_args / init_kwargs: the constructor arguments it recorded; state_dict: its
parameters and persistent buffers with Module.state_dict() names, submodules included (empty for a non-module such as
a loss); attributes: its other plain attributes (e.g. sigma_data); modules: its persistent direct submodules, by name.
"""

EDM_CLASS_MODULES = {
    **{name: 'training.networks' for name in (
        'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding', 'SongUNet',
        'DhariwalUNet', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond')},
    **{name: 'training.loss' for name in ('VPLoss', 'VELoss', 'EDMLoss', 'AmbientLoss', 'AmbientVPLoss')},
    'AugmentPipe': 'training.augment',
}


class _PickledModule:
    """A torch.nn container (ModuleDict, ModuleList, Sequential) met in a pickle: its __dict__ is kept as data."""

    def __setstate__(self, state):
        self.state = state


class _Budget:
    """How many more objects the EDM pickle reader may build (set per file and thread by load_edm_pickle, relative to
    the file's size): shared references in a pickle cost one opcode each, but copying them out (as _plain and
    _module_state_dict do) costs their whole size, so a few hundred bytes could otherwise ask for gigabytes."""
    _local = threading.local()

    @classmethod
    def charge(cls, count=1):
        left = getattr(cls._local, 'left', None)
        if left is not None:
            cls._local.left = left - count
            if left - count < 0:
                raise pickle.UnpicklingError('it expands to more objects than its size allows (a pickle bomb?)')


def _expanded_size(data, limit):
    """The number of objects in data counted as a tree (a shared object once per reference), or an UnpicklingError
    as soon as it passes limit (or on a cycle): what any code that walks the result will meet."""
    sizes, stack = {}, [(data, False)]
    while stack:
        item, children_done = stack.pop()
        if isinstance(item, _PickledModule):
            children = [item.state]
        elif isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = list(item)
        else:
            continue
        key = id(item)
        if children_done:
            sizes[key] = 1 + sum(sizes.get(id(child), 1) for child in children)
            if sizes[key] > limit:
                raise pickle.UnpicklingError(f'it expands to more than {limit} objects (a pickle bomb?)')
        elif key in sizes:
            if sizes[key] is None:
                raise pickle.UnpicklingError('it holds a container that contains itself')
        else:
            sizes[key] = None
            stack.append((item, True))
            stack.extend((child, False) for child in children)
    return sizes.get(id(data), 1)


def _plain(value):
    """numpy scalars -> Python numbers, inside lists, tuples and dicts too (EDM records np.sqrt(0.5) and the like)."""
    _Budget.charge()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _module_state_dict(state):
    """Module.state_dict() of a pickled module's __dict__: its parameters, persistent buffers, then its submodules'."""
    tensors = {}
    skipped = state.get('_non_persistent_buffers_set') or set()
    buffers = [(name, buffer) for name, buffer in (state.get('_buffers') or {}).items() if name not in skipped]
    for name, tensor in [*(state.get('_parameters') or {}).items(), *buffers]:
        _Budget.charge()
        if tensor is not None:
            if not isinstance(tensor, torch.Tensor):
                raise pickle.UnpicklingError(f'parameter or buffer {name!r} is a {type(tensor).__name__}')
            tensors[name] = tensor
    for name, child in (state.get('_modules') or {}).items():
        if isinstance(child, PersistentObject):
            child_tensors = child.state_dict
        elif isinstance(child, _PickledModule):
            child_tensors = _module_state_dict(child.state)
        elif child is None:
            continue
        else:
            raise pickle.UnpicklingError(f'submodule {name!r} is a {type(child).__name__}')
        _Budget.charge(len(child_tensors))
        tensors.update({f'{name}.{key}': tensor for key, tensor in child_tensors.items()})
    return tensors


def _persistent_object_from_meta(meta):
    """Stands in for torch_utils.persistence._reconstruct_persistent_obj(meta). EDM execs meta['module_src'] (the
    source of the defining module) and builds the class from it; here the source is never run, only the recorded
    state is read: meta = {type: 'class', version, module_src, class_name, state: the object's __dict__}."""
    if not (isinstance(meta, dict) and meta.get('type') == 'class' and isinstance(meta.get('class_name'), str)
            and isinstance(meta.get('state'), dict)):
        raise pickle.UnpicklingError('a persistent object without the class record of torch_utils.persistence')
    state = meta['state']
    modules = {name: child for name, child in (state.get('_modules') or {}).items()
               if isinstance(child, PersistentObject)}
    attributes = {name: _plain(value) for name, value in state.items()
                  if not name.startswith('_') and name != 'training'
                  and not isinstance(value, (PersistentObject, _PickledModule, torch.Tensor))}
    return PersistentObject(
        module_name=EDM_CLASS_MODULES.get(meta['class_name'], ''), class_name=meta['class_name'],
        init_args=tuple(_plain(state.get('_init_args') or ())),
        init_kwargs=_plain(dict(state.get('_init_kwargs') or {})),
        state_dict=_module_state_dict(state), attributes=attributes, modules=modules)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 for CPU storages only, without requires_grad, hooks or metadata."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f'tensor data is a {type(storage).__name__}, not a torch storage')
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 62
               for n in (storage_offset, *size, *stride)) or len(size) != len(stride):
        raise pickle.UnpicklingError('a tensor with a size, stride or offset that is not a list of small integers')
    tensor = torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))
    try:
        check_tensor_sizes(tensor, 'tensor')
    except ValueError as error:
        raise pickle.UnpicklingError(str(error)) from None
    return tensor


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter, returning the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f'parameter data is a {type(data).__name__}')
    return data


def _load_storage_from_bytes(data):
    """torch.storage._load_from_bytes (how pickle.dump stores a tensor's storage: a small torch.save file), read
    with torch.load(weights_only=True) instead of a full unpickler."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError('storage bytes expected')
    _check_legacy_storage_size(data)
    storage = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f'storage bytes hold a {type(storage).__name__}')
    return storage


def _check_legacy_storage_size(data):
    """The storage bytes of a pickled tensor are a legacy torch.save file: a magic number, protocol and system-info
    pickles, then the storage's own pickle whose persistent id records its element count, which torch allocates
    before reading. Refuse a count larger than the bytes present (no storage element is smaller than a byte)."""
    import pickletools
    stream = io.BytesIO(data)
    try:
        for index in range(4):
            for opcode, arg, _ in pickletools.genops(stream):
                if index == 3 and isinstance(arg, int) and not isinstance(arg, bool) and arg > len(data):
                    raise pickle.UnpicklingError(f'a tensor storage declares {arg} elements in {len(data)} bytes')
    except ValueError as error:  # genops: a malformed pickle
        raise pickle.UnpicklingError(f'malformed tensor storage bytes ({error})') from None


# numpy dtypes that EDM pickles hold (numpy scalars such as np.float64(0.5) in recorded kwargs): plain type codes only.
_PLAIN_DTYPE_CODES = {'b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16'}


def _numpy_dtype(code, align=False, copy=True):
    """numpy.dtype(code, align, copy) as pickled by numpy, for plain number types only. A structured, object or
    subarray dtype (which a later BUILD could fill with attacker pointers) is refused."""
    if isinstance(code, bytes):
        code = code.decode('ascii', 'replace')
    if code not in _PLAIN_DTYPE_CODES or not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int)):
        raise pickle.UnpicklingError(f'a numpy dtype {code!r} that is not a plain number type')
    return np.dtype(code)


def _check_dtype_state(dtype, state):
    """The BUILD state numpy pickles with a plain dtype: (version, byte order, None, None, None, -1, -1, 0[, meta]).
    It is checked and dropped (the dtype was built whole from its type code), never passed to dtype.__setstate__."""
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
            and state[1] in ('<', '|', '=', b'<', b'|', b'=') and state[2:5] == (None, None, None)
            and state[5:8] in ((-1, -1, 0), (dtype.itemsize, dtype.alignment, 0))
            and (len(state) == 8 or not state[8])):
        raise pickle.UnpicklingError('a numpy dtype state other than a plain little-endian number type')


def _numpy_scalar(dtype, data):
    """numpy.core.multiarray.scalar for plain numeric dtypes only (an object dtype would unpickle arbitrary objects)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.names is not None or dtype.subdtype is not None \
            or dtype.str[1:] not in {np.dtype(code).str[1:] for code in _PLAIN_DTYPE_CODES} \
            or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError('a numpy scalar that is not a plain number')
    return np.frombuffer(data, dtype=dtype)[0]


# Every global an EDM / ambient-diffusion network-snapshot-*.pkl refers to, and what stands in for it. Each stand-in
# is safe to call with any arguments; everything else is refused.
EDM_PICKLE_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_object_from_meta,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
    ('torch.nn.modules.container', 'ModuleDict'): _PickledModule,
    ('torch.nn.modules.container', 'ModuleList'): _PickledModule,
    ('torch.nn.modules.container', 'Sequential'): _PickledModule,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('dnnlib.util', 'EasyDict'): dict,
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
}


class _EDMUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that BUILD can be checked. BUILD sets state only on the stand-ins for torch's
    module containers (_PickledModule, which keeps it as data); on an OrderedDict (a state dict's _metadata) and a
    plain numpy dtype it is checked and dropped; anything else (a class, a function, a dict, a tensor) is refused."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if type(inst) is _PickledModule:
            if not isinstance(state, dict):
                raise pickle.UnpicklingError(f'a module state that is a {type(state).__name__}')
            pickle._Unpickler.load_build(self)
            return
        if type(inst) is collections.OrderedDict and (state is None or isinstance(state, dict)):
            self.stack.pop()  # torch state dicts carry _metadata (versions of modules): not needed here
            return
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
            self.stack.pop()
            return
        name = getattr(inst, '__name__', None) if isinstance(inst, (type, types.FunctionType,
                                                                   types.BuiltinFunctionType)) else None
        raise pickle.UnpicklingError(f'it sets attributes of {name or "a " + type(inst).__name__}, which no EDM '
                                     'network snapshot does')

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module, name):
        if (module, name) not in EDM_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f'it refers to {module}.{name}, which no EDM network snapshot holds '
                                         '(unpickling it could run code), so it is not loaded')
        return EDM_PICKLE_GLOBALS[module, name]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('it holds persistent ids, which EDM network snapshots do not use')


def load_edm_pickle(path):
    """Read an EDM-style `network-snapshot-*.pkl` (NVlabs/edm training_loop.py: {'ema', 'loss_fn', 'augment_pipe',
    'dataset_kwargs'}; ambient-diffusion's training_loop.py stores 'ema' as a state dict) without running code.

    A restricted unpickler: the objects of persistent classes (torch_utils/persistence.py) become PersistentObject
    records and the source code pickled with them is never executed; tensors are rebuilt through
    torch.load(weights_only=True); any other global (os.system, a class to instantiate, ...) stops the load with a
    one-line ValueError. Returns the pickled dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f'network pickle not found: {path}')
    limit = 200_000 + os.path.getsize(path) // 16  # objects: a real snapshot holds a few thousand
    _Budget._local.left = limit
    try:
        with open(path, 'rb') as f:
            data = _EDMUnpickler(f).load()
        _expanded_size(data, limit)
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, KeyError, TypeError, ValueError,
            RuntimeError, struct.error, MemoryError, OverflowError) as error:
        reason = ' '.join(str(error).split()) or type(error).__name__
        raise ValueError(f'{path}: not loaded as an EDM network pickle: {reason}') from None
    finally:
        _Budget._local.left = None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: an EDM network pickle holds a dict, this one a {type(data).__name__}')
    return data


# UNet submodules -> EDM UNetBlock submodules (a UNetBlock holds the residual block and its attention).
_EDM_BLOCK_NAMES = {'in_layers.0': 'norm0', 'in_layers.2': 'conv0', 'emb_layers.1': 'affine',
                    'out_layers.0': 'norm1', 'out_layers.3': 'conv1', 'skip_connection': 'skip',
                    'norm': 'norm2', 'qkv': 'qkv', 'proj_out': 'proj'}


def _edm_module_names(config):
    """{UNet module: EDM module} for a UNet config of arch 'ddpmpp' (EDM's SongUNet) or 'adm' (EDM's DhariwalUNet).

    EDM names blocks by resolution (enc.32x32_block0, dec.16x16_in0, dec.32x32_up) in the order UNet numbers its own:
    its `_down` / `_up` blocks are our resampling blocks at the end of a level, its `in0` / `in1` our middle block.
    A residual block and the attention after it (our `.0` and `.1`) are one EDM UNetBlock.
    """
    R, channel_mult, num_blocks = config['img_resolution'], config['channel_mult'], config['num_blocks']
    song = config['arch'] == 'ddpmpp'
    names = {'time_embed.0': 'map_layer0', 'time_embed.2': 'map_layer1', 'map_augment': 'map_augment',
             'map_label' if song else 'label_emb': 'map_label', 'input_blocks.0.0': f'enc.{R}x{R}_conv',
             'out.0': f'dec.{R}x{R}_aux_norm' if song else 'out_norm',
             'out.2': f'dec.{R}x{R}_aux_conv' if song else 'out_conv'}
    i = 1
    for level in range(len(channel_mult)):
        res = R >> level
        if level > 0:
            names[f'input_blocks.{i}.0'] = f'enc.{res}x{res}_down'
            i += 1
        for idx in range(num_blocks):
            names[f'input_blocks.{i}.0'] = names[f'input_blocks.{i}.1'] = f'enc.{res}x{res}_block{idx}'
            i += 1
    low = R >> (len(channel_mult) - 1)
    names['middle_block.0'] = names['middle_block.1'] = f'dec.{low}x{low}_in0'
    names['middle_block.2'] = f'dec.{low}x{low}_in1'
    j = 0
    for level in reversed(range(len(channel_mult))):
        res = R >> level
        for idx in range(num_blocks + 1):
            attention = res in config['attn_resolutions'] and (idx == num_blocks or not song)
            names[f'output_blocks.{j}.0'] = names[f'output_blocks.{j}.1'] = f'dec.{res}x{res}_block{idx}'
            if level > 0 and idx == num_blocks:  # EDM names the upsampling block after the resolution it makes
                names[f'output_blocks.{j}.{1 + attention}'] = f'dec.{2 * res}x{2 * res}_up'
            j += 1
    return names


def _unet_to_edm_keys(config):
    """{UNet state_dict key: EDM key} for every parameter of UNet(**config) (EDM SongUNet / DhariwalUNet naming)."""
    names = _edm_module_names(config)
    with torch.device('meta'):
        keys = list(UNet(**config).state_dict())
    mapping = {}
    for key in keys:
        parts = key.split('.')
        prefix = next('.'.join(parts[:n]) for n in (3, 2, 1) if '.'.join(parts[:n]) in names)
        inner = key[len(prefix) + 1:].rsplit('.', 1)   # ['in_layers.2', 'weight'] or ['weight']
        edm_inner = [_EDM_BLOCK_NAMES[inner[0]], inner[1]] if len(inner) == 2 else inner
        mapping[key] = '.'.join([names[prefix], *edm_inner])
    return mapping


def _edm_resample_filters(config):
    """The EDM keys of the [1, 1] resampling filters (buffers) of the up/down blocks; UNet's resampling is fixed."""
    blocks = {name for name in _edm_module_names(config).values() if name.endswith(('_down', '_up'))}
    return {f'{block}.{conv}.resample_filter' for block in blocks for conv in ('conv0', 'skip')}


def _attention_heads(config, channels):
    head_channels = config.get('num_head_channels', -1)
    return channels // head_channels if head_channels > 0 else config.get('num_heads', 1)


def _qkv_rows(tensor, heads, new_order, to_edm):
    """Reorder the 3C output rows of a qkv projection (weight, gate weight or bias) between EDM's layout, rows
    ordered (head, channel, q/k/v), and UNet's, (head, q/k/v, channel) or with new_order (q/k/v, head, channel)."""
    sizes = dict(head=heads, channel=tensor.shape[0] // (3 * heads), qkv=3)
    ours = ('qkv', 'head', 'channel') if new_order else ('head', 'qkv', 'channel')
    source, target = (ours, ('head', 'channel', 'qkv')) if to_edm else (('head', 'channel', 'qkv'), ours)
    grouped = tensor.reshape(*(sizes[axis] for axis in source), *tensor.shape[1:])
    order = [source.index(axis) for axis in target]
    return grouped.permute(*order, *range(3, grouped.ndim)).reshape(tensor.shape)


def _convert_edm_tensor(key, tensor, config, to_edm):
    """One tensor between the two layouts: attention projections are 1x1 Conv2d in EDM and Conv1d here (and qkv rows
    are reordered), DhariwalUNet's class map is a Linear (emb, classes), ours an Embedding (classes, emb)."""
    if '.qkv.' in key or '.proj_out.' in key:
        if '.qkv.' in key:
            heads = _attention_heads(config, tensor.shape[0] // 3)
            tensor = _qkv_rows(tensor, heads, config.get('use_new_attention_order', False), to_edm)
        if tensor.ndim > 1:
            tensor = tensor[..., None] if to_edm else tensor[..., 0]
    elif key == 'label_emb.weight':
        tensor = tensor.t()
    return tensor.contiguous()


def _strip_edm_prefixes(state_dict):
    """Model keys of an EDM state dict: without torch.compile's '_orig_mod.' (ambient-diffusion's eval.py strips it
    too) and without the precond's 'model.' when every key has it."""
    state_dict = {key.replace('_orig_mod.', ''): value for key, value in state_dict.items()}
    if state_dict and all(key.startswith('model.') for key in state_dict):
        state_dict = {key[len('model.'):]: value for key, value in state_dict.items()}
    return state_dict


def _edm_to_unet_state_dict(state_dict, config, model_type):
    state_dict = _strip_edm_prefixes(state_dict)
    config = config or edm_unet_config(state_dict)
    arch = 'ddpmpp' if model_type == 'SongUNet' else 'adm'
    if config['arch'] != arch:
        raise ValueError(f'a {model_type} state dict maps onto UNet(arch={arch!r}), not arch={config["arch"]!r}')
    from_edm = {edm_key: key for key, edm_key in _unet_to_edm_keys(config).items()}
    filters = _edm_resample_filters(config)
    missing = [key for key in from_edm if key not in state_dict]
    unexpected = [key for key in state_dict if key not in from_edm and key not in filters]
    if missing or unexpected:
        raise ValueError(f'{model_type} state dict does not match {config["arch"]} UNet: missing {missing[:3]} '
                         f'({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})')
    for key in filters & set(state_dict):
        if not torch.equal(state_dict[key].float().cpu(), torch.full((1, 1, 2, 2), 0.25)):
            raise ValueError(f'{key}: a resampling filter other than [1, 1] (ncsnpp: [1, 3, 3, 1]) is not supported')
    return {key: _convert_edm_tensor(key, state_dict[edm_key], config, to_edm=False)
            for edm_key, key in from_edm.items()}


def _unet_to_edm_state_dict(net_or_state_dict, config, arch):
    if isinstance(net_or_state_dict, nn.Module):
        config, state_dict = net_or_state_dict.config, net_or_state_dict.state_dict()
    else:
        state_dict = net_or_state_dict
    if config is None or config['arch'] != arch:
        raise ValueError(f'pass a UNet(arch="{arch}") or its state dict with its config')
    converted = {edm_key: _convert_edm_tensor(key, state_dict[key], config, to_edm=True)
                 for key, edm_key in _unet_to_edm_keys(config).items()}
    converted.update({key: torch.full((1, 1, 2, 2), 0.25) for key in sorted(_edm_resample_filters(config))})
    return converted


def songunet_to_unet_state_dict(state_dict, config=None):
    """State dict of EDM's SongUNet (NVlabs/edm training/networks.py; ambient-diffusion's gated variant, its
    training/networks.py, maps to gated=True) -> UNet(arch='ddpmpp') state dict. Keys may carry the precond's
    'model.' prefix. config (UNet kwargs) defaults to edm_unet_config(state_dict). Strict: a missing or unexpected
    key raises ValueError."""
    return _edm_to_unet_state_dict(state_dict, config, 'SongUNet')


def unet_to_songunet_state_dict(net_or_state_dict, config=None):
    """UNet(arch='ddpmpp') (or its state dict plus config) -> EDM SongUNet state dict (keys without 'model.'),
    with the [1, 1] resample_filter buffers EDM's up/down convolutions carry."""
    return _unet_to_edm_state_dict(net_or_state_dict, config, 'ddpmpp')


def dhariwal_to_unet_state_dict(state_dict, config=None):
    """State dict of EDM's DhariwalUNet (NVlabs/edm training/networks.py, ADM re-implemented; ambient-diffusion's
    gated variant maps to gated=True) -> UNet(arch='adm') state dict, with edm_unet_config's adm flags (scale-shift
    norm, resblock up/down, 64 channels per head, GroupNorm groups of >= 4 channels)."""
    return _edm_to_unet_state_dict(state_dict, config, 'DhariwalUNet')


def unet_to_dhariwal_state_dict(net_or_state_dict, config=None):
    """UNet(arch='adm') (or its state dict plus config) -> EDM DhariwalUNet state dict (keys without 'model.')."""
    return _unet_to_edm_state_dict(net_or_state_dict, config, 'adm')


# SongUNet settings that UNet(arch='ddpmpp') expresses; EDM's ncsnpp (Fourier embedding, residual encoder, FIR
# filter [1, 3, 3, 1], doubled noise channels) and the skip encoder/decoder are refused.
_SONGUNET_SUPPORTED = dict(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                           channel_mult_noise=1, resample_filter=[1, 1], channel_mult_emb=4)


def edm_unet_config(state_dict, model_kwargs=None):
    """UNet kwargs for an EDM SongUNet (-> arch 'ddpmpp') or DhariwalUNet (-> 'adm') state dict, read from its keys and
    shapes; model_kwargs (the recorded init kwargs, when known) add dropout and label_dropout and are checked for
    settings UNet cannot express (ncsnpp), which raise ValueError with one line."""
    state_dict = _strip_edm_prefixes(state_dict)
    model_kwargs = model_kwargs or {}
    for key in ('dropout', 'label_dropout'):
        if key in model_kwargs and (isinstance(model_kwargs[key], bool)
                                    or not isinstance(model_kwargs[key], (int, float))):
            raise ValueError(f'EDM network kwarg {key}={model_kwargs[key]!r} is not a number')
    for key, supported in _SONGUNET_SUPPORTED.items():
        if key in model_kwargs and list(np.atleast_1d(model_kwargs[key])) != list(np.atleast_1d(supported)):
            raise ValueError(f'EDM network with {key}={model_kwargs[key]!r} (ncsnpp-style) is not supported by '
                             'nets.UNet (only EDM ddpmpp SongUNet and DhariwalUNet, gated or not)')
    if 'map_noise.freqs' in state_dict or any('_aux_' in key and '_aux_norm' not in key and '_aux_conv' not in key
                                              for key in state_dict):
        raise ValueError('EDM ncsnpp network (Fourier embedding / residual or skip encoder) is not supported by '
                         'nets.UNet (only EDM ddpmpp SongUNet and DhariwalUNet, gated or not)')
    try:
        song = 'out_conv.weight' not in state_dict
        R = next(int(m[1]) for m in (re.fullmatch(r'enc\.(\d+)x\1_conv\.weight', key) for key in state_dict) if m)
        resolutions = sorted({int(m[1]) for m in (re.match(r'enc\.(\d+)x\1_', key) for key in state_dict) if m},
                             reverse=True)
        model_channels = state_dict['map_layer0.weight'].shape[1]
        widths = [state_dict[f'enc.{res}x{res}_block0.conv0.weight'].shape[0] for res in resolutions]
        num_blocks = len({m[1] for m in (re.match(rf'enc\.{R}x{R}_block(\d+)\.', key) for key in state_dict) if m})
        out_weight = state_dict[f'dec.{R}x{R}_aux_conv.weight' if song else 'out_conv.weight']
        first_conv = state_dict[f'enc.{R}x{R}_conv.weight']
    except StopIteration:
        raise ValueError('not an EDM SongUNet / DhariwalUNet state dict (no enc.RxR_conv.weight)') from None
    except KeyError as error:
        raise ValueError(f'not an EDM SongUNet / DhariwalUNet state dict (no {error})') from None
    emb_channels = state_dict['map_layer0.weight'].shape[0]
    if emb_channels != 4 * model_channels or (song and first_conv.shape[0] != model_channels):
        raise ValueError('EDM network with channel_mult_emb != 4 or channel_mult_noise != 1: not supported by UNet')
    config = dict(
        arch='ddpmpp' if song else 'adm', img_resolution=R, in_channels=first_conv.shape[1],
        out_channels=out_weight.shape[0], model_channels=model_channels,
        channel_mult=tuple(w // model_channels if w % model_channels == 0 else w / model_channels for w in widths),
        num_blocks=num_blocks,
        attn_resolutions=tuple(res for res in resolutions if f'enc.{res}x{res}_block0.qkv.weight' in state_dict),
        dropout=float(model_kwargs.get('dropout', 0.0)),
        label_dim=state_dict['map_label.weight'].shape[1] if 'map_label.weight' in state_dict else 0,
        augment_dim=state_dict['map_augment.weight'].shape[1] if 'map_augment.weight' in state_dict else 0)
    config['gated'] = any(key.endswith('.gate_weight') for key in state_dict)  # ambient-diffusion's networks.py
    if song:
        config.update(num_heads=1, label_dropout=float(model_kwargs.get('label_dropout', 0.0)))
    else:  # EDM's DhariwalUNet: FiLM, resampling ResBlocks, 64 channels per head, GroupNorm groups of >= 4 channels
        config.update(num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                      use_new_attention_order=False, norm_min_group_size=4)
    return config


# EDM's preconditioners and their constructor defaults (training/networks.py), which a recorded init_kwargs omits.
EDM_PRECOND_DEFAULTS = {
    'EDMPrecond': dict(label_dim=0, use_fp16=False, sigma_min=0.0, sigma_max=float('inf'), sigma_data=0.5,
                       model_type='DhariwalUNet'),
    'VPPrecond': dict(label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
                      model_type='SongUNet'),
    'VEPrecond': dict(label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100.0, model_type='SongUNet'),
    'iDDPMPrecond': dict(label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000, model_type='DhariwalUNet'),
}


def _read_edm_pickle_network(path):
    """(model state dict, precond class, precond kwargs, extra info) of an EDM / ambient-diffusion pickle."""
    data = load_edm_pickle(path)
    ema = data.get('ema')
    options_path = os.path.join(os.path.dirname(os.path.abspath(path)), 'training_options.json')
    training_options = None
    if os.path.isfile(options_path):
        training_options = read_json(options_path)
    extra = dict(training_options=training_options, dataset_kwargs=data.get('dataset_kwargs'))
    for name in ('loss_fn', 'augment_pipe'):
        record = data.get(name)
        extra[name] = dict(class_name=record.class_name, **record.attributes) if isinstance(record, PersistentObject) \
            else None
    if isinstance(ema, PersistentObject):  # EDM: the EMA network itself, a persistent precond object
        precond, kwargs, state_dict = ema.class_name, {**ema.init_kwargs, **ema.attributes}, ema.state_dict
    elif isinstance(ema, dict) and ema and all(isinstance(value, torch.Tensor) for value in ema.values()):
        # ambient-diffusion: ema.state_dict(); its eval.py rebuilds the precond from training_options.json.
        network_kwargs = dict((training_options or {}).get('network_kwargs') or {})
        precond = network_kwargs.pop('class_name', 'training.networks.EDMPrecond').rsplit('.', 1)[-1]
        kwargs, state_dict = network_kwargs, ema
        dataset_kwargs = (training_options or {}).get('dataset_kwargs') or data.get('dataset_kwargs') or {}
        if dataset_kwargs.get('resolution') is not None:
            kwargs['img_resolution'] = dataset_kwargs['resolution']
    else:
        raise ValueError(f'{path}: no network under "ema" (found {type(ema).__name__})')
    return state_dict, precond, kwargs, extra


def _read_hf_network(folder):
    """(model state dict, 'EDMPrecond', precond kwargs, extra info) of a folder written by huggingface_hub's
    PyTorchModelHubMixin for ambient-laws' EDMPrecond: config.json holds its init kwargs (the UNet's among them),
    model.safetensors (older hub versions: pytorch_model.bin) its state dict, UNet keys under 'model.'."""
    config_path = os.path.join(folder, 'config.json')
    weights = [os.path.join(folder, name) for name in ('model.safetensors', 'pytorch_model.bin')]
    weights = [path for path in weights if os.path.isfile(path)]
    if not os.path.isfile(config_path) or not weights:
        raise WeightsNotFoundError(f'{folder}: a Hugging Face checkpoint needs config.json and model.safetensors')
    kwargs = read_json(config_path)
    kwargs.pop('class_name', None)  # ambient-laws' generate.py sets it to training.networks.EDMPrecond
    return load_weights_file(weights[0]), 'EDMPrecond', kwargs, dict(training_options=None)


def load_edm_network(source, cache_dir=None):
    """Build a UNet from a released EDM-family checkpoint and return (unet in eval mode, info).

    source: an EDM / ambient-diffusion `network-snapshot-*.pkl` (local path or http(s) URL; a training_options.json
    beside a local pickle is read), or a Hugging Face checkpoint of ambient-laws (repo id `owner/name`,
    `hf://owner/name[@revision]`, or a local folder with config.json + model.safetensors). The network inside
    (SongUNet ddpmpp or DhariwalUNet, plain or with ambient-diffusion's gated convolutions) is mapped onto UNet and
    loaded strictly; ncsnpp and other settings UNet cannot express raise ValueError. The preconditioning is left to
    the caller:

    info: format ('edm-pickle' | 'huggingface'), path, precond (class name: EDMPrecond, VPPrecond, VEPrecond,
    iDDPMPrecond), precond_kwargs (its constructor arguments with EDM's defaults filled in: img_resolution,
    img_channels (ambient-diffusion: image + mask channels), label_dim, use_fp16, sigma_min, sigma_max, sigma_data,
    model_type, the model's kwargs; `gated` for ambient-diffusion's gated networks), model_type, gated (bool),
    unet_config (UNet kwargs), training_options (dict or None), and for pickles dataset_kwargs, loss_fn and
    augment_pipe (class name and attributes, or None).
    """
    path = resolve_source(source, ['config.json', ('model.safetensors', 'pytorch_model.bin')], cache_dir)
    if os.path.isdir(path):
        state_dict, precond, kwargs, extra = _read_hf_network(path)
        fmt = 'huggingface'
    else:
        try:
            state_dict, precond, kwargs, extra = _read_edm_pickle_network(path)
        except ValueError as error:
            raise ValueError(cached_file_hint(str(error), source, path)) from None
        fmt = 'edm-pickle'
    if precond not in EDM_PRECOND_DEFAULTS:
        known = ', '.join(EDM_PRECOND_DEFAULTS)
        raise ValueError(f'{path}: unknown EDM preconditioning {precond!r} (known: {known})')
    state_dict = {key.replace('_orig_mod.', ''): value for key, value in state_dict.items()}
    model_state = {key[len('model.'):]: value for key, value in state_dict.items() if key.startswith('model.')}
    config = edm_unet_config(model_state, kwargs)
    model_type = 'SongUNet' if config['arch'] == 'ddpmpp' else 'DhariwalUNet'
    precond_kwargs = {**EDM_PRECOND_DEFAULTS[precond], **_plain(kwargs), 'model_type': model_type,
                      'img_resolution': config['img_resolution'], 'img_channels': config['in_channels'],
                      'label_dim': config['label_dim']}
    if config['gated'] or 'gated' in kwargs:  # a kwarg of ambient-diffusion's preconds only (default True there)
        precond_kwargs['gated'] = config['gated']
    for key in ('sigma_min', 'sigma_max', 'sigma_data', 'beta_d', 'beta_min', 'M', 'epsilon_t', 'C_1', 'C_2'):
        value = precond_kwargs.get(key)
        if key in precond_kwargs and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isnan(value)):
            raise ValueError(f'{path}: {key} is {value!r}, not a number')
    unet_state = _edm_to_unet_state_dict(model_state, config, model_type)
    net = build_checked(lambda: UNet(**config), unet_state, path)
    info = dict(format=fmt, path=path, precond=precond, precond_kwargs=precond_kwargs, model_type=model_type,
                gated=config['gated'], unet_config=config, **extra)
    return net.eval(), info


# ----------------------------------------------------------------------------------------------------------------------
# Released checkpoints


def load_network(path, **overrides):
    """Build the network of a released checkpoint and load its weights strictly.

    Accepts a guided-diffusion / DDPM-IP `.pt` (a plain UNetModel state dict; `overrides` as in
    adm_config_from_state_dict) or a DiT `.pt` (facebookresearch/DiT: a plain state dict, or a training checkpoint
    whose 'ema' entry is used, as DiT's find_model does; `overrides` as in dit_from_state_dict). Returns the module
    in eval mode on the CPU.
    """
    state_dict = load_weights_file(path)
    if 'ema' in state_dict and isinstance(state_dict['ema'], dict):
        state_dict = state_dict['ema']
    if 'x_embedder.proj.weight' in state_dict:
        net = dit_from_state_dict(state_dict, **overrides)
    elif 'input_blocks.0.0.weight' in state_dict and 'out.2.weight' in state_dict:
        net = build_checked(lambda: UNet(**adm_config_from_state_dict(state_dict, **overrides)), state_dict, path)
    else:
        raise ValueError(f'{path}: not a guided-diffusion/DDPM-IP UNet or DiT checkpoint '
                         f'(first keys: {", ".join(list(state_dict)[:3])})')
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Official files of ambient-diffusion and ambient-laws (ambient.py, ambient_laws.py)

AMBIENT_CORRUPTION_KEYS = ('corruption_probability', 'delta_probability', 'mask_full_rgb', 'corruption_pattern')


def read_json_source(source, cache_dir=None):
    """A JSON file (training_options.json) from a path or an http(s) URL (downloaded once into the cache):
    FileNotFoundError or ValueError with one line when it is missing, cannot be downloaded or is broken."""
    if str(source).startswith(('http://', 'https://')):
        try:
            source = resolve_source(source, cache_dir=cache_dir)
        except Exception as error:  # offline, 404, a size mismatch: nets' message names the URL and the path
            raise ValueError(' '.join(str(error).split())) from None
    if not os.path.exists(source):
        raise FileNotFoundError(f'{source} does not exist')
    options = read_json(source)
    if not isinstance(options, dict):
        raise ValueError(f'{source}: expected a JSON object, got a {type(options).__name__}')
    return options


def load_ambient_pickle(path, source=None, training_options=None, cache_dir=None):
    """An official ambient-diffusion network-snapshot-*.pkl -> (UNet in eval mode, ambient.py network config),
    read without running pickled code (load_edm_network). The corruption settings come from training_options
    (a dict), else the training_options.json beside the pickle (also beside a URL `source`), else the official
    eval.py defaults (p = 0.4, delta = 0.1, mask_full_rgb False, dust). One-line ValueError otherwise."""
    source = str(source or path)
    try:
        unet, info = load_edm_network(path)
    except Exception as error:  # not a pickle, or objects other than the network's
        raise ValueError(f'cannot load {source} ({" ".join(str(error).split())})') from None
    if info.get('precond') != 'EDMPrecond':
        raise ValueError(f'{source} holds a {info.get("precond")} network; ambient.py samples EDMPrecond networks '
                         '(official --precond=ambient or edm)')
    options = training_options or info.get('training_options')
    if options is None and source.startswith(('http://', 'https://')):
        with contextlib.suppress(Exception):  # a URL without training_options.json beside it: official defaults
            options = read_json_source(source.rsplit('/', 1)[0] + '/training_options.json', cache_dir)
    options = options if isinstance(options, dict) else {}
    dataset, precond = options.get('dataset_kwargs') or {}, info.get('precond_kwargs', {})
    loss = str((options.get('loss_kwargs') or {}).get('class_name', '')) or str(info.get('loss_fn', ''))
    ambient = 'Ambient' in loss or (not loss and unet.in_channels == 6)  # image + mask channels
    defaults = dict(corruption_probability=0.4, delta_probability=0.1, mask_full_rgb=False,
                    corruption_pattern='dust')
    net_config = dict(unet=dict(unet.config), precond='ambient' if ambient else 'edm',
                      sigma_data=precond.get('sigma_data', 0.5), sigma_min=precond.get('sigma_min', 0),
                      sigma_max=precond.get('sigma_max', float('inf')),
                      channels=unet.in_channels // 2 if ambient else unet.in_channels,
                      **{key: dataset.get(key, value) for key, value in defaults.items()}, source=source)
    net_config['mask_full_rgb'] = bool(net_config['mask_full_rgb'])
    return unet, net_config


def ambient_training_options(cfg, net_config=None, num_images=None, run_dir=None):
    """The official train.py's training_options.json (what its --dry-run prints and its eval.py reads with
    --training_options_loc) for an ambient.py Config (object or dict of its fields). Fields that need the data
    (resolution, max_size) are None without net_config / num_images."""
    cfg = types.SimpleNamespace(**(cfg if isinstance(cfg, dict) else vars(cfg)))
    unet = net_config['unet'] if net_config else \
        dict(UNET_PRESETS['ddpmpp-cifar10' if cfg.arch == 'ddpmpp' else cfg.arch])
    channel_mult = [int(c) for c in cfg.cres.split(',')] if cfg.cres else list(unet['channel_mult'])
    max_size = None if num_images is None else min(num_images, cfg.max_size or num_images)
    options = dict(
        max_grad_norm=cfg.max_grad_norm or None,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=cfg.data, use_labels=cfg.cond,
                            xflip=cfg.xflip, cache=True, corruption_probability=cfg.corruption_probability,
                            delta_probability=cfg.delta_probability, mask_full_rgb=cfg.mask_full_rgb,
                            corruption_pattern=cfg.corruption_pattern,
                            resolution=unet['img_resolution'] if net_config else None, max_size=max_size),
        data_loader_kwargs=dict(pin_memory=True, num_workers=cfg.workers, prefetch_factor=2),
        network_kwargs=dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                            decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                            model_channels=cfg.cbase or unet['model_channels'], channel_mult=channel_mult,
                            gated=cfg.gated, class_name='training.networks.EDMPrecond', dropout=cfg.dropout,
                            use_fp16=False, **(dict(augment_dim=9) if cfg.augment > 0 else {})),
        loss_kwargs=dict(class_name='training.loss.AmbientLoss', norm=cfg.norm) if cfg.precond == 'ambient' else
        dict(class_name='training.loss.EDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.AdamW' if cfg.weight_decay > 0 else 'torch.optim.Adam',
                              lr=cfg.lr, betas=[0.9, 0.999], eps=1e-8,
                              **(dict(weight_decay=cfg.weight_decay) if cfg.weight_decay > 0 else {})),
        total_kimg=max(int(cfg.kimg), 1), ema_halflife_kimg=int(cfg.ema * 1000), batch_size=cfg.batch,
        batch_gpu=cfg.batch_gpu or None, loss_scaling=cfg.ls, cudnn_benchmark=cfg.bench, kimg_per_tick=cfg.tick,
        snapshot_ticks=cfg.snap, state_dump_ticks=cfg.dump, seed=cfg.seed, run_dir=run_dir)
    if cfg.augment > 0:
        options['augment_kwargs'] = dict(class_name='training.augment.AugmentPipe', p=cfg.augment, xflip=1e8,
                                         yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    if cfg.transfer:
        options.update(resume_pkl=cfg.transfer, ema_rampup_ratio=None)
    return options


# ambient-laws

def read_ambient_laws_checkpoint(path, kind='snapshot'):
    """An ambient_laws.py network snapshot (kind 'snapshot': ema, net_kwargs) or training state (kind 'state': also
    net, optimizer, cur_nimg, cur_tick, config), read with weights_only=True, its state dicts as plain dicts (attributes
    a file set on them dropped). FileNotFoundError or ValueError with one line naming the file and the cause."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{path} is empty (0 bytes, a write that was cut short): pass another file')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        cause = (str(error).strip().splitlines() or ['no reason'])[0]
        raise ValueError(f'{path} is not a checkpoint written by ambient_laws.py ({type(error).__name__}: {cause})'
                         ) from None
    need = ('ema', 'net_kwargs') + (('net', 'optimizer', 'cur_nimg', 'cur_tick', 'config') if kind == 'state' else ())
    missing = [key for key in need if not isinstance(data, dict) or key not in data]
    if missing:
        hint = (f': it is a network snapshot, not a training state; pass training-state-*.pt, or --transfer={path} '
                'to start from its weights') if kind == 'state' and missing[0] != 'ema' else ''
        raise ValueError(f'{path} has no {", ".join(missing)}{hint}')
    data = dict(data)
    for key in ('ema', 'net') if kind == 'state' else ('ema',):
        if not isinstance(data[key], dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                      for k, v in data[key].items()):
            raise ValueError(f'{path}: {key} is not a dict of named tensors')
        data[key] = dict(data[key])
    config, kwargs = data.get('config', {}), data['net_kwargs']
    if not isinstance(kwargs, dict) or not isinstance(config, dict) \
            or not isinstance(config.get('sigma_data', 0.5), (int, float)):
        raise ValueError(f'{path}: net_kwargs and config must be dicts (sigma_data a number)')
    data['net_kwargs'], data['config'] = dict(kwargs), dict(config)
    return data


def load_ambient_laws_release(source):
    """A released ambient-laws network (an EDM-style .pkl, path or URL, read without running its code; a Hugging Face
    repo id, hf:// path or folder) -> (UNet, EDMPrecond kwargs sigma_data/sigma_min/sigma_max, config dict). One-line
    ValueError for a network of another preconditioning."""
    unet, info = load_edm_network(source)
    if info.get('precond') != 'EDMPrecond' or info.get('gated'):
        raise ValueError(f'{source} holds a {"gated " if info.get("gated") else ""}{info.get("precond")} network; '
                         'ambient_laws.py samples EDMPrecond networks (as ambient-laws trains them)')
    kwargs = info.get('precond_kwargs') or {}
    precond = dict(sigma_data=kwargs.get('sigma_data', 0.5), sigma_min=kwargs.get('sigma_min', 0.0),
                   sigma_max=kwargs.get('sigma_max', float('inf')))
    return unet, precond, dict(sigma_data=precond['sigma_data'], format=info.get('format'),
                               training_options=info.get('training_options'))


def _augment_affine(ref, a=1.0, b=0.0, c=0.0, d=1.0, tx=0.0, ty=0.0):
    """(B, 3, 3) matrices [[a, b, tx], [c, d, ty], [0, 0, 1]]; entries (B,) tensors or numbers."""
    entries = [v if torch.is_tensor(v) else torch.full_like(ref, v)
               for v in (a, b, tx, c, d, ty, 0.0, 0.0, 1.0)]
    return torch.stack(entries, dim=-1).reshape(-1, 3, 3)


def _augment_rotate(theta):
    return _augment_affine(theta, theta.cos(), -theta.sin(), theta.sin(), theta.cos())


@functools.lru_cache(maxsize=None)
def _augment_sym6(device):
    """Low-pass filter of the sym6 wavelet (EDM's AugmentPipe), built once per device."""
    return torch.tensor([0.015404109327027373, 0.0034907120842174702, -0.11799011114819057,
                         -0.048311742585633, 0.4910559419267466, 0.787641141030194,
                         0.3379294217276218, -0.07263752278646252, -0.021060292512300564,
                         0.04472490177066578, 0.0017677118642428036, -0.007800708325034148],
                        device=device)


def edm_augment(images, p, u, g):
    """EDM's AugmentPipe as ambient-laws configures it (xflip=1e8, yflip, scale, rotate_frac, aniso, translate_frac,
    each with probability p), for ambient_laws.py (docs/ambient_laws.md#augment). images (B, C, H, W); u (B, 11)
    uniforms, g (B, 4) normals. Returns the images and the 9 augmentation labels (B, 9)."""
    B, C, H, W = images.shape
    gate = lambda k, mult=1.0: u[:, k] < mult * p  # noqa: E731
    zero = torch.zeros_like(u[:, 0])
    # Pixel blitting: x-flip (always eligible, xflip=1e8), y-flip.
    flip_x, flip_y = gate(0, 1e8) & (u[:, 1] < 0.5), gate(2) & (u[:, 3] < 0.5)
    images = torch.where(flip_x.view(-1, 1, 1, 1), images.flip(3), images)
    images = torch.where(flip_y.view(-1, 1, 1, 1), images.flip(2), images)
    # Inverse warp G^-1 in pixels about the centre: scale, rotation, anisotropy, translation.
    w_scale = torch.where(gate(4), g[:, 0], zero)
    w_rot = torch.where(gate(5), (u[:, 6] * 2 - 1) * math.pi, zero)
    w_aniso = torch.where(gate(7), g[:, 1], zero)
    r_aniso = torch.where(u[:, 9] < 0.5, (u[:, 8] * 2 - 1) * math.pi, zero)
    t = torch.where(gate(10).view(-1, 1), g[:, 2:4], zero.view(-1, 1))          # (B, 2)
    s, a = (0.2 * w_scale).exp2(), (0.2 * w_aniso).exp2()
    G_inv = (_augment_affine(zero, 1 / s, d=1 / s) @ _augment_rotate(w_rot) @ _augment_rotate(-r_aniso)
             @ _augment_affine(zero, 1 / a, d=a) @ _augment_rotate(r_aniso)
             @ _augment_affine(zero, tx=-t[:, 0] * W * 0.125, ty=-t[:, 1] * H * 0.125))  # (B, 3, 3)
    labels = torch.stack([flip_x.float(), flip_y.float(), w_scale, w_rot.cos() - 1, w_rot.sin(),
                          w_aniso * r_aniso.cos(), w_aniso * r_aniso.sin(), t[:, 0], t[:, 1]],
                         dim=1)                                                 # (B, 9)
    # Reflect-pad by EDM's largest margin (same result, no host sync), upsample 2x with sym6.
    filt = _augment_sym6(images.device).to(images.dtype)
    images = F.pad(images, [W - 1, W - 1, H - 1, H - 1], mode='reflect')       # (B, C, 3H-2, 3W-2)
    for dim in (3, 2):
        images = torch.stack([images, torch.zeros_like(images)], dim=dim + 1).flatten(dim, dim + 1)
        images = images.narrow(dim, 0, images.shape[dim] - 1)
        kernel = filt.flip(0).view(1, 1, -1, 1) if dim == 2 else filt.flip(0).view(1, 1, 1, -1)
        padding = (6, 0) if dim == 2 else (0, 6)
        images = F.conv2d(images, kernel.repeat(C, 1, 1, 1), groups=C, padding=padding)
    # Warp by bilinear sampling at 2x: G^-1 on the upsampled grid, then normalised coordinates.
    size = [B, C, (H + 6) * 2, (W + 6) * 2]
    G_inv = (_augment_affine(zero, 2.0, d=2.0, tx=-0.5, ty=-0.5) @ G_inv
             @ _augment_affine(zero, 0.5, d=0.5, tx=0.25, ty=0.25))
    G_inv = (_augment_affine(zero, 2 / images.shape[3], d=2 / images.shape[2]) @ G_inv
             @ _augment_affine(zero, size[3] / 2, d=size[2] / 2))
    grid = F.affine_grid(G_inv[:, :2, :], size, align_corners=False)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    # Downsample 2x and crop the filter margin.
    images = F.conv2d(images, filt.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C, stride=(1, 2),
                      padding=(0, 5))
    images = F.conv2d(images[:, :, :, 3:-3], filt.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C,
                      stride=(2, 1), padding=(5, 0))
    return images[:, :, 3:-3, :], labels                                        # (B, C, H, W)


def fetch_local(source, cache_dir=None):
    """A local path for a path or an http(s) URL (downloaded once into the cache); one-line ValueError or
    FileNotFoundError when it is missing or cannot be downloaded."""
    if str(source).startswith(('http://', 'https://')):
        try:
            return resolve_source(source, cache_dir=cache_dir)
        except Exception as error:  # offline, 404, size mismatch: the message names the URL
            raise ValueError(' '.join(str(error).split())) from None
    if not os.path.exists(source):
        raise FileNotFoundError(f'{source} does not exist')
    return source


def read_ambient_snapshot(source, build, training_options=None, cache_dir=None):
    """An ambient.py network-snapshot-*.pt or an official ambient-diffusion network-snapshot-*.pkl (path or URL) ->
    (network, network config), read without running code from the file. For a .pt, build(net_config) makes the
    network (checked against the file's tensors before any memory); for a .pkl the UNet and its config come from
    load_ambient_pickle and build is not called. One-line ValueError / FileNotFoundError otherwise."""
    import zipfile
    path = fetch_local(source, cache_dir)
    if os.path.isdir(path):
        raise ValueError(f'{source} is a folder; give a network-snapshot-*.pt or *.pkl file')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{source} is empty (0 bytes)')
    try:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else: a pickle
            return load_ambient_pickle(path, source, training_options, cache_dir)
        snapshot = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(snapshot, dict) or not {'config', 'ema'} <= set(snapshot):
            kind = 'a training state' if isinstance(snapshot, dict) and 'optimizer' in snapshot else 'not a snapshot'
            raise ValueError(f'{source} is {kind}; give a network-snapshot-*.pt of ambient.py')
        return build_checked(lambda: build(snapshot['config']), snapshot['ema'], source), snapshot['config']
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(' '.join(str(error).split())) from None


# EDM's augmentation for ambient.py: AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
# translate_frac=1), and a mask-preserving variant (docs/ambient.md#augmentation).
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564,
        0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]  # wavelet filter of EDM's augment.py


def _affine(a, b, c, d, e, f):
    """Batch of 3x3 matrices [[a, b, c], [d, e, f], [0, 0, 1]] from (N,) tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=-1).reshape(-1, 3, 3)


def draw_augmentation(p, n, height, width, generator):
    """EDM's random draws, in EDM's order. Returns flips (n, 2) in {0, 1}, G_inv (n, 3, 3) mapping output to input
    pixel coordinates (origin at the image centre) and the 9 augment labels (n, 9) that condition the network."""
    device = generator.device
    rand = lambda *shape: torch.rand(shape, generator=generator, device=device)  # noqa: E731
    randn = lambda *shape: torch.randn(shape, generator=generator, device=device)  # noqa: E731
    coin = lambda prob: rand(n) < prob  # noqa: E731
    flip_x = torch.randint(2, (n,), generator=generator, device=device) * coin(min(1e8 * p, 1))
    flip_y = torch.randint(2, (n,), generator=generator, device=device) * coin(p)
    scale = randn(n) * coin(p)
    rotate = (rand(n) * 2 - 1) * math.pi * coin(p)
    aniso, aniso_angle = randn(n), (rand(n) * 2 - 1) * math.pi
    aniso, aniso_angle = aniso * coin(p), aniso_angle * coin(0.5)
    translate = randn(2, n) * coin(p)
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    rotation = lambda angle: _affine(angle.cos(), -angle.sin(), zero, angle.sin(), angle.cos(), zero)  # noqa: E731
    s, a = (scale * 0.2).exp2(), (aniso * 0.2).exp2()
    shift = _affine(one, zero, -translate[0] * width * 0.125, zero, one, -translate[1] * height * 0.125)
    G_inv = (_affine(1 / s, zero, zero, zero, 1 / s, zero) @ rotation(rotate) @ rotation(-aniso_angle)
             @ _affine(1 / a, zero, zero, zero, a, zero) @ rotation(aniso_angle) @ shift)
    labels = torch.stack([flip_x, flip_y, scale, rotate.cos() - 1, rotate.sin(), aniso * aniso_angle.cos(),
                          aniso * aniso_angle.sin(), translate[0], translate[1]], dim=1).float()
    return torch.stack([flip_x, flip_y], dim=1), G_inv, labels


def warp_official(images, G_inv):
    """EDM's geometric resampling: reflect padding, 2x upsampling with the sym6 wavelet, bilinear grid_sample, 2x
    downsampling. Always pads by the largest margin EDM uses, so that an image's result does not depend on the rest
    of the batch (EDM sizes the margin by the batch's largest warp)."""
    n, channels, height, width = images.shape
    taps, pad = len(SYM6), len(SYM6) // 4
    wavelet = torch.tensor(SYM6, dtype=images.dtype, device=images.device)[None, None].repeat(channels, 1, 1)
    images = F.pad(images, [width - 1, width - 1, height - 1, height - 1], mode='reflect')
    # Upsample 2x: zero insertion along each axis, then the time-reversed wavelet.
    images = torch.stack([images, torch.zeros_like(images)], dim=4).flatten(3)[:, :, :, :-1]
    images = F.conv2d(images, wavelet.flip(2)[:, :, None, :], groups=channels, padding=[0, (taps + 1) // 2])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).flatten(2, 3)[:, :, :-1]
    images = F.conv2d(images, wavelet.flip(2)[:, :, :, None], groups=channels, padding=[(taps + 1) // 2, 0])
    # G_inv in affine_grid's normalised coordinates: EDM's chain of scalings and half-pixel shifts, multiplied out.
    out_h, out_w = (height + 2 * pad) * 2, (width + 2 * pad) * 2
    left = G_inv.new_tensor([[4 / images.shape[3], 0, -1 / images.shape[3]],
                             [0, 4 / images.shape[2], -1 / images.shape[2]], [0, 0, 1]])
    right = G_inv.new_tensor([[out_w / 4, 0, 0.25], [0, out_h / 4, 0.25], [0, 0, 1]])
    grid = F.affine_grid((left @ G_inv @ right)[:, :2].to(images.dtype), [n, channels, out_h, out_w],
                         align_corners=False)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    # Downsample 2x with the wavelet and crop the guard band.
    images = F.conv2d(images, wavelet[:, :, None, :], groups=channels, stride=[1, 2], padding=[0, (taps - 1) // 2])
    images = F.conv2d(images, wavelet[:, :, :, None], groups=channels, stride=[2, 1], padding=[(taps - 1) // 2, 0])
    return images[:, :, pad:-pad, pad:-pad]


def warp_nearest(images, G_inv):
    """The same warp with nearest-neighbour lookup and mirror reflection: every output pixel is a copy of one input
    pixel, so masks stay binary and an erased pixel can never leak into an observed one."""
    n, channels, height, width = images.shape
    rows, cols = torch.meshgrid(torch.arange(height, device=images.device, dtype=G_inv.dtype),
                                torch.arange(width, device=images.device, dtype=G_inv.dtype), indexing='ij')
    centred = torch.stack([cols - (width - 1) / 2, rows - (height - 1) / 2, torch.ones_like(rows)]).flatten(1)
    source = G_inv @ centred  # (N, 3, H*W)
    reflect = lambda k, size: (size - 1) - ((size - 1) - k.remainder(2 * size - 2)).abs()  # noqa: E731
    x = reflect((source[:, 0] + (width - 1) / 2).round().long(), width)
    y = reflect((source[:, 1] + (height - 1) / 2).round().long(), height)
    index = (y * width + x)[:, None].expand(-1, channels, -1)  # (N, C, H*W)
    return images.flatten(2).gather(2, index).reshape(n, channels, height, width)


def augment(images, flips, G_inv, mode):
    """Applies drawn augmentations. official: EDM's filtered warp of the given images; joint: exact flips and
    nearest-neighbour warps, meant for the image stacked with its masks along channels."""
    images = torch.where(flips[:, 0, None, None, None] == 1, images.flip(3), images)
    images = torch.where(flips[:, 1, None, None, None] == 1, images.flip(2), images)
    return warp_official(images, G_inv) if mode == 'official' else warp_nearest(images, G_inv)


# ----------------------------------------------------------------------------------------------------------------------
# Official files of guided-diffusion / DDPM-IP: optimizer, EMA and resume files (ddpm_ip.py)


def load_torch_file(path, what):
    """torch.load of a checkpoint that holds tensors only (weights_only=True, onto the CPU). Whatever makes it unusable
    is one line naming `what` (a flag) and the file: FileNotFoundError, or ValueError (empty, truncated, not a torch
    file, pickled code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what}: no file {path}')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{what}: {path} is empty (0 bytes), e.g. from an interrupted copy')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled code
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f'{what}: cannot load {path} (not a complete torch checkpoint): {reason}') from None
    check_tensor_sizes(state, f'{what}: {path}')  # no stride-0 views that expand when copied
    return state


def check_adm_weights(weights, net_kwargs):
    """ValueError unless `weights` is a state dict with exactly the keys and shapes of UNet(**net_kwargs) (built on
    the meta device: nothing is allocated from sizes in a file)."""
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in UNet(**net_kwargs).state_dict().items()}
    if not isinstance(weights, dict) or {k: getattr(v, 'shape', None) for k, v in weights.items()} != shapes:
        raise ValueError(f'does not hold the weights of this network ({len(shapes)} tensors, '
                         f'{json.dumps(net_kwargs)}); check the model flags')


def official_resume_step(path):
    """NNNNNN of guided-diffusion's .../modelNNNNNN.pt, 0 if the name has none (its parse_resume_step_from_filename)."""
    tail = path.split('model')[-1].split('.')[0] if 'model' in path else ''
    return int(tail) if tail.isdigit() else 0


def read_official_resume(path, model_state, rates, net_kwargs):
    """guided-diffusion's resume files for --resume_checkpoint .../modelNNNNNN.pt (train_util.py): the model state
    `model_state` read from `path`, ema_<rate>_NNNNNN.pt per EMA rate and optNNNNNN.pt beside it; a missing EMA file
    starts from the model, a missing optimizer file from a fresh AdamW, as there. Returns dict(model, emas (one per
    rate), optimizer (our AdamW's state dict or None), step). One-line ValueError / FileNotFoundError."""
    step, folder = official_resume_step(path), os.path.dirname(path)

    def checked(weights, name):
        try:
            check_adm_weights(weights, net_kwargs)
        except ValueError as e:
            raise ValueError(f'{name} {e}') from None
        return weights

    checked(model_state, path)
    emas = []
    for rate in rates:
        ema_path = os.path.join(folder, f'ema_{rate}_{step:06d}.pt')
        emas.append(checked(load_torch_file(ema_path, '--resume'), ema_path) if os.path.isfile(ema_path)
                    else model_state)
    opt_path = os.path.join(folder, f'opt{step:06d}.pt')
    optimizer = official_optimizer_state(load_torch_file(opt_path, '--resume'), list(model_state), net_kwargs,
                                         opt_path) if os.path.isfile(opt_path) else None
    return dict(model=model_state, emas=emas, optimizer=optimizer, step=step)


def official_optimizer_state(opt, names, net_kwargs, path):
    """An official optNNNNNN.pt as the state dict of our AdamW over UNet(**net_kwargs).parameters(). The official
    AdamW runs over the parameters in model-file order `names`; with --use_fp16 over two flat master tensors, the
    vectors then the matrices (guided-diffusion fp16_util.py), which are split back per parameter."""
    with torch.device('meta'):
        params = dict(UNet(**net_kwargs).named_parameters())
    try:
        state, group = opt['state'], opt['param_groups'][0]
        if len(state) == len(names):
            per_name = {name: state[i] for i, name in enumerate(names)}
        elif len(state) == 2:  # fp16 master parameters, flattened
            per_name = {}
            for flat, members in zip((state[0], state[1]), ([n for n in names if params[n].ndim <= 1],
                                                            [n for n in names if params[n].ndim > 1])):
                sizes = [params[n].numel() for n in members]
                pieces = {k: flat[k].reshape(-1).split(sizes) for k in ('exp_avg', 'exp_avg_sq')}  # (1, n) matrices
                for i, n in enumerate(members):
                    per_name[n] = {'step': torch.tensor(float(flat['step'])),  # one counter each: AdamW adds in place
                                   **{k: v[i].view(params[n].shape) for k, v in pieces.items()}}
        else:
            raise ValueError(f'{len(state)} parameter states for {len(names)} parameters')
        ours = list(params)
        return {'state': {i: per_name[n] for i, n in enumerate(ours)},
                'param_groups': [{**group, 'params': list(range(len(ours)))}]}
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f'{path} is not the AdamW state of this network: {e}') from None



# ----------------------------------------------------------------------------------------------------------------------
# Diffusers pipelines, DiT specs and the VQ glue of ldm_labelnoise.py

VQ_F4 = 'hf://DiffusionNoise/ldm_in1k_clean/vqvae'  # the paper's LDM-4 autoencoder (CompVis vq-f4, diffusers layout)


class VQLatents(nn.Module):
    """LDM-4's VQ-f4 seen as a posterior of zero variance, so that it caches and decodes like the KL autoencoder:
    the diffusion runs on the pre-quantisation latents, unscaled (LDM cin256: scale_factor 1), and decoding
    quantises them first (CompVis VQModelInterface.decode, diffusers VQModel.decode)."""

    def __init__(self, vq, scaling_factor=1.0):
        super().__init__()
        self.vq, self.scaling_factor = vq, scaling_factor
        self.downscale_factor = vq.downscale_factor

    def encode_moments(self, x):
        h = self.vq.encode(x).float()                                     # (B, 3, H/4, W/4)
        return h, torch.full_like(h, -math.inf)                           # exp(-inf / 2) = 0: no sampling noise

    def decode(self, z):
        return self.vq.decode(z / self.scaling_factor)


def load_latent_autoencoder(source, cache_dir=None):
    """The autoencoder of ldm_labelnoise's --vae: 'ema' / 'mse' (KL-f8, DiT), 'vq-f4' (LDM-4), or a file, folder,
    URL or repo id of either kind (tried as a VQ model first, by its codebook). Frozen, eval mode, on the CPU."""
    if source in VAE_URLS:
        return load_autoencoder(source, cache_dir=cache_dir)
    try:
        return VQLatents(load_vqmodel(VQ_F4 if source == 'vq-f4' else source, cache_dir=cache_dir))
    except ValueError as error:  # a KL autoencoder has no codebook
        if 'VQ' not in str(error) or os.path.isdir(source):
            raise
        return load_autoencoder(source, cache_dir=cache_dir)


def read_checkpoint(path, what):
    """A torch checkpoint as a dict (weights only: no code in it runs); else a one-line ValueError naming `what`."""
    if not os.path.isfile(path):
        raise ValueError(f'{what} file not found: {path}')
    if os.path.getsize(path) == 0:
        raise ValueError(f'{what}={path} is empty (0 bytes), e.g. cut short by a full disk')
    try:
        checkpoint = load_weights_file(path)
    except Exception as error:  # torch's own message spans several lines
        raise ValueError(f'{what}={path} is damaged or not a checkpoint ({type(error).__name__})') from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{what}={path} holds a {type(checkpoint).__name__}, not a checkpoint dict')
    return checkpoint


def dit_spec(dit, vae):
    """The ldm_labelnoise spec of a facebookresearch/DiT network: DiT's diffusion (linear betas 1e-4 .. 0.02 over
    1000 steps) on SD KL-f8 latents (scaled by 0.18215), class-conditional with null label num_classes."""
    name = next((name for name, make in DiT_models.items() if dict(make.keywords) == dict(
        depth=len(dit.blocks), hidden_size=dit.hidden_size, num_heads=dit.num_heads, patch_size=dit.patch_size)),
        'DiT-custom')
    return dict(arch=name, cond='class', num_classes=dit.num_classes, shape=(dit.in_channels, dit.input_size,
                dit.input_size), dropout=0.0, text_layers=0, embedding_dropout=0.0, class_dropout_prob=
                float(dit.y_embedder.embedding_table.num_embeddings > dit.num_classes), vae=vae, scaling_factor=
                0.18215, beta_schedule='linear', linear_start=1e-4, linear_end=0.02, cep_perturb_null=True)


_BARE_MODELS = {'DiTTransformer2DModel': dit_from_diffusers, 'Transformer2DModel': dit_from_diffusers}


def _bare_model_parts(folder, cache_dir=None):
    """load_diffusers_pipeline's parts for a bare diffusers DiT folder (config.json + weights, e.g. a pipeline's
    transformer/): the scheduler and autoencoder of sibling scheduler/ and vae/ folders where they exist, else
    diffusers' scheduler defaults (DiT's linear betas) and no autoencoder."""
    config = read_json(os.path.join(folder, 'config.json'))
    class_name = config.get('_class_name') if isinstance(config, dict) else None
    if class_name not in _BARE_MODELS:
        raise ValueError(f'{folder}: a bare model folder must hold a diffusers DiT ({", ".join(_BARE_MODELS)}), not '
                         f'{class_name!r}; an LDM UNet needs its whole pipeline folder (class embedder, text encoder)')
    parts = dict(pipeline=class_name, network_kind='dit', autoencoder=None, autoencoder_kind=None, text_encoder=None,
                 tokenizer=None, class_embedder=None, components={}, unsupported={}, id2label=None)
    parts['network'] = _BARE_MODELS[class_name](config, read_diffusers_weights(folder))
    parent = os.path.dirname(os.path.abspath(folder))
    scheduler_path = os.path.join(parent, 'scheduler', 'scheduler_config.json')
    parts['scheduler'] = {**SCHEDULER_DEFAULTS, **(read_json(scheduler_path) if os.path.isfile(scheduler_path)
                                                   else {})}
    if os.path.isfile(os.path.join(parent, 'vae', 'config.json')):
        vae_folder = os.path.join(parent, 'vae')
        parts['autoencoder'] = autoencoder_kl_from_diffusers(read_json(os.path.join(vae_folder, 'config.json')),
                                                             read_diffusers_weights(vae_folder))
        parts['autoencoder_kind'] = 'kl'
    id2label = config.get('id2label')
    parts['id2label'] = {int(key): value for key, value in id2label.items()} if isinstance(id2label, dict) else None
    return parts


def read_diffusers_model(source, autoencoder=None, vae_name='', num_timesteps=1000, cache_dir=None):
    """A released model for ldm_labelnoise: a diffusers pipeline (folder, hf:// or a Hub repo id; the DiffusionNoise
    DiTPipeline, LDMClassToImagePipeline and LDMTextToImagePipeline) or a bare diffusers DiT folder.

    Returns dict(network, kind: 'dit' | 'class' | 'text', class_embedder (nn.Embedding, last row the null class),
    text_encoder, tokenizer, autoencoder, spec; the Denoiser's front end: encoder, cond_shape, null, tokenize).
    `autoencoder` (named vae_name) replaces the pipeline's own. The
    spec carries the scheduler's betas, spacing and offset, as the official Scheduler.from_config."""
    is_bare = os.path.isfile(os.path.join(source, 'config.json')) and \
        not os.path.isfile(os.path.join(source, 'model_index.json'))
    parts = _bare_model_parts(source, cache_dir) if is_bare else load_diffusers_pipeline(source, cache_dir)
    scheduler = parts['scheduler'] or SCHEDULER_DEFAULTS
    if scheduler.get('prediction_type', 'epsilon') != 'epsilon' or scheduler['num_train_timesteps'] != num_timesteps:
        raise ValueError(f'only eps-prediction over {num_timesteps} steps is supported, not '
                         f'{scheduler.get("prediction_type")} over {scheduler["num_train_timesteps"]}')
    network, tokenizer = parts['network'], parts['tokenizer']
    if parts['network_kind'] == 'dit':
        kind, num_classes, side = 'class', network.num_classes, network.input_size
        has_null = network.y_embedder.embedding_table.num_embeddings > network.num_classes
    elif parts['class_embedder'] is not None:  # LDM's ClassEmbedder: its last row is the null class
        kind, num_classes, side, has_null = 'class', parts['class_embedder'].num_embeddings - 1, \
            network.img_resolution, True
    elif parts['text_encoder'] is not None and tokenizer is not None:
        kind, num_classes, side, has_null = 'text', 0, network.img_resolution, True
    else:
        raise ValueError(f'a {parts["pipeline"]} without a class embedder or an LDM-BERT text encoder and '
                         f'tokenizer ({", ".join(parts["components"])})')
    if autoencoder is None:
        autoencoder = parts['autoencoder']
        if autoencoder is None:
            raise ValueError('no autoencoder beside the model (a vae/ folder): pass --vae=ema|mse|FILE')
        if parts['autoencoder_kind'] == 'vq':  # LDM text models divide by the scaling factor; class models do not
            autoencoder = VQLatents(autoencoder, autoencoder.scaling_factor if kind == 'text' else 1.0)
    spec = dict(arch=parts['pipeline'], cond=kind, num_classes=num_classes, shape=(network.in_channels, side, side),
                class_dropout_prob=float(has_null), vae=vae_name or source, scaling_factor=autoencoder.scaling_factor,
                betas=diffusers_betas(scheduler).tolist(), timestep_spacing=scheduler.get('timestep_spacing'),
                steps_offset=scheduler.get('steps_offset', 0), id2label=parts['id2label'],
                # DDIMScheduler.from_config keeps these (diffusers' defaults: clip_sample True, range 1, alpha 1)
                clip_sample=scheduler.get('clip_sample_range', 1.0) if scheduler.get('clip_sample', True) else 0.0,
                set_alpha_to_one=scheduler.get('set_alpha_to_one', True))
    # The condition front end of ldm_labelnoise's Denoiser: encoder, condition shape, null condition, tokenizer.
    if parts['network_kind'] == 'dit':
        front = dict(encoder=None, cond_shape=(network.hidden_size,), null=network.num_classes, tokenize=None)
    elif kind == 'class':  # LDM's ClassEmbedder: its last row is the null class
        table = parts['class_embedder']
        encoder = ClassEmbedder(table.num_embeddings - 1, table.embedding_dim)
        encoder.embedding = table
        front = dict(encoder=encoder, cond_shape=(1, table.embedding_dim), null=num_classes, tokenize=None)
    else:
        front = dict(encoder=parts['text_encoder'], cond_shape=(tokenizer.max_length, network.config['context_dim']),
                     null=tokenizer([''])[0], tokenize=tokenizer)
    return dict(network=network, kind='dit' if parts['network_kind'] == 'dit' else kind, spec=spec,
                class_embedder=parts['class_embedder'], text_encoder=parts['text_encoder'], tokenizer=tokenizer,
                autoencoder=autoencoder, **front)


def read_ldm_checkpoint(path, vae='', for_fid=False):
    """ldm_labelnoise's --network as a file, read without running code from it: ('snapshot', spec, EMA state dict)
    for a snapshot of the script, ('dit', spec, DiT network) for a facebookresearch/DiT checkpoint
    (DiT-XL-2-256x256.pt, or train.py's {model, ema, opt, args}: its EMA), whose autoencoder is `vae`, by default
    'mse' as DiT's sample.py, 'ema' for_fid as sample_ddp.py. Anything else: a one-line ValueError."""
    checkpoint = read_checkpoint(path, '--network')
    if 'spec' in checkpoint and 'ema' in checkpoint:
        spec = checkpoint['spec']
        if not isinstance(spec, dict) or 'vae' not in spec:
            raise ValueError(f'--network={path}: damaged spec')
        return 'snapshot', {**spec, 'vae': vae or spec['vae']}, checkpoint['ema']
    if 'x_embedder.proj.weight' in checkpoint.get('ema', checkpoint.get('model', checkpoint)):
        try:
            dit = dit_from_state_dict(checkpoint)
        except (ValueError, RuntimeError, KeyError) as error:
            raise ValueError(f'--network={path}: not a DiT checkpoint this script can read ({error})') from None
        return 'dit', dit_spec(dit, vae or ('ema' if for_fid else 'mse')), dit
    raise ValueError(f'--network={path} is neither a snapshot of this script nor a facebookresearch/DiT checkpoint '
                     f'(first keys: {", ".join(list(checkpoint)[:3])})')


def byte_tokens(captions, length=77):
    """ldm_labelnoise's tokens: BOS, UTF-8 bytes (truncated), EOS, padding. (N,) strings -> int64 (N, length)."""
    bos, eos, pad = 256, 257, 258
    tokens = torch.full((len(captions), length), pad, dtype=torch.int64)
    for i, caption in enumerate(captions):
        row = [bos] + list(caption.encode('utf-8'))[:length - 2] + [eos]
        tokens[i, :len(row)] = torch.tensor(row)
    return tokens


class ClassEmbedder(nn.Module):
    """LDM's class embedder: label -> (B, 1, width) cross-attention context; id num_classes is the null class."""

    def __init__(self, num_classes, width):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, width)

    def forward(self, y):
        return self.embedding(y)[:, None]                                # (B, 1, width)


class ByteTextEncoder(nn.Module):
    """ldm_labelnoise's stand-in for the trainable BERT of the paper's CC3M model (App. B.3): byte_tokens -> a
    pre-norm transformer trained jointly -> (B, length, width). Padding tokens are ordinary tokens (no mask), so
    the context always has `length` positions, like BERT's padded last_hidden_state."""

    def __init__(self, width, depth, length=77):
        super().__init__()
        self.token = nn.Embedding(259, width)
        self.position = nn.Parameter(torch.randn(1, length, width) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(
            width, max(1, width // 64), 4 * width, dropout=0.0, activation='gelu', batch_first=True,
            norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        h = self.token(tokens) + self.position                           # (B, L, width)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)
