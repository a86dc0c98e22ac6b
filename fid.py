"""FID, Inception Score, sFID, precision/recall and KID from one pass of a pure-torch Inception-v3.

The detector is the TF-2015 Inception-v3 graph that FID is defined on (Heusel et al., "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017, arXiv:1706.08500), rebuilt here with
the state_dict layout of pytorch-fid's weights file `pt_inception-2015-12-05-6726825d.pth`, which loads with
strict=True. One forward pass gives the three taps every metric needs:
  pool     (N, 2048)  final average pool (TF `pool_3`): FID, KID, precision/recall; logits_unbiased -> IS
  spatial  (N, 2023)  first 7 channels of Mixed_6d.branch1x1 (TF `mixed_6/conv`), flattened NHWC: sFID (ADM)
  logits   (N, 1008)  pool @ fc.weight.T without bias, as ADM, StyleGAN3 and torch-fidelity compute IS
Metric definitions follow the reference tools: FID as pytorch-fid / EDM (mean and N-1 covariance in float64),
IS with 10 splits as StyleGAN3 or in ADM's 5000-image chunks (protocol adm; the two agree at N = 50k only),
sFID, precision and recall (k = 3, Kynkaanniemi et al., NeurIPS 2019, arXiv:1904.06991) as the ADM evaluator
(Dhariwal & Nichol, arXiv:2105.05233),
KID (Binkowski et al., ICLR 2018, arXiv:1801.01401) with 100 subsets of 1000 as StyleGAN3 / clean-fid.

Preprocessing decides which published numbers a FID can be compared with, and the evaluation protocol (PROTOCOLS)
fixes it together with the number of images, the IS splits and the reference format: `edm` (EDM's fid.py: `tf`
preprocessing, exactly 50,000 images), `adm` (guided-diffusion's evaluator: `tf`, 50,000, IS in 5,000-image
splits) and `pytorch-fid` (its preprocessing, all images). References written here are tagged with their
preprocessing and protocol; an untagged one (EDM's, ADM's, pytorch-fid's files) needs an explicit protocol or
preprocessing. Never compare FIDs computed under different protocols.

Images enter as uint8 (B, 3, H, W); converting samples is the caller's choice and moves FID slightly: EDM rounds,
(x * 127.5 + 128).clamp(0, 255).to(torch.uint8), while ADM truncates ((x + 1) * 127.5).

Speed: features stay on the device, files are decoded by a thread pool ahead of the GPU, and on CUDA the network
runs channels_last with cuDNN autotuning and no host sync per batch. The default precision is exact fp32 with TF32
off (cuDNN would use TF32 for convolutions, as pytorch-fid silently does on Ampere and later GPUs). On CPU the
convolutions are pytorch-fid's (NCHW, bitwise equal features) and the pools use faster bitwise-equal kernels. `tf32` and
`bf16` are faster but move the features (bf16 by 2-5 % per image, measured on CPU): use them to monitor training,
not for reported numbers, unless tests/bench_fid.py shows FID within 0.01 of fp32 on your data.

Library (what the paper scripts call; every function works under torchrun, each rank passing its share):
    detector = fid.load_inception(weights=None, device='cuda')  # --fid_weights / $FID_WEIGHTS / cache / download
    protocol = fid.resolve_protocol('edm', ref=ref, metrics=('fid', 'is'), detector=detector, num=50000)  # checks
    fid.compute_metrics(uint8_batches, ref, metrics=('fid', 'is'), detector=detector, protocol=protocol)
    fid.save_ref('ref.npz', fid.compute_stats(uint8_batches, detector))   # EDM fid-refs format, plus extras
    fid.compute_features(uint8_batches, detector)['pool']                 # (N, 2048), e.g. for nearest neighbours

Command line (EDM-style; folders are read recursively, zips as EDM datasets, .npz with `x` or ADM's `arr_0`, and
`--data=cifar10` is the CIFAR-10 training split, downloaded once; `ref --num=N` uses a seeded subset of N images):
    python fid.py ref  --protocol=edm --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    python fid.py calc --protocol=edm --images=samples/ --ref=fid-refs/cifar10-32x32.npz --metrics=fid,is \\
        --json=metrics.json
    python fid.py calc --protocol=adm --images=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \\
        --metrics=fid,is,sfid,pr                                # against ADM's reference batch
    torchrun --standalone --nproc_per_node=8 fid.py calc --protocol=edm --images=samples/ --ref=...
Exit status: 2 for bad flags or inputs (checked before any image is read, except an unreadable image, which is found
when it is decoded), 1 for another failure during the pass.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import struct
import sys
import tarfile
import threading
import time
import warnings
import zipfile

import numpy as np
import requests
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import nets

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub names files by the first 8 hex digits of their SHA-256
METRICS = ("fid", "is", "sfid", "pr", "kid")
PREPROCESS = ("pytorch-fid", "tf")
PRECISIONS = ("fp32", "tf32", "bf16")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")  # pytorch-fid's

# Evaluation protocols: the rules of the reference tool whose numbers a result is compared with.
#   preprocess     how uint8 images become the 299x299 input (see preprocess_images)
#   num            images evaluated (None: all); fewer available is an error, more are subsampled by `select`
#   select         which `num` images: 'random' = EDM's sorted seeded subset, 'first' = file order (ADM reads its
#                  sample batch in order), 'all'
#                  Known difference: guided-diffusion's evaluator itself reads every image of the sample batch; the
#                  50,000 of `adm` is the count ADM reports, so a batch of more is cut to its first 50,000 here and
#                  a batch of fewer needs an explicit --num.
#   is_split_size  Inception Score splits: None = 10 equal consecutive splits (StyleGAN3), k = consecutive
#                  k-image splits with a shorter last one (ADM's evaluator)
#   reference      the reference statistics the tool reads
PROTOCOLS = {
    "edm": dict(preprocess="tf", num=50000, select="random", is_split_size=None,
                reference="EDM fid-refs .npz (mu, sigma) or `fid.py ref --protocol=edm`",
                tool="NVlabs/edm fid.py (calc --num=50000)"),
    "adm": dict(preprocess="tf", num=50000, select="first", is_split_size=5000,
                reference="ADM reference batch .npz (arr_0 images; mu, sigma, mu_s, sigma_s) or `fid.py ref "
                          "--protocol=adm`",
                tool="openai/guided-diffusion evaluations/evaluator.py"),
    "pytorch-fid": dict(preprocess="pytorch-fid", num=None, select="all", is_split_size=None,
                        reference="pytorch-fid .npz (mu, sigma) or `fid.py ref --protocol=pytorch-fid`",
                        tool="mseitzer/pytorch-fid"),
}

# ----------------------------------------------------------------------------------------------------------------------
# Detector: the TF-2015 Inception-v3 graph in torchvision's module layout, with the FID-specific pooling.


class FrozenBatchNorm2d(nn.Module):
    """Inference-only batch norm: the keys of nn.BatchNorm2d without `num_batches_tracked`, as in the weights file."""

    def __init__(self, num_features, eps=1e-3):  # TF's eps, not torch's 1e-5
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> batch norm -> ReLU: one `conv` scope of the TF graph."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(out_channels)
        # Real weights always replace this. A variance-preserving random init keeps the features of an untrained
        # detector O(1) (torch's default init shrinks them to ~1e-8 over 94 layers), so tests with random weights
        # measure real differences between image sets.
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity='relu')

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place: the batch norm output is a fresh tensor


def avg_pool_same(x):
    # TF's SAME average pool divides by the number of real pixels under the window; torchvision's Inception counts
    # the zero padding (count_include_pad=True). This is the patch pytorch-fid applies to blocks A, C and E_1.
    # On CPU the channels-last kernel is 2x faster than the NCHW one and sums each window in the same order, so the
    # result is bitwise the same (tests check it).
    if x.device.type == "cpu" and x.is_contiguous():
        pooled = F.avg_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size=3, stride=1, padding=1,
                              count_include_pad=False)
        return pooled.contiguous()
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool_3x3(x, stride=2, padding=0):
    """F.max_pool2d(x, 3, stride, padding), bitwise. On CPU as a separable maximum of strided slices, 2-4x faster
    than torch's NCHW kernel (which also computes the argmax indices); a maximum is exact in any order."""
    if x.device.type != "cpu" or not x.is_contiguous():
        return F.max_pool2d(x, kernel_size=3, stride=stride, padding=padding)
    if padding:
        x = F.pad(x, (padding,) * 4, value=-math.inf)
    for dim in (2, 3):  # rows first: the second pass then reads contiguous, already halved rows
        out = (x.shape[dim] - 3) // stride + 1
        taps = [x.narrow(dim, offset, stride * (out - 1) + 1) for offset in range(3)]
        if stride > 1:
            taps = [tap[(slice(None),) * dim + (slice(None, None, stride),)] for tap in taps]
        x = torch.maximum(torch.maximum(taps[0], taps[1]), taps[2])
    return x


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (TF mixed, mixed_1, mixed_2): 35x35, 224 + pool_features output channels."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(avg_pool_same(x))], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a (TF mixed_3): grid reduction 35x35 -> 17x17, 288 -> 768 channels. Not patched for FID."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, max_pool_3x3(x)], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (TF mixed_4..mixed_7): factorised 7x7 convolutions at 17x17, 768 channels.

    The first 192 output channels are branch1x1's post-ReLU output; for Mixed_6d that is ADM's sFID tap.
    """

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(avg_pool_same(x))], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a (TF mixed_8): grid reduction 17x17 -> 8x8, 768 -> 1280 channels. Not patched for FID."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, max_pool_3x3(x)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (TF mixed_9, mixed_10): expanded 3x3 filter banks at 8x8, 2048 output channels.

    The TF graph pools with an average in Mixed_7b but with a max in Mixed_7c (pool='max'); pytorch-fid keeps this
    quirk of the graph, and the features are only right with it.
    """

    def __init__(self, in_channels, pool="avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        pooled = max_pool_3x3(x, stride=1, padding=1) if self.pool == "max" else avg_pool_same(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


class InceptionV3(nn.Module):
    """The FID Inception-v3: takes preprocessed (N, 3, 299, 299) input in [-1, 1], returns (pool, spatial).

    state_dict: 472 keys, 23,850,960 parameters, exactly the keys and shapes of pytorch-fid's weights file.
    """

    DIMS = {"pool": 2048, "spatial": 2023, "logits": 1008}

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # ImageNet-1000 plus 8 unused classes of the 2015 graph
        self.has_classifier = True  # False when the weights file had no fc (then no Inception Score)
        self.dims = dict(self.DIMS)  # feature width of each tap

    def forward(self, x):                                                     # (N, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))     # (N, 64, 147, 147)
        x = max_pool_3x3(x)                                                   # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # (N, 192, 71, 71)
        x = max_pool_3x3(x)                                                   # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                    # (N, 288, 35, 35)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x))))     # (N, 768, 17, 17)
        # sFID tap: channels 0..191 of Mixed_6d are its branch1x1 (TF mixed_6/conv); ADM keeps the first 7 and
        # flattens them in TF's NHWC order, which matters when comparing with ADM's stored mu_s / sigma_s.
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)                      # (N, 17 * 17 * 7 = 2023)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))     # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                             # (N, 2048), TF pool_3
        return pool, spatial

    def logits_unbiased(self, pool):
        """(N, 2048) -> (N, 1008) logits without the fc bias, the input of the Inception Score in ADM/StyleGAN3."""
        return pool @ self.fc.weight.T


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sha256_prefix_check(prefix):
    """A download validator: the file's SHA-256 must start with `prefix`."""
    def validate(path):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if not digest.hexdigest().startswith(prefix):
            raise ValueError(f"SHA-256 {digest.hexdigest()[:8]}..., expected {prefix}...")
    return validate


