# DiT, the KL-f8 latent autoencoder and the weight-file readers of nets.py.
#
# DiT follows facebookresearch/DiT models.py (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023,
# arXiv 2212.09748): its state_dict keys are those of the released DiT-XL-2-256x256.pt, which loads strictly.
# AutoencoderKL is the KL-f8 autoencoder of Stable Diffusion (Rombach et al., "High-Resolution Image Synthesis with
# Latent Diffusion Models", CVPR 2022, arXiv 2112.10752) in the key layout of diffusers' AutoencoderKL; the loader also
# reads the older diffusers attention names of stabilityai/sd-vae-ft-ema / -mse and CompVis LDM checkpoints.

import argparse
import collections
import functools
import json
import math
import os
import pickle
import re
import struct
import tempfile
import urllib.parse

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(f'header is not JSON ({error})') from None
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
            shape = [int(size) for size in entry['shape']]
            begin, end = (int(offset) for offset in entry['data_offsets'])
        except (KeyError, TypeError, ValueError) as error:
            raise invalid(f'bad header entry for {name!r} ({error!r})') from None
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


def write_atomic(path, chunks):
    """Write byte chunks to a temporary file next to path, then rename it, so that path is never left half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def load_weights_file(path):
    """Load a .safetensors file, or a torch pickle (.pt / .pth / .bin / .ckpt) with weights_only=True, onto the CPU."""
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f'weights file not found: {path}')
    if path.endswith('.safetensors'):
        return load_safetensors(path)
    torch.serialization.add_safe_globals([argparse.Namespace])  # DiT's training checkpoints pickle their 'args'
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(error))
        if found:  # weights_only refuses to build arbitrary objects, whose unpickling could run code
            raise ValueError(f'{path} pickles a {found[1]} object, which is not loaded for safety; save its state '
                             'dict alone and load that') from None
        raise ValueError(f'{path} is not a readable torch file ({type(error).__name__})') from None


def default_cache_dir():
    """Where downloaded weights are kept: $CORRUPTED_DIFFUSION_CACHE, else ~/.cache/corrupted-diffusion."""
    default = os.path.join(os.path.expanduser('~'), '.cache', 'corrupted-diffusion')
    return os.environ.get('CORRUPTED_DIFFUSION_CACHE') or default


def download_cached(url, cache_dir=None):
    """Return the path of a cached copy of url, downloading it on first use (atomically: temp file + rename).

    Offline, raises WeightsNotFoundError with one line that names the URL and the path to save it at by hand.
    """
    url_path = urllib.parse.urlsplit(url).path.strip('/')
    path = os.path.join(cache_dir or default_cache_dir(), re.sub(r'[^A-Za-z0-9._-]+', '_', url_path))
    if os.path.isfile(path):
        return path
    try:
        with requests.get(url, stream=True, timeout=30) as response:
            response.raise_for_status()
            write_atomic(path, response.iter_content(chunk_size=1 << 20))
    except (requests.RequestException, OSError) as error:
        response = getattr(error, 'response', None)
        reason = f'HTTP {response.status_code}' if response is not None else type(error).__name__
        message = f'cannot download {url} ({reason}); download it by hand and save it as {path}'
        raise WeightsNotFoundError(message) from None
    return path


# ----------------------------------------------------------------------------------------------------------------------
# DiT: a ViT over latent patches, conditioned on timestep + class through adaLN-Zero (Peebles & Xie, Sec. 3.2)

def dit_modulate(x, shift, scale):
    """adaLN: shift and scale the normalised tokens x (B, T, D) with per-sample (B, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def dit_timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding (B,) -> (B, dim) of (possibly fractional) timesteps: [cos | sin] at frequencies
    max_period**(-i / (dim / 2)), i = 0 .. dim/2 - 1 (DiT models.py, from GLIDE). dim must be even."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
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

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(dit_timestep_embedding(t, self.frequency_embedding_size))


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

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
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
    embedding_noise (B, hidden_size) added to the label embedding before it joins the timestep embedding (CEP).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True):
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
        self.t_embedder = DiTTimestepEmbedder(hidden_size)
        self.y_embedder = DiTLabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A frozen Parameter rather than a buffer, as in DiT: it sits in the state dict (and the EMA) under this name.
        self.pos_embed = nn.Parameter(dit_pos_embed(hidden_size, input_size // patch_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
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

    def forward(self, x, t, y, embedding_noise=None):
        x = self.x_embedder(x) + self.pos_embed     # (B, T, D), T = H * W / p**2
        t = self.t_embedder(t)                      # (B, D)
        y = self.y_embedder(y)                      # (B, D)
        if embedding_noise is not None:
            y = y + embedding_noise                 # CEP perturbs the condition embedding only
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
    with torch.device('meta'):  # no random init of weights that are overwritten anyway
        net = DiT(input_size=round(math.sqrt(state_dict['pos_embed'].shape[1])) * patch_size, patch_size=patch_size,
                  in_channels=in_channels, hidden_size=hidden_size,
                  depth=len({key.split('.')[1] for key in state_dict if key.startswith('blocks.')}),
                  num_heads=num_heads, mlp_ratio=state_dict['blocks.0.mlp.fc1.weight'].shape[0] / hidden_size,
                  class_dropout_prob=0.1 if rows > num_classes else 0.0, num_classes=num_classes,
                  learn_sigma=out_channels == 2 * in_channels)
    net.load_state_dict({key: value.float() for key, value in state_dict.items()}, assign=True)
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
    state_dict = vae_state_dict_to_diffusers(load_weights_file(path))
    with torch.device('meta'):  # no random init of weights that are overwritten anyway
        net = AutoencoderKL(**vae_config_from_state_dict(state_dict))
    net.load_state_dict({key: value.float() for key, value in state_dict.items()}, assign=True)
    return net.eval().requires_grad_(False)