def weights_path(weights=None):
    """Path of the FID weights: `weights`, else $FID_WEIGHTS, else the cache (downloaded once if missing, through
    nets.download_file: atomic, resumable, with an overall deadline, and SHA-256-checked before it is kept)."""
    path = weights or os.environ.get("FID_WEIGHTS")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FID Inception weights not found: {path}")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)  # where pytorch-fid caches the same file
    if not os.path.isfile(cached):
        try:
            print(f"fid: downloading {WEIGHTS_URL}", file=sys.stderr)
            nets.download_file(WEIGHTS_URL, cached, validate=_sha256_prefix_check(WEIGHTS_SHA256_PREFIX))
        except nets.WeightsNotFoundError as error:
            raise FileNotFoundError(f"cannot download the FID Inception weights ({error}); or pass "
                                    f"--fid_weights=PATH (or set FID_WEIGHTS)") from None
    return cached


def load_inception(weights=None, device="cpu"):
    """The FID Inception-v3 in eval mode on `device`, from pytorch-fid's weights file (see weights_path).

    Accepts the file with or without `num_batches_tracked`, with fp16 tensors (cast to fp32), and without the
    classifier `fc.*` (then `has_classifier` is False and the Inception Score is unavailable); any other missing,
    unexpected or mis-shaped key is an error.
    """
    # Under torchrun rank 0 fetches the file while the others wait, so it is downloaded once.
    rank, world = _rank_world()
    if world > 1 and rank != 0:
        dist.barrier()
    try:
        path = weights_path(weights)
    finally:
        if world > 1 and rank == 0:
            dist.barrier()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read the FID Inception weights {path}: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict")
    nets.check_tensor_sizes(state, path)  # no stride-0 views that the cast below would expand
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
             if not k.endswith("num_batches_tracked")}

    with torch.device("meta"):  # skip the random initialisation: every tensor comes from the file
        net = InceptionV3()
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    has_classifier = "fc.weight" in state
    if unexpected or set(missing) - {"fc.weight", "fc.bias"} or has_classifier != ("fc.bias" in state):
        raise ValueError(f"{path} is not the FID Inception-v3 (pytorch-fid layout): missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}")
    if not has_classifier:  # NaN rather than random logits, should anything bypass the has_classifier check
        state.update({"fc.weight": torch.full((1008, 2048), math.nan), "fc.bias": torch.full((1008,), math.nan)})
    try:
        net.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: {' '.join(str(error).split())}") from None
    net.has_classifier = has_classifier
    device = torch.device(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # faster cuDNN convs
    return net.eval().requires_grad_(False).to(device, memory_format=memory_format)


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing: uint8 images -> the 299x299 network input.
#
# pytorch-fid (default): pixels / 255, torch bilinear resize with half-pixel centres (align_corners=False, no
#   antialiasing), then 2x - 1, i.e. v / 127.5 - 1.
# tf: TF1 ResizeBilinear (top-left anchored grid, no half-pixel centres, last row/column clamped) on [0, 255]
#   floats, then (v - 128) / 128: the original TTUR FID code, the ADM evaluator and NVIDIA's TorchScript detector
#   used by EDM and StyleGAN (which emulates this resize with affine_grid + grid_sample). EDM's fid-refs and ADM's
#   reference batches were made this way.
# Not offered: clean-fid's `clean` mode (PIL bicubic with antialiasing per channel, then (v - 128) / 128), which
#   runs about 5-10 % higher than both; torchmetrics >= 1.8 antialiases by default and differs again.
# At 299x299 input the two modes differ only in the normalisation; upsampling 32x32 CIFAR images amplifies the
# resize differences, so FIDs from different modes are never comparable.


def resize_tf1_bilinear(x, size=299):
    """TF1 `resize_bilinear(align_corners=False)` of float (N, C, H, W) to (N, C, size, size)."""
    for dim in (3, 2):  # width first, then height: the order of TF's top/bottom interpolation
        n = x.shape[dim]
        scale = torch.tensor(n, dtype=torch.float32) / size  # TF computes the scale and coordinates in float32
        source = torch.arange(size, dtype=torch.float32) * scale
        lower = source.floor().long().clamp(max=n - 1)
        upper = (lower + 1).clamp(max=n - 1)
        shape = [size if d == dim else 1 for d in range(4)]
        weight = (source - lower).view(shape).to(x.device)
        low, high = x.index_select(dim, lower.to(x.device)), x.index_select(dim, upper.to(x.device))
        x = low + (high - low) * weight
    return x


def preprocess_images(images, mode="pytorch-fid"):
    """uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) in [-1, 1], as pytorch-fid or as the TF pipeline."""
    x = images.float()
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)  # ToTensor divides by 255
        return 2 * x - 1
    if mode == "tf":
        return (resize_tf1_bilinear(x) - 128) / 128
    raise ValueError(f"unknown preprocessing {mode!r}, expected one of {PREPROCESS}")


# ----------------------------------------------------------------------------------------------------------------------
# Features: one pass over the images, features kept on the device, gathered across ranks.


@contextlib.contextmanager
def _numerics(device, precision):
    """Exact fp32 on CUDA unless precision='tf32' (cuDNN convolutions default to TF32); cuDNN autotuning on."""
    if device.type != "cuda":
        yield
        return
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: mixing old and new TF32 flags raises
        value = "tf32" if precision == "tf32" else "ieee"
        flags = [(backends.cudnn.conv, "fp32_precision", value), (backends.cuda.matmul, "fp32_precision", value)]
    else:
        flags = [(backends.cudnn, "allow_tf32", precision == "tf32"),
                 (backends.cuda.matmul, "allow_tf32", precision == "tf32")]
    flags.append((backends.cudnn, "benchmark", True))
    saved = [getattr(owner, name) for owner, name, _ in flags]
    try:
        for owner, name, value in flags:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def _as_uint8_batch(images):
    """Check one batch: uint8 (B, 3, H, W) tensor or array; grayscale (B, 1, H, W) is replicated to RGB."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}; "
                         f"convert samples with (x * 127.5 + 128).clamp(0, 255).to(torch.uint8) first")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class _Progress:
    """A status line every `interval` seconds on rank 0: images done, img/s, ETA (when the total is known)."""

    def __init__(self, total=None, label="fid", interval=10.0, enabled=True):
        self.rank, self.world = _rank_world()
        self.total, self.label, self.interval = total, label, interval
        self.enabled = enabled and self.rank == 0
        self.start = self.last = time.time()
        self.done = 0

    def update(self, count):
        self.done += count * self.world  # ranks progress at about the same pace
        now = time.time()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            rate = self.done / (now - self.start)
            line = f"{self.label}: {self.done}{f'/{self.total}' if self.total else ''} images | {rate:.1f} img/s"
            if self.total:
                line += f" | ETA {_format_seconds(max(self.total - self.done, 0) / rate)}"
            print(line, flush=True)


def _format_seconds(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _feature_batches(batches, detector, device, preprocess, precision, taps, num_images, progress):
    """Yield {tap: (B, dim) float32 on device} per batch; no host sync besides the progress clock."""
    if "logits" in taps and not detector.has_classifier:
        raise ValueError("the Inception Score needs the 1008-way classifier, but these weights have no fc.weight: "
                         f"use pytorch-fid's full weights file {WEIGHTS_FILE}")
    if preprocess not in PREPROCESS:
        raise ValueError(f"unknown preprocessing {preprocess!r}, expected one of {PREPROCESS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}, expected one of {PRECISIONS}")
    meter = _Progress(num_images, enabled=progress)
    for images in batches:  # the settings below stay out of the caller's generator (e.g. a sampler)
        images = _as_uint8_batch(images)
        with torch.no_grad(), _numerics(device, precision):
            if images.device != device:  # pinned host memory lets the copy overlap the previous batch
                pinned = device.type == "cuda" and images.device.type == "cpu"
                images = (images.pin_memory() if pinned else images).to(device, non_blocking=pinned)
            x = preprocess_images(images, preprocess)                          # (B, 3, 299, 299)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                pool, spatial = detector(x)
            features = {"pool": pool.float(), "spatial": spatial.float()}
            if "logits" in taps:
                features["logits"] = detector.logits_unbiased(features["pool"])
        meter.update(len(images))
        yield {tap: features[tap] for tap in taps}


def _all_gather_rows(x):
    """Concatenate each rank's (n_r, ...) tensor in rank order on every rank; counts may differ between ranks."""
    rank, world = _rank_world()
    if world == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    counts = [int(c) for c in counts]
    padded = x.new_zeros((max(counts), *x.shape[1:]))  # all_gather needs equal shapes
    padded[:len(x)] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])


def _default_device(detector=None, device=None):
    if device is not None:
        return torch.device(device)
    if detector is not None:
        return next(detector.parameters()).device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_features(batches, detector=None, device=None, preprocess="pytorch-fid", taps=("pool",),
                     precision="fp32", num_images=None, progress=True):
    """Inception features of an iterable of uint8 (B, 3, H, W) batches.

    Returns {tap: float32 tensor on `device`}: 'pool' (N, 2048), 'spatial' (N, 2023), 'logits' (N, 1008).
    Under torch.distributed each rank passes its share and every rank receives all N rows, in rank order.
    num_images (the global count, optional) only serves the progress line's ETA.
    """
    device = _default_device(detector, device)
    detector = detector if detector is not None else load_inception(device=device)
    chunks = collections.defaultdict(list)
    for features in _feature_batches(batches, detector, device, preprocess, precision, taps, num_images, progress):
        for tap, value in features.items():
            chunks[tap].append(value)
    empty = {tap: torch.zeros(0, detector.dims[tap], device=device) for tap in taps}  # a rank without images
    return {tap: _all_gather_rows(torch.cat(chunks[tap]) if chunks[tap] else empty[tap]) for tap in taps}


# ----------------------------------------------------------------------------------------------------------------------
# Metrics: pure functions of features or statistics (numpy arrays or torch tensors, computed where they live).


def _moments_to_stats(n, total, total_outer):
    """mu and N-1 covariance from sum f and sum f f^T in float64, as EDM's fid.py (pytorch-fid's np.cov agrees)."""
    mu = total / n
    return mu, (total_outer - n * torch.outer(mu, mu)) / (n - 1)


def mean_cov(features):
    """(N, D) features -> mu (D,) and sigma (D, D), float64 tensors where the features are."""
    f = torch.as_tensor(features).double()
    return _moments_to_stats(len(f), f.sum(0), f.T @ f)


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1=None):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the Frechet distance of two Gaussians.

    pytorch-fid and EDM take scipy.linalg.sqrtm(sigma1 @ sigma2), which can turn complex or non-finite when the
    covariances are rank-deficient (fewer images than dimensions) and then needs an eps retry and an imaginary-part
    check. The trace only needs the eigenvalues of sigma1 @ sigma2, which equal those of the symmetric PSD matrix
    G^T sigma2 G for any factor sigma1 = G G^T: a Cholesky factor, or V diag(lambda)^(1/2) from the
    eigendecomposition when sigma1 is singular, or factor1 (D, r) if given (e.g. the centred features divided by
    sqrt(N - 1) when N <= D, see features_frechet_distance). This agrees with sqrtm to ~1e-12 where sqrtm works
    and stays exact where it does not. FD(x, x) is 0 up to rounding and may come out slightly negative.
    """
    tensors = [torch.as_tensor(a) for a in (mu1, sigma1, mu2, sigma2)]
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    mu1, sigma1, mu2, sigma2 = (t.to(device, torch.float64) for t in tensors)
    mu1, mu2 = mu1.reshape(-1), mu2.reshape(-1)
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics have mismatched shapes: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    if not all(torch.isfinite(t).all() for t in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    if factor1 is None:
        factor1, info = torch.linalg.cholesky_ex(sigma1)                       # sigma1 = G G^T
        if info != 0:  # singular: factor through the eigendecomposition (slower)
            eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
            # Eigenvalues at rounding level (matrix-rank tolerance) are zeros of the true sigma1; keeping their
            # noise would add sqrt(noise) terms to the trace.
            tolerance = d * torch.finfo(torch.float64).eps * eigenvalues.abs().max()
            factor1 = eigenvectors * torch.where(eigenvalues > tolerance, eigenvalues, 0).sqrt()
    factor1 = torch.as_tensor(factor1).to(device, torch.float64)                 # (D, r)
    middle = factor1.T @ sigma2 @ factor1                                       # (r, r)
    middle = (middle + middle.T) / 2                                            # symmetric up to rounding
    trace_covmean = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()     # tr (sigma1 sigma2)^(1/2)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_covmean)


def features_frechet_distance(features, mu_ref, sigma_ref):
    """Frechet distance of (N, D) features to reference statistics (FID on pool features, sFID on spatial ones).

    With N <= D images sigma = G G^T for G the centred features / sqrt(N - 1), an exact factor of rank < N, so the
    rank-deficient covariance needs no D x D eigendecomposition.
    """
    f = torch.as_tensor(features).double()
    mu, sigma = mean_cov(f)
    factor = (f - mu).T / math.sqrt(len(f) - 1) if len(f) <= f.shape[1] else None  # (D, N)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref, factor1=factor)


def inception_score(logits, num_splits=10, split_size=None):
    """Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)) per split, mean and std over splits.

    logits: (N, 1008) unbiased logits. Splits are consecutive rows. split_size=None: num_splits equal splits,
    split k = rows [k N / S, (k+1) N / S), as StyleGAN3. split_size=k: rows [0, k), [k, 2k), ... with a shorter last
    split, as ADM's evaluator (k = 5000); the two agree at N = 50,000 but not elsewhere (N = 5,003 gives ADM a
    split of 3 images). Log-softmax in float64 avoids the 0 * log 0 = nan of the reference code.
    """
    log_p = torch.log_softmax(torch.as_tensor(logits).double(), dim=1)   # (N, C) log p(y|x)
    n = len(log_p)
    if split_size is not None:
        bounds = [(start, min(start + split_size, n)) for start in range(0, n, split_size)]
    else:
        if n < num_splits:
            raise ValueError(f"the Inception Score needs at least {num_splits} images (one per split), got {n}")
        bounds = [(k * n // num_splits, (k + 1) * n // num_splits) for k in range(num_splits)]
    if not bounds:
        raise ValueError("the Inception Score needs at least 1 image")
    scores = []
    for start, stop in bounds:
        part = log_p[start:stop]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))  # (C,) log p(y) over the split
        kl = (part.exp() * (part - log_marginal)).sum(dim=1)              # (n_k,) KL per image
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _squared_distances(u, v):
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, max(|u|^2 - 2 u.v + |v|^2, 0) as ADM computes them."""
    return (u.square().sum(1, keepdim=True) - 2 * u @ v.T + v.square().sum(1)).clamp(min=0)


def _row_blocks(n_rows, n_cols):
    """Row ranges whose (rows, n_cols) float32 distance block stays under ~1 GB."""
    step = max(1, (1 << 28) // max(n_cols, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def manifold_radii(features, k=3):
    """(N, D) -> (N,) squared distance to the k-th nearest other point (the (k+1)-th smallest, self included)."""
    if len(features) < k + 1:
        raise ValueError(f"precision/recall with k={k} needs at least {k + 1} images per set, got {len(features)}")
    return torch.cat([_squared_distances(features[a:b], features).kthvalue(k + 1, dim=1).values
                      for a, b in _row_blocks(len(features), len(features))])


def _inside_any_ball(points, centres, radii):
    """(n, D) points, (m, D) centres, (m,) squared radii -> (n,) bool: within some centre's ball (<=, as ADM)."""
    return torch.cat([(_squared_distances(points[a:b], centres) <= radii).any(dim=1)
                      for a, b in _row_blocks(len(points), len(centres))])


def precision_recall(ref_features, features, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) with the ADM evaluator's conventions.

    precision: fraction of samples inside the k-NN ball of some reference image; recall: fraction of reference
    images inside the k-NN ball of some sample. ADM computes the squared distances in fp16 (falling back to fp32
    on overflow); here they are fp32, which moves P and R by about 0.001-0.003 in ports that compared both.
    """
    ref = torch.as_tensor(ref_features).float()
    samples = torch.as_tensor(features).float().to(ref.device)
    precision = _inside_any_ball(samples, ref, manifold_radii(ref, k)).double().mean()
    recall = _inside_any_ball(ref, samples, manifold_radii(samples, k)).double().mean()
    return float(precision), float(recall)


def kernel_inception_distance(features, ref_features, num_subsets=100, max_subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, mean and std over subsets.

    As StyleGAN3 and clean-fid: m = min(N, N_ref, max_subset_size); each subset draws m generated and m reference
    rows without replacement (generated first); the cross term includes i = j. Seeded, so repeatable; the value
    can be slightly negative.
    """
    x_all = torch.as_tensor(features).double()
    y_all = torch.as_tensor(ref_features).double().to(x_all.device)
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {len(x_all)} and {len(y_all)}")
    rng = np.random.RandomState(seed)
    estimates = []
    for _ in range(num_subsets):
        x = x_all[torch.from_numpy(rng.choice(len(x_all), m, replace=False)).to(x_all.device)]
        y = y_all[torch.from_numpy(rng.choice(len(y_all), m, replace=False)).to(x_all.device)]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()
        estimates.append(within / (m * (m - 1)) - 2 * k_xy.sum() / m ** 2)
    estimates = torch.stack(estimates)
    return float(estimates.mean()), float(estimates.std(unbiased=False))


# ----------------------------------------------------------------------------------------------------------------------
# Reference statistics: EDM's fid-refs format (`mu`, `sigma`) plus optional extras, and ADM reference batches.


def compute_stats(batches, detector=None, device=None, preprocess="pytorch-fid", spatial=True,
                  max_features=10000, seed=0, precision="fp32", num_images=None, progress=True):
    """Reference statistics of an iterable of uint8 (B, 3, H, W) batches, streamed in constant memory.

    Returns numpy arrays: mu (2048,), sigma (2048, 2048) and, with spatial, mu_s / sigma_s (2023-d, for sFID);
    pool: pool features of a uniform random subset of up to max_features images (for precision/recall and
    KID; ADM's reference batches hold 10,000 images); n; preprocess. Under torch.distributed each rank passes its
    share and every rank gets the statistics of all images.
    """
    device = _default_device(detector, device)
    detector = detector if detector is not None else load_inception(device=device)
    taps = ("pool", "spatial") if spatial else ("pool",)
    dims = detector.dims
    sums = {tap: [torch.zeros(dims[tap], dtype=torch.float64, device=device),
                  torch.zeros(dims[tap], dims[tap], dtype=torch.float64, device=device)] for tap in taps}
    # Uniform subset in one pass: every image draws a random key and the max_features smallest keys survive.
    rank, world = _rank_world()
    generator = torch.Generator(device).manual_seed(seed * world + rank)
    kept_keys, kept = torch.zeros(0, device=device), torch.zeros(0, dims["pool"], device=device)
    n = torch.zeros((), dtype=torch.float64, device=device)
    for features in _feature_batches(batches, detector, device, preprocess, precision, taps, num_images, progress):
        n += len(features["pool"])
        for tap, value in features.items():
            value = value.double()
            sums[tap][0] += value.sum(0)
            sums[tap][1] += value.T @ value
        keys = torch.cat([kept_keys, torch.rand(len(features["pool"]), device=device, generator=generator)])
        order = keys.argsort()[:max_features]
        kept_keys, kept = keys[order], torch.cat([kept, features["pool"]])[order]
    if world > 1:
        for value in [n, *(s for pair in sums.values() for s in pair)]:
            dist.all_reduce(value)
        kept_keys, kept = _all_gather_rows(kept_keys), _all_gather_rows(kept)
        order = kept_keys.argsort()[:max_features]
        kept = kept[order]
    n = int(n)
    if n < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {n}")
    stats = {"n": n, "preprocess": preprocess}
    for tap, suffix in zip(taps, ("", "_s")):
        stats["mu" + suffix], stats["sigma" + suffix] = (t.cpu().numpy() for t in _moments_to_stats(n, *sums[tap]))
    if max_features > 0:
        stats["pool"] = kept.cpu().numpy()
    return stats


def save_ref(path, stats):
    """Write stats as an uncompressed .npz: `mu`, `sigma` (readable by EDM's and pytorch-fid's tools) plus
    `mu_s`, `sigma_s` (ADM naming), `pool`, `n` and `preprocess` when present. Atomic."""
    arrays = {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64)}
    for key in ("mu_s", "sigma_s"):
        if key in stats:
            arrays[key] = np.asarray(stats[key], np.float64)
    if "pool" in stats:
        arrays["pool"] = np.asarray(stats["pool"], np.float32)
    if "n" in stats:
        arrays["n"] = np.asarray(stats["n"], np.int64)
    for key in ("preprocess", "protocol"):  # the tags: unicode arrays, no pickle needed to read them
        if stats.get(key):
            arrays[key] = np.asarray(stats[key])
    nets.write_atomic(path, lambda f: np.savez(f, **arrays))


def _npz_check(path):
    """A download validator: the file must be a readable .npz (zip directory intact, every member's CRC right)."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"member {bad} is corrupt")


def load_ref(path):
    """Reference for compute_metrics from an .npz or URL, or a folder / zip of images.

    Reads EDM fid-refs and pytorch-fid stats (`mu`, `sigma`), this module's files (plus `mu_s`, `sigma_s`, `pool`,
    `n`, `preprocess`), ADM reference batches (`mu`, `sigma`, `mu_s`, `sigma_s` and `arr_0` images for precision
    and recall) and image sets (ADM sample batches, `x` arrays, folders, zips: statistics are computed from them).
    """
    path = os.fspath(path)
    url = None
    if path.startswith(("http://", "https://")):
        url = path
        try:
            path = nets.download_cached(url, os.path.join(torch.hub.get_dir(), "fid-refs"), validate=_npz_check)
        except nets.WeightsNotFoundError as error:
            raise FileNotFoundError(f"{error}; or pass the local file instead") from None
    if os.path.isdir(path) or path.lower().endswith(".zip"):
        return {"images": path, "path": path}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
        for key, ndim in (("mu", 1), ("sigma", 2), ("mu_s", 1), ("sigma_s", 2), ("pool", 2)):
            if key in keys:  # the shapes are checked before anything is read: a forged one could ask for GBs
                shape, dtype = _npz_header(path, key)
                if len(shape) != ndim or dtype.kind not in "fiu" or (key != "pool" and max(shape) > 8192):
                    raise InputError(f"{key} has shape {shape} of {dtype}, not Inception statistics")
        ref = read_npz(path, ["mu", "sigma", "mu_s", "sigma_s", "pool", "n", "preprocess", "protocol"],
                       optional=("mu", "sigma", "mu_s", "sigma_s", "pool", "n", "preprocess", "protocol"))
        for key in ("preprocess", "protocol"):
            if key in ref:
                if ref[key].dtype.kind not in "US" or ref[key].size != 1:
                    raise InputError(f"{path}: {key} is not a string")
                ref[key] = str(ref[key])
    except (InputError, zipfile.BadZipFile, OSError) as error:
        hint = f" (downloaded from {url}: delete it to download again)" if url else ""
        raise InputError(f"cannot read reference {path}: {' '.join(str(error).split())}{hint}") from None
    ref["path"] = path
    if keys & {"arr_0", "x"}:
        ref["images"] = path  # read only when a metric needs it (ADM reference batches hold 10,000 images)
    if "mu" in ref:
        d = ref["mu"].shape[0] if ref["mu"].ndim == 1 else -1
        if "sigma" not in ref or d < 1 or ref["sigma"].shape != (d, d):  # the width is checked against the detector
            raise ValueError(f"{path}: expected mu (D,) and sigma (D, D) Inception pool statistics (D = 2048), got "
                             f"mu {ref['mu'].shape}, sigma {ref['sigma'].shape if 'sigma' in ref else None}")
    elif "images" not in ref:
        raise ValueError(f"{path} is not a reference: expected `mu` and `sigma` (EDM / pytorch-fid statistics) or "
                         f"images in `arr_0` (ADM) or `x`; found keys {sorted(keys)}")
    return ref


# ----------------------------------------------------------------------------------------------------------------------
# All metrics from one pass.


def _ref_name(ref):
    return ref.get("path") or "the reference"


def resolve_protocol(protocol=None, preprocess=None, ref=None, metrics=("fid",), detector=None, num=None,
                     available=None):
    """Settle the evaluation protocol and run every check that can fail before the long pass.

    protocol: 'edm', 'adm', 'pytorch-fid', None or a dict from an earlier call; preprocess: 'tf', 'pytorch-fid'
    or None; ref: a load_ref path or dict (optional); metrics: the metrics to compute; detector: the loaded
    Inception (optional; checked for the classifier IS needs); num: images to evaluate (None: the protocol's
    number); available: images available (optional). Raises ValueError with one line for: an unknown protocol,
    preprocessing or metric; a preprocessing that contradicts the protocol or the reference's tag; a reference
    with statistics but no tag and neither protocol nor preprocess given (EDM's, ADM's and pytorch-fid's files
    carry none, and the two preprocessings move a CIFAR-10 image's pool features by ~21 %); a reference that
    lacks what a metric needs; IS without the classifier; fewer images available than `num`, or too few for a
    metric. Reads no image.

    Returns a JSON-serialisable dict: protocol (a PROTOCOLS name, or None when only a preprocessing was chosen),
    preprocess, num (None: all images), select ('random', 'first' or 'all'), is_split_size (None: 10 splits),
    tool (the reference implementation followed).
    """
    if isinstance(protocol, dict):
        num = protocol.get("num") if num is None else num
        preprocess = preprocess or protocol.get("preprocess")
        protocol = protocol.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}, expected one of {', '.join(PROTOCOLS)}")
    if preprocess is not None and preprocess not in PREPROCESS:
        raise ValueError(f"unknown preprocessing {preprocess!r}, expected one of {', '.join(PREPROCESS)}")
    metrics = tuple(metrics)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}, expected some of {', '.join(METRICS)}")
    if protocol and preprocess and preprocess != PROTOCOLS[protocol]["preprocess"]:
        raise ValueError(f"protocol {protocol} preprocesses with {PROTOCOLS[protocol]['preprocess']!r}, not "
                         f"{preprocess!r}: drop one of the two")
    ref = load_ref(ref) if isinstance(ref, (str, os.PathLike)) else (ref or {})
    tag, tag_protocol = ref.get("preprocess"), ref.get("protocol")
    has_stats = any(key in ref for key in ("mu", "mu_s", "pool"))
    explicit = protocol or preprocess
    if has_stats and not tag and not explicit:
        raise ValueError(f"{_ref_name(ref)} does not say how its images were preprocessed (EDM, ADM and "
                         f"pytorch-fid files carry no tag): pass --protocol=edm|adm|pytorch-fid for the tool that "
                         f"made it (EDM fid-refs: edm, ADM reference batches: adm)")
    preprocess = PROTOCOLS[protocol]["preprocess"] if protocol else preprocess or tag or "pytorch-fid"
    if has_stats and tag and tag != preprocess:
        raise ValueError(f"{_ref_name(ref)} was made with preprocess={tag!r}, not {preprocess!r}"
                         f"{f' (protocol {protocol})' if protocol else ''}: its FID would be meaningless")
    if protocol is None:
        if tag_protocol in PROTOCOLS and PROTOCOLS[tag_protocol]["preprocess"] == preprocess:
            protocol = tag_protocol  # the protocol the reference was made for
        elif preprocess == "pytorch-fid":
            protocol = "pytorch-fid"
    rules = PROTOCOLS[protocol] if protocol else dict(num=None, select="all", is_split_size=None, tool="fid.py")
    if num is not None and (isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 2):
        raise ValueError(f"--num must be an integer >= 2, got {num!r}")
    select = rules["select"] if num is None or rules["select"] != "all" else "random"
    num = rules["num"] if num is None else int(num)
    if available is not None and num is not None and available < num:
        hint = f" (protocol {protocol} evaluates {num:,}; pass --num={available} to evaluate fewer)" \
            if protocol and num == rules["num"] else ""
        raise ValueError(f"found {available} images, but --num={num}{hint}")
    count = num if num is not None else available

    # What each metric needs: the classifier, reference statistics or features, enough images.
    if "is" in metrics and detector is not None and not getattr(detector, "has_classifier", True):
        raise ValueError("the Inception Score needs the 1008-way classifier, but these weights have no fc.weight: "
                         f"use pytorch-fid's full weights file {WEIGHTS_FILE} (or drop is from --metrics)")
    wanted = {"fid": "mu", "sfid": "mu_s", "pr": "pool", "kid": "pool"}
    missing = sorted({wanted[m] for m in metrics if m in wanted and wanted[m] not in ref})
    if ref and missing and "images" not in ref:
        names = {"mu": "mu/sigma", "mu_s": "mu_s/sigma_s (for sfid)", "pool": "pool features (for pr, kid)"}
        raise ValueError(f"{_ref_name(ref)} has no {' or '.join(names[key] for key in missing)}: make it with "
                         f"`python fid.py ref` (EDM and pytorch-fid files hold only mu and sigma)")
    dims = getattr(detector, "dims", None) or InceptionV3.DIMS
    shapes = {"mu": (dims["pool"],), "sigma": (dims["pool"],) * 2, "mu_s": (dims["spatial"],),
              "sigma_s": (dims["spatial"],) * 2}
    for key, shape in shapes.items():
        if key in ref and tuple(np.shape(ref[key])) != shape:
            raise ValueError(f"{_ref_name(ref)}: {key} has shape {tuple(np.shape(ref[key]))}, expected {shape}")
    if "pool" in ref and (np.ndim(ref["pool"]) != 2 or np.shape(ref["pool"])[1] != dims["pool"]):
        raise ValueError(f"{_ref_name(ref)}: pool has shape {tuple(np.shape(ref['pool']))}, expected "
                         f"(N, {dims['pool']})")
    if count is not None:
        least = {"fid": 2, "sfid": 2, "kid": 2, "pr": 4, "is": 1 if rules["is_split_size"] else 10}
        for metric in metrics:
            if count < least[metric]:
                raise ValueError(f"{metric} needs at least {least[metric]} images, got {count}")
    return dict(protocol=protocol, preprocess=preprocess, num=num, select=select,
                is_split_size=rules["is_split_size"], tool=rules["tool"])


def select_images(count, protocol, seed=0):
    """Indices of the images a resolved protocol evaluates out of `count` (EDM: sorted seeded subset)."""
    num = protocol["num"] if isinstance(protocol, dict) else protocol
    if num is None or num == count:
        return np.arange(count)
    if count < num:
        raise ValueError(f"found {count} images, but --num={num}")
    if isinstance(protocol, dict) and protocol.get("select") == "first":
        return np.arange(num)
    return np.sort(np.random.RandomState(seed % (1 << 31)).permutation(count)[:num])


def _image_source_batches(source, batch_size=100, workers=4):
    """This rank's contiguous share of an ImageSource as uint8 batches."""
    rank, world = _rank_world()
    return image_batches(source, np.array_split(np.arange(len(source)), world)[rank], batch_size, workers)


def compute_metrics(batches, ref, metrics=("fid",), detector=None, device=None, preprocess=None,
                    precision="fp32", num_images=None, seed=0, progress=True, protocol=None):
    """Metrics of the images in `batches` (uint8 (B, 3, H, W)) against `ref` (a load_ref path or dict).

    metrics: any of 'fid', 'is' (returns 'is' and 'is_std'), 'sfid', 'pr' ('precision', 'recall'; k = 3) and
    'kid' ('kid', 'kid_std'; 100 subsets of 1000). All come from one Inception pass. Under torch.distributed each
    rank passes its share and every rank returns the same dict.
    protocol: 'edm', 'adm', 'pytorch-fid' or resolve_protocol's dict (call resolve_protocol before sampling, so its
    checks fail early, and pass its dict here). It sets the preprocessing and the IS splits, the number of images
    must then equal its num, and the results also hold 'preprocess' and, when a protocol is named, 'protocol'
    (strings, for the metrics JSON). Without it the results hold floats only and the preprocessing is
    `preprocess`, else the reference's tag, else pytorch-fid; a reference with statistics but no tag is refused
    (see resolve_protocol).
    seed: KID's subsets.
    """
    ref = load_ref(ref) if isinstance(ref, (str, os.PathLike)) else ref
    device = _default_device(detector, device)
    detector = detector if detector is not None else load_inception(device=device)
    resolved = resolve_protocol(protocol, preprocess, ref, metrics, detector)
    metrics = tuple(metrics)
    options = dict(preprocess=resolved["preprocess"], precision=precision, progress=progress)

    # Reference side: stored statistics, else computed from the reference images (ADM batches hold both).
    wanted = {"fid": "mu", "sfid": "mu_s", "pr": "pool", "kid": "pool"}
    if any(m in wanted and wanted[m] not in ref for m in metrics):
        images = ref["images"] if isinstance(ref["images"], ImageSource) else ImageSource(ref["images"])
        features = compute_features(_image_source_batches(images), detector, device, taps=("pool", "spatial"),
                                    num_images=len(images), **options)
        ref = {**ref, "pool": features["pool"]}
        for tap, suffix in (("pool", ""), ("spatial", "_s")):
            if "mu" + suffix not in ref:
                ref["mu" + suffix], ref["sigma" + suffix] = mean_cov(features[tap])

    # Sample side: one pass, only the taps the metrics need.
    taps = ("pool",) + (("spatial",) if "sfid" in metrics else ()) + (("logits",) if "is" in metrics else ())
    features = compute_features(batches, detector, device, taps=taps, num_images=num_images, **options)
    n = len(features["pool"])
    if n < 2:
        raise ValueError(f"metrics need at least 2 images, got {n}")
    if protocol is not None and resolved["num"] is not None and n != resolved["num"]:
        raise ValueError(f"protocol {resolved['protocol']} evaluates {resolved['num']} images, got {n}")
    if n < 2048 and {"fid", "sfid"} & set(metrics):
        warnings.warn(f"FID from {n} < 2048 images: the covariance is rank-deficient and FID is biased upwards; "
                      f"report FID of 50,000 images")
    results = {}
    with _numerics(device, precision):
        if "fid" in metrics:
            results["fid"] = features_frechet_distance(features["pool"], ref["mu"], ref["sigma"])
        if "is" in metrics:
            results["is"], results["is_std"] = inception_score(features["logits"],
                                                               split_size=resolved["is_split_size"])
        if "sfid" in metrics:
            results["sfid"] = features_frechet_distance(features["spatial"], ref["mu_s"], ref["sigma_s"])
        if "pr" in metrics:
            ref_pool = torch.as_tensor(ref["pool"]).to(device)
            results["precision"], results["recall"] = precision_recall(ref_pool, features["pool"])
        if "kid" in metrics:
            results["kid"], results["kid_std"] = kernel_inception_distance(features["pool"], ref["pool"], seed=seed)
    if protocol is not None:  # strings beside the floats, for the metrics JSON ('protocol' only when there is one)
        results.update({"protocol": resolved["protocol"]} if resolved["protocol"] else {},
                       preprocess=resolved["preprocess"])
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Reading images: folders, EDM-style zips, .npz arrays and the CIFAR-10 training set, with their labels. Nothing read
# here runs code, and what is allocated is bounded by the size of the file read (see docs/evaluation.md).


class InputError(ValueError):
    """Bad input (a file that cannot be read as what it claims to be): one line, exit status 2 on the command line."""


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MAX_IMAGE_PIXELS = 1 << 25      # one decoded image at most (33.5 M pixels, ~100 MB as RGB); PIL itself allows 179 M
MAX_ZIP_RATIO = 1100            # deflate expands at most ~1032:1, so a member declaring more is not what it claims
MAX_LABEL = (1 << 31) - 1


def decoded_budget(stored_bytes):
    """The most bytes of decoded images that an input of stored_bytes may give: max(256 MiB, 256 x stored_bytes).
    (PNG and deflate reach ~1000:1 on flat images; real photos and even CIFAR-10's 32x32 PNGs stay under 4:1.)"""
    return max(256 << 20, 256 * stored_bytes)


def _zip_member_checked(archive, info, what):
    """A zip member's declared size must be one its compressed bytes can hold (zipfile never returns more than the
    declared size, so this bounds what a read allocates by ~1000 times the member's bytes in the file)."""
    if info.file_size > MAX_ZIP_RATIO * info.compress_size + (1 << 16):
        raise InputError(f"{what}: zip member {info.filename} declares {info.file_size} bytes from "
                         f"{info.compress_size} compressed bytes (a zip bomb?)")
    return info


def read_npz(path, keys=None, optional=()):
    """{key: array} of an .npz, without pickles and with every array's header checked before it is read: its
    declared bytes must fit in the member's size, and that size must fit in the member's compressed bytes, so a
    small file cannot make np.load allocate gigabytes. keys: the arrays to read (None: all); a key in `optional` may
    be absent. Raises InputError with one line."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
            wanted = list(members) if keys is None else [key for key in keys if key in members or key not in optional]
            arrays = {}
            for key in wanted:
                if key not in members:
                    raise InputError(f"{path}: no array {key!r} (found {sorted(members)})")
                info = _zip_member_checked(archive, members[key], path)
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0), (3, 0)):
                        raise InputError(f"{path}: {key} has .npy format version {version}")
                    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = reader(f, max_header_size=10000)
                    if dtype.hasobject:
                        raise InputError(f"{path}: {key} holds Python objects (a pickle), which are not read")
                    if any(not isinstance(size, int) or size < 0 for size in shape):
                        raise InputError(f"{path}: {key} has an invalid shape {shape}")
                    nbytes = math.prod(shape) * dtype.itemsize
                    if nbytes > info.file_size:
                        raise InputError(f"{path}: {key} declares shape {shape} ({nbytes} bytes), but its member "
                                         f"holds {info.file_size} bytes (truncated or forged)")
                with archive.open(info) as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
            return arrays
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, struct.error, OverflowError, MemoryError) as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise InputError(f"cannot read {path} as an .npz: {reason}") from None


def _npz_header(path, key):
    """(shape, dtype) of one array of an .npz, from its header only (the same checks as read_npz)."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = _zip_member_checked(archive, archive.getinfo(key + ".npy"), path)
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = reader(f, max_header_size=10000)
        if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
            raise InputError(f"{path}: {key} declares shape {shape} of {dtype}, more than its {info.file_size} bytes")
        return tuple(shape), dtype
    except InputError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, struct.error) as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise InputError(f"cannot read images from {path}: {reason}") from None


def _integer_labels(values, count, where):
    """int64 (count,) from a sequence or array of labels: integers >= 0 only (a float such as 1.5, a bool, a string
    or a nested list is an error, never truncated)."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu" or values.shape != (count,):
            raise InputError(f"{where}: labels must be {count} integers, got {values.dtype} {values.shape}")
        if count and (values.min() < 0 or values.max() > MAX_LABEL):
            raise InputError(f"{where}: labels must be integers in 0..{MAX_LABEL}, got {values.min()}..{values.max()}")
        return values.astype(np.int64)
    labels = np.empty(count, np.int64)
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_LABEL:
            raise InputError(f"{where}: label {value!r} is not an integer in 0..{MAX_LABEL}")
        labels[i] = value
    return labels


def _labels_from_dataset_json(data, names, where):
    """Labels of `names` (sorted image names) from an EDM dataset.json ({"labels": [[name, id], ...]} or
    {"labels": null}); None when it holds none. Any other layout raises InputError with one line."""
    try:
        table = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{where}: dataset.json is not valid JSON ({' '.join(str(error).split())[:120]})") from None
    if not isinstance(table, dict):
        raise InputError(f"{where}: dataset.json must be an object {{\"labels\": [[name, id], ...]}}, "
                         f"not a {type(table).__name__}")
    entries = table.get("labels")
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise InputError(f"{where}: dataset.json labels must be a list of [name, id] pairs, not "
                         f"{type(entries).__name__}")
    by_name = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise InputError(f"{where}: dataset.json label entry {json.dumps(entry)[:60]} is not [name, id]")
        by_name[entry[0]] = entry[1]
    missing = [name for name in names if name not in by_name]
    if missing:
        raise InputError(f"{where}: dataset.json has no label for {missing[0]}")
    return _integer_labels([by_name[name] for name in names], len(names), f"{where}: dataset.json")


class _CifarArray:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') in a CIFAR-10 batch: BUILD gives it its state."""
    state = None


class _CifarDtype:
    """numpy.dtype('u1', False, True) in a CIFAR-10 batch: only plain unsigned bytes."""

    def __init__(self, code, align=False, copy=True):
        if code not in ("u1", b"u1") or not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int)):
            raise pickle.UnpicklingError(f"dtype {code!r} is not uint8")


def _cifar_reconstruct(cls, shape, code):
    if cls is not _NDARRAY or shape != (0,) or code not in (b"b", "b"):
        raise pickle.UnpicklingError("an array that is not a plain ndarray")
    return _CifarArray()


_NDARRAY = object()  # stands for numpy.ndarray, which is never called


class _CifarUnpickler(pickle._Unpickler):
    """Reads the official CIFAR-10 batches (dicts of bytes keys, lists of ints and of bytes, one uint8 array) and
    nothing else: the only globals are numpy's array and dtype reconstructors, mapped to inert stand-ins, and BUILD
    only gives those stand-ins plain data."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _cifar_reconstruct
        if module == "numpy" and name == "ndarray":
            return _NDARRAY
        if module == "numpy" and name == "dtype":
            return _CifarDtype
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which the CIFAR-10 batches do not")

    def load_build(self):
        state, inst = self.stack.pop(), self.stack[-1]
        if isinstance(inst, _CifarDtype):
            if not (isinstance(state, tuple) and len(state) == 8 and state[1] in ("|", b"|")
                    and state[2:5] == (None, None, None)):
                raise pickle.UnpicklingError("a dtype state other than plain uint8")
        elif isinstance(inst, _CifarArray) and inst.state is None:
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _CifarDtype)
                    and isinstance(state[4], bytes) and isinstance(state[1], tuple)
                    and all(isinstance(n, int) and n >= 0 for n in state[1])
                    and math.prod(state[1]) == len(state[4])):
                raise pickle.UnpicklingError("an array state other than raw uint8 bytes of its shape")
            inst.state = state
        else:
            raise pickle.UnpicklingError(f"sets the state of a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids")


def _read_cifar_batch(data, name):
    """One official batch (bytes of a pickle) -> (images (N, 32, 32, 3) uint8, labels (N,) int64)."""
    try:
        batch = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, KeyError, TypeError, ValueError,
            struct.error, RecursionError) as error:
        raise InputError(f"CIFAR-10 {name}: not read ({' '.join(str(error).split())[:160] or type(error).__name__})")
    if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), _CifarArray) or batch[b"data"].state is None:
        raise InputError(f"CIFAR-10 {name}: not an official batch (a dict with a uint8 array under 'data')")
    _, shape, _, _, raw = batch[b"data"].state
    labels = batch.get(b"labels")
    if len(shape) != 2 or shape[1] != 3072 or not isinstance(labels, list) or len(labels) != shape[0]:
        raise InputError(f"CIFAR-10 {name}: data {shape} and {type(labels).__name__} labels do not match")
    images = np.frombuffer(raw, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, _integer_labels(labels, shape[0], f"CIFAR-10 {name}")


def read_cifar10(cache_dir=None):
    """The CIFAR-10 training split, (images (50000, 32, 32, 3) uint8, labels (50000,) int64), from the official
    python tarball: downloaded once into cache_dir (default nets.default_cache_dir()), its md5 checked at every use
    (a file that fails is refused before anything in it is read: delete it to download again), and its batches read
    by _CifarUnpickler, which builds only dicts, lists, ints, bytes and the uint8 array."""
    path = os.path.join(cache_dir or nets.default_cache_dir(), "cifar-10-python.tar.gz")

    def md5_of(file_path):
        digest = hashlib.md5()
        with open(file_path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def validate(file_path):
        if md5_of(file_path) != CIFAR10_MD5:
            raise ValueError(f"md5 is not {CIFAR10_MD5}")

    if not os.path.isfile(path):
        try:
            nets.download_file(CIFAR10_URL, path, validate=validate)
        except nets.WeightsNotFoundError as error:
            raise FileNotFoundError(f"CIFAR-10: {error}") from None
    if md5_of(path) != CIFAR10_MD5:
        raise InputError(f"{path} is not the CIFAR-10 archive (md5 differs from {CIFAR10_MD5}); nothing in it was "
                         "read: delete it to download again")
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for i in range(1, 6):
                member = archive.getmember(f"cifar-10-batches-py/data_batch_{i}")
                batch_images, batch_labels = _read_cifar_batch(archive.extractfile(member).read(), f"data_batch_{i}")
                images.append(batch_images)
                labels.append(batch_labels)
    except (tarfile.TarError, KeyError, OSError, EOFError) as error:
        raise InputError(f"{path}: cannot read the CIFAR-10 archive ({error}); delete it to download again") from None
    return np.concatenate(images), np.concatenate(labels)


class ImageSource:
    """Indexable images as uint8 (C, H, W) arrays, with labels.

    source: a folder (searched recursively, sorted by relative path, case-insensitive extensions as EDM), an
    EDM-style zip, an .npz with `x` or ADM's `arr_0` (optional `y` labels), a uint8 array (N, H, W[, C]), or the
    word `cifar10` (the training split, see read_cifar10; cache_dir is where its archive is kept). Decoding follows
    pytorch-fid: with rgb (default), PIL's convert('RGB') replicates grayscale and drops alpha, so C = 3; with
    rgb=False a grayscale image keeps its one channel (RGBA and palette images become RGB).

    Attributes: names (image names, or a range for arrays), labels (int64 (N,) or None: from dataset.json in a
    folder or zip (EDM: {"labels": [[name, id], ...]}), else class sub-folders of a folder or zip (sorted folder
    names -> 0..K-1), else `y` of an .npz), class_names (a list or None: the class folders' names, CIFAR-10's,
    or `classes` of an .npz), path. Unreadable or malformed inputs raise InputError (a ValueError) with one line
    naming the file; a missing one FileNotFoundError.
    """

    def __init__(self, source, cache_dir=None, rgb=True):
        self.array = self.zip = self.key = self.labels = self.class_names = None
        self.rgb = rgb
        self._lock = threading.Lock()
        self._local = threading.local()
        if isinstance(source, np.ndarray):
            self.path, self.array = "array", self._check_array(source, "array")
            self.names = range(len(self.array))
            return
        self.path = os.fspath(source)
        if self.path == "cifar10":
            self.array, self.labels = read_cifar10(cache_dir)
            self.names, self.class_names = range(len(self.array)), list(CIFAR10_CLASSES)
            return
        if os.path.isdir(self.path):
            files = sorted(os.path.relpath(os.path.join(root, name), self.path).replace(os.sep, "/")
                           for root, _, names in os.walk(self.path) for name in names)
        elif self.path.lower().endswith(".npz") and os.path.isfile(self.path):
            self._open_npz()
            return
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            try:
                self.zip = zipfile.ZipFile(self.path)
                files = sorted(info.filename for info in self.zip.infolist() if not info.is_dir())
            except (zipfile.BadZipFile, OSError, ValueError) as error:
                raise InputError(f"cannot read {self.path} as a zip: {error}") from None
        elif not os.path.exists(self.path):
            raise FileNotFoundError(f"no image folder, zip or .npz at {self.path} (nor the word cifar10)")
        else:
            raise InputError(f"{self.path} is not an image folder, a zip or an .npz")
        self.names = [name for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
        if len(self.names) == 0:
            raise InputError(f"no images in {self.path} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if "dataset.json" in files:
            self.labels = _labels_from_dataset_json(self.read_file("dataset.json", 1 << 28), self.names, self.path)
        elif all("/" in name for name in self.names):
            self.class_names = sorted({name.split("/")[0] for name in self.names})
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = np.array([index[name.split("/")[0]] for name in self.names], np.int64)

    def _open_npz(self):
        """Only the headers are read here, so that checks on the count fail before any image is loaded."""
        try:
            with zipfile.ZipFile(self.path) as archive:
                members = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise InputError(f"cannot read images from {self.path}: {error}") from None
        self.key = "x" if "x" in members else "arr_0" if "arr_0" in members else None
        if self.key is None:
            raise InputError(f"cannot read images from {self.path}: expected images in `x` or `arr_0`, found keys "
                             f"{sorted(members)}")
        shape, dtype = _npz_header(self.path, self.key)
        self._check_array(np.empty((0,) + tuple(shape[1:]), dtype), self.path, shape)
        budget = decoded_budget(os.path.getsize(self.path))
        if math.prod(shape) * dtype.itemsize > budget:
            raise InputError(f"{self.path}: {self.key} declares {shape} ({math.prod(shape)} bytes), more than "
                             f"{budget} bytes for a file of {os.path.getsize(self.path)} (see fid.decoded_budget)")
        self.names = range(shape[0] if shape else 0)
        extra = read_npz(self.path, [key for key in ("y", "classes") if key in members])
        if "y" in extra:
            self.labels = _integer_labels(extra["y"], len(self.names), f"{self.path}: y")
        if "classes" in extra and extra["classes"].dtype.kind in "US" and extra["classes"].ndim == 1:
            self.class_names = [str(name) for name in extra["classes"].tolist()]
        if len(self.names) == 0:
            raise InputError(f"no images in {self.path}")

    @staticmethod
    def _check_array(array, where, shape=None):
        if array.ndim == 3:
            array = array[..., None]  # (N, H, W) grayscale
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
            hint = " (channels first? transpose it to (N, H, W, C))" \
                if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3, 4) else ""
            raise InputError(f"{where}: expected uint8 images (N, H, W, C) with C in 1, 3, 4; got {array.dtype} "
                             f"{tuple(shape or array.shape)}{hint}")
        return array

    def _load_array(self):
        """The .npz images, read once on first use (by whichever decoding thread comes first)."""
        with self._lock:
            if self.array is None:
                self.array = self._check_array(read_npz(self.path, [self.key])[self.key], self.path)
        return self.array

    def read_file(self, name, limit=1 << 26):
        """The bytes of a non-image file of a folder or zip (e.g. dataset.json, captions.txt), at most `limit`."""
        if self.zip is not None:
            with self._lock:
                info = _zip_member_checked(self.zip, self.zip.getinfo(name), self.path)
                if info.file_size > limit:
                    raise InputError(f"{self.path}: {name} has {info.file_size} bytes, more than {limit}")
                return self.zip.read(info)
        file_path = os.path.join(self.path, name)
        if os.path.getsize(file_path) > limit:
            raise InputError(f"{file_path} has {os.path.getsize(file_path)} bytes, more than {limit}")
        with open(file_path, "rb") as f:
            return f.read()

    def __len__(self):
        return len(self.names)

    def _channels(self, image):
        """(H, W, C) -> (C, H, W): C = 3 with rgb, else the stored 1 or 3 (alpha dropped)."""
        if image.shape[2] == 1 and self.rgb:
            image = np.repeat(image, 3, axis=2)
        return np.ascontiguousarray(image[:, :, :3].transpose(2, 0, 1))

    def __getitem__(self, index):
        if self.array is not None or self.key is not None:
            return self._channels((self.array if self.array is not None else self._load_array())[index])
        name = self.names[index]
        where = os.path.join(self.path, name)
        try:
            data = self.read_file(name, 256 << 20)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"{image.width}x{image.height} pixels, more than {MAX_IMAGE_PIXELS}")
                if self.rgb or image.mode not in ("L", "RGB"):
                    image = image.convert("L" if not self.rgb and image.mode in ("1", "LA") else "RGB")
                array = np.asarray(image)
        except Exception as error:  # PIL raises many kinds (SyntaxError for some corrupt headers)
            reason = " ".join(str(error).split())[:200] or f"{type(error).__name__} while decoding"
            raise InputError(f"cannot read image {where}: {reason}") from None
        return self._channels(array[:, :, None] if array.ndim == 2 else array)


def read_image_set(source, cache_dir=None, rgb=True, workers=4):
    """Every image of `source` (see ImageSource) in memory: (images uint8 (N, C, H, W), labels int64 (N,) or None).

    All images must have one size (else InputError naming the first that differs); with rgb=False, grayscale images
    in a set that also holds colour ones are replicated to 3 channels. The decoded total is bounded
    relative to the input: at most decoded_budget(bytes of the file, or of the folder's images)."""
    images = ImageSource(source, cache_dir=cache_dir, rgb=rgb)
    if images.array is not None or images.key is not None:
        array = images.array if images.array is not None else images._load_array()
        if array.shape[-1] == 1 and rgb:
            array = np.repeat(array, 3, axis=3)
        return np.ascontiguousarray(array[..., :3].transpose(0, 3, 1, 2)), images.labels
    if images.zip is not None:
        stored = os.path.getsize(images.path)
    else:
        stored = sum(os.path.getsize(os.path.join(images.path, name)) for name in images.names)
    budget = decoded_budget(stored)
    with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        first = images[0]
        if first.nbytes * len(images) > budget:
            raise InputError(f"{images.path}: {len(images)} images of {first.shape} would take "
                             f"{first.nbytes * len(images)} bytes decoded, more than {budget}")
        decoded = [first, *pool.map(images.__getitem__, range(1, len(images)))]
    if not rgb and any(image.shape[0] == 3 for image in decoded):  # a few grayscale files in a colour set (ImageNet)
        decoded = [np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image for image in decoded]
        first = decoded[0]
    for name, image in zip(images.names, decoded):
        if image.shape != first.shape:
            raise InputError(f"{os.path.join(images.path, name)} is {image.shape[2]}x{image.shape[1]} with "
                             f"{image.shape[0]} channels, but {images.names[0]} is {first.shape[2]}x{first.shape[1]} "
                             f"with {first.shape[0]}: resize or convert them first")
    return np.stack(decoded), images.labels


def image_batches(source, indices, batch_size=100, workers=4):
    """Yield uint8 (B, 3, H, W) tensors of source[indices], decoded ahead by a thread pool.

    Images of another size than their predecessor start a new batch (with a warning): each image is resized to
    299x299 on its own, as it would be alone, rather than being resampled twice.
    """
    warned = False
    with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        pending = collections.deque()
        batch = []
        for position in range(len(indices) + 1):
            # Keep two batches of decoding in flight so the device never waits for PIL.
            while len(pending) < 2 * batch_size and position + len(pending) < len(indices):
                pending.append(pool.submit(source.__getitem__, int(indices[position + len(pending)])))
            image = pending.popleft().result() if position < len(indices) else None
            if batch and (image is None or image.shape != batch[0].shape or len(batch) == batch_size):
                if image is not None and image.shape != batch[0].shape and not warned:
                    warnings.warn(f"{getattr(source, 'path', 'images')}: mixed image sizes ({batch[0].shape[1:]} "
                                  f"and {image.shape[1:]}); each is resized to 299x299 separately")
                    warned = True
                yield torch.from_numpy(np.stack(batch))
                batch = []
            if image is not None:
                batch.append(image)


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`fid.py: error: ...`, exit 2) and no prefix matching of flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"fid.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parse_args(argv):
    parser = _Parser(prog="fid.py", description="FID, IS, sFID, precision/recall and KID (pure-torch Inception-v3).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ref = commands.add_parser("ref", help="compute reference statistics of a dataset")
    ref.add_argument("--data", required=True, help="image folder, EDM-style zip, .npz (`x` / `arr_0`) or cifar10 (the "
                     "training split, downloaded once) (required)")
    ref.add_argument("--num", type=int, default=None,
                     help="use a seeded random subset of this many images (default: all)")
    ref.add_argument("--seed", type=int, default=0, help="seed of the --num subset (default: 0)")
    ref.add_argument("--cache_dir", default=None, help="where --data=cifar10 is kept (default: nets' cache, "
                     "$CORRUPTED_DIFFUSION_CACHE or ~/.cache/corrupted-diffusion)")
    ref.add_argument("--dest", required=True,
                     help="output .npz: EDM fid-refs format (mu, sigma) plus mu_s, sigma_s, pool and the "
                          "preprocess/protocol tags (required)")
    ref.add_argument("--ref_features", type=int, default=10000,
                     help="keep pool features of this many random images for pr/kid (ADM's ref batches hold "
                          "10,000) (default: 10000)")
    calc = commands.add_parser("calc", help="compute metrics of images against reference statistics")
    calc.add_argument("--images", required=True, help="image folder, EDM-style zip or .npz (`x` / `arr_0`) "
                      "(required)")
    calc.add_argument("--ref", required=True, help="reference .npz or URL (EDM, pytorch-fid, ADM, `fid.py ref`), "
                      "or an image folder / zip (required)")
    calc.add_argument("--metrics", default="fid", help=f"comma-separated, from {','.join(METRICS)} (default: fid)")
    calc.add_argument("--num", type=int, default=None,
                      help="images to evaluate: the protocol's number (edm, adm: 50000; pytorch-fid: all), an error "
                           "if fewer are found; with more, edm takes a sorted seeded random subset, adm the first "
                           "ones (default: none)")
    calc.add_argument("--seed", type=int, default=0, help="seed of the --num subset and of KID's subsets (default: 0)")
    calc.add_argument("--json", default=None, help="also write the results, protocol and preprocessing as JSON to "
                      "this file (default: none)")
    for command in (ref, calc):
        command.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                             help="edm (EDM's fid.py), adm (guided-diffusion's evaluator) or pytorch-fid: sets the "
                                  "preprocessing, the number of images and the IS splits; required for a reference "
                                  "without a preprocessing tag, unless --preprocess is given (default: the "
                                  "reference's tag)")
        command.add_argument("--batch", type=int, default=100, help="images per batch and device (default: 100)")
        command.add_argument("--preprocess", choices=PREPROCESS, default=None,
                             help="pytorch-fid or tf (EDM's and ADM's references); set by --protocol (default: the "
                                  "protocol's, else the reference's tag, else pytorch-fid)")
        command.add_argument("--precision", choices=PRECISIONS, default="fp32",
                             help="fp32 (exact), tf32 or bf16 autocast: faster, but they move the features "
                                  "(default: fp32)")
        command.add_argument("--fid_weights", default=None,
                             help=f"path of {WEIGHTS_FILE} (default: $FID_WEIGHTS, then the torch hub cache, "
                                  "downloaded once)")
        command.add_argument("--weights", default=None, help=argparse.SUPPRESS)  # renamed: refused below
        command.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
        command.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                             help="image decoding threads (default: min(8, CPU count))")
    args = parser.parse_args(argv)

    if args.weights is not None:
        parser.error("--weights is not supported: the FID weights flag is --fid_weights=PATH")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    try:
        device_type = torch.device(args.device).type if args.device else None
    except RuntimeError:
        parser.error(f"--device={args.device} is not a torch device")
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda, but CUDA is not available")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.protocol and args.preprocess and args.preprocess != PROTOCOLS[args.protocol]["preprocess"]:
        parser.error(f"--protocol={args.protocol} preprocesses with {PROTOCOLS[args.protocol]['preprocess']}, not "
                     f"--preprocess={args.preprocess}")
    if args.command == "ref" and args.ref_features < 0:
        parser.error("--ref_features must be >= 0")
    if args.command == "ref" and args.num is not None and args.num < 2:
        parser.error("--num must be >= 2")
    if args.command == "calc":
        args.metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        if not args.metrics or set(args.metrics) - set(METRICS):
            parser.error(f"--metrics must be a comma-separated subset of {','.join(METRICS)}")
        if args.num is not None and args.num < 2:
            parser.error("--num must be >= 2")
    return args


def check_writable(path, flag="--dest"):
    """Fail now, not after the long pass, when `path` cannot be written (a folder, read-only, missing parent)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a folder, expected a file name")
    probe = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(probe, "wb"):
            pass
    except OSError as error:
        raise ValueError(f"{flag}={path} is not writable: {error.strerror or error}") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def _setup_device(requested):
    """Single process, or one process per device under torchrun (nccl on CUDA, gloo on CPU)."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv=None):
    """python fid.py ref --data=... --dest=...  |  python fid.py calc --images=... --ref=... [--metrics=...]

    Exit status 2 for bad flags or inputs (an unreadable image too, when the pass meets it); 1 for another failure.
    """
    args = _parse_args(argv)
    device = _setup_device(args.device)
    rank, world = _rank_world()
    started = False  # errors before the long pass are input errors (2), after it failures while running (1)
    try:
        if args.command == "ref":
            check_writable(args.dest)
            source = ImageSource(args.data, cache_dir=args.cache_dir)
            if args.num is not None and args.num > len(source):
                raise InputError(f"--num={args.num}, but {args.data} holds {len(source)} images")
            resolved = resolve_protocol(args.protocol, args.preprocess)
            detector = load_inception(args.fid_weights, device)
            # A seeded shuffle makes the kept pool features a uniform subset; the statistics ignore order. With
            # --num, its first num images are the subset (--seed=0 and all images: the order used before --num).
            order = np.random.RandomState(args.seed % (1 << 31)).permutation(len(source))[:args.num]
            started = True
            stats = compute_stats(image_batches(source, np.array_split(order, world)[rank], args.batch, args.workers),
                                  detector, device, preprocess=resolved["preprocess"],
                                  max_features=args.ref_features, precision=args.precision, num_images=len(order))
            stats["protocol"] = resolved["protocol"]
            if rank == 0:
                save_ref(args.dest, stats)
                print(f"saved statistics of {stats['n']} images (protocol {resolved['protocol'] or 'none'}, "
                      f"{stats['preprocess']} preprocessing) to {args.dest}")
        else:
            if args.json:
                check_writable(args.json, "--json")
            source = ImageSource(args.images)             # lists the images (or reads an .npz header) only
            ref = load_ref(args.ref)                      # statistics only; reference images are read later
            detector = load_inception(args.fid_weights, device)
            resolved = resolve_protocol(args.protocol, args.preprocess, ref, args.metrics, detector, args.num,
                                        available=len(source))
            indices = select_images(len(source), resolved, args.seed)
            started = True
            batches = image_batches(source, np.array_split(indices, world)[rank], args.batch, args.workers)
            results = compute_metrics(batches, ref, args.metrics, detector, device, precision=args.precision,
                                      num_images=len(indices), seed=args.seed, protocol=resolved)
            if rank == 0:
                for name, value in results.items():
                    print(f"{name:10s} {value:g}" if isinstance(value, float) else f"{name:10s} {value}")
                if args.json:
                    record = {"protocol": None, **results, "images": args.images, "ref": args.ref,
                              "num": len(indices), "is_split_size": resolved["is_split_size"], "tool": resolved["tool"]}
                    nets.write_atomic(args.json, (json.dumps(record, indent=2) + "\n").encode())
    except (ValueError, OSError, nets.WeightsNotFoundError) as error:
        # Bad input (a corrupt image found during the pass too) exits 2, a failure while running 1.
        bad_input = not started or isinstance(error, (InputError, FileNotFoundError, nets.WeightsNotFoundError))
        print(f"fid.py: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        sys.exit(2 if bad_input else 1)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
