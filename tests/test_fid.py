"""Tests of fid.py: detector layout, preprocessing, metric math against closed forms, files, CLI, torchrun.

The network is checked with randomly initialised weights saved to a temporary file; pipeline tests use a tiny
stand-in detector so that they take milliseconds. When the real weights lie beside the repository
(../shared/data/fid_inception_tf2015_nofc_fp16.pth), features of three CIFAR-10 images are compared with
pytorch-fid's, and with RUN_SLOW=1 the FID of two 500-image CIFAR-10 halves with the data README's 76.84.
The evaluation protocols (edm, adm, pytorch-fid) are checked against their reference tools' rules, which the tests
write out (EDM's subset and statistics, ADM's 5,000-image IS splits, pytorch-fid's folder and formula), and every
check that can fail before the long pass is shown to fail before a single image is read.
"""
import hashlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import edm_layouts
import fid

pytestmark = pytest.mark.filterwarnings("ignore:FID from")  # the tests' tiny image sets are far below 2048

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")


class TinyDetector(torch.nn.Module):
    """Stands in for Inception in pipeline tests: cheap deterministic features of the preprocessed input."""

    has_classifier = True
    dims = {"pool": 16, "spatial": 12, "logits": 10}

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(48, 16, generator=generator) / 7)
        self.fc = torch.nn.Linear(16, 10)
        self.fc.weight.data = torch.randn(10, 16, generator=generator) / 4

    def forward(self, x):                                                    # (N, 3, 299, 299)
        pooled = F.adaptive_avg_pool2d(x, 4).flatten(1)                      # (N, 48)
        return torch.tanh(pooled @ self.proj) * 3, pooled[:, :12]            # pool (N, 16), spatial (N, 12)

    def logits_unbiased(self, pool):
        return pool @ self.fc.weight.T


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Randomly initialised FID Inception weights whose features are O(1) (He-initialised convs, random BN):
    'full' in pytorch-fid's format, 'nofc' in the shared offline file's (fp16 convs, no classifier)."""
    net = fid.InceptionV3()
    generator = torch.Generator().manual_seed(0)
    for name, tensor in net.state_dict().items():
        if name.endswith("conv.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2 / tensor[0].numel()))
        elif name.endswith("bn.running_var"):
            tensor.uniform_(0.5, 1.5, generator=generator)
        elif name.endswith("bn.bias"):
            tensor.normal_(0, 0.1, generator=generator)
    state = net.state_dict()
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / "full.pth")
    torch.save({k: v.half() if k.endswith("conv.weight") else v for k, v in state.items() if not k.startswith("fc.")},
               folder / "nofc.pth")
    return {"full": folder / "full.pth", "nofc": folder / "nofc.pth"}


def random_images(n, size=8, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randint(0, 256, (n, 3, size, size), dtype=np.uint8))


def batches_of(images, batch=3):
    return [images[i:i + batch] for i in range(0, len(images), batch)]


# ----------------------------------------------------------------------------------------------------------------------
# Detector


def test_state_dict_layout_matches_pytorch_fid_weights_file():
    net = fid.InceptionV3()
    state = net.state_dict()
    assert len(state) == 472 and sum(p.numel() for p in net.parameters()) == 23_850_960
    lines = sorted(f"{k}\t" + "x".join(map(str, v.shape)) for k, v in state.items())
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == (
        "065ba806520c93e725eb7c99ec06e403f925eeab9f8fc87ca6fe3787f613f2bf")  # keys and shapes of the official file


def test_fid_pooling_patches():
    ones = torch.ones(1, 1, 3, 3)
    assert torch.equal(fid.avg_pool_same(ones), ones)  # torchvision's pool would give 4/9 at the corners
    with torch.device("meta"):
        net = fid.InceptionV3()
    assert net.Mixed_7c.pool == "max" and net.Mixed_7b.pool == "avg"


def test_cpu_pools_are_bitwise_torch_pools():
    # The CPU fast paths (separable max of slices, channels-last average) must equal torch's NCHW kernels exactly,
    # which is what pytorch-fid runs; odd sizes, both strides, and a NaN that must propagate.
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 5, 17, 17), (1, 3, 35, 35), (2, 4, 8, 8), (1, 2, 9, 12)]:
        x = torch.relu(torch.randn(shape, generator=generator))
        x[0, 0, 3, 4] = math.nan
        for stride, padding in [(2, 0), (1, 1)]:
            torch.testing.assert_close(fid.max_pool_3x3(x, stride, padding), F.max_pool2d(x, 3, stride, padding),
                                       rtol=0, atol=0, equal_nan=True)
        x = torch.relu(torch.randn(shape, generator=generator))
        assert torch.equal(fid.avg_pool_same(x), F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)), shape


def test_cpu_fast_paths_leave_the_features_bitwise_unchanged(weights, monkeypatch):
    # The whole network: pool, spatial and logits taps with the fast pools and in-place ReLU equal those of torch's
    # NCHW pooling kernels (what pytorch-fid runs) bit for bit.
    detector = fid.load_inception(weights["full"])
    images = random_images(2, size=13, seed=4)
    fast = fid.compute_features([images], detector, "cpu", taps=("pool", "spatial", "logits"), progress=False)
    monkeypatch.setattr(fid, "max_pool_3x3", lambda x, stride=2, padding=0: F.max_pool2d(x, 3, stride, padding))
    monkeypatch.setattr(fid, "avg_pool_same", lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    plain = fid.compute_features([images], detector, "cpu", taps=("pool", "spatial", "logits"), progress=False)
    for tap in fast:
        assert torch.equal(fast[tap], plain[tap]), tap


def test_forward_taps_shapes_and_sfid_flatten_order():
    net = fid.InceptionV3().eval()

    class KnownMixed6d(torch.nn.Module):  # value c + 10 w + 1000 h at channel c, row h, column w
        def forward(self, x):
            h, w, c = torch.meshgrid(torch.arange(17.0), torch.arange(17.0), torch.arange(768.0), indexing="ij")
            return (c + 10 * w + 1000 * h).permute(2, 0, 1).expand(len(x), -1, -1, -1)

    net.Mixed_6d = KnownMixed6d()
    with torch.no_grad():
        pool, spatial = net(torch.zeros(2, 3, 299, 299))
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023)
    h, w, c = 5, 11, 6
    assert spatial[1, (h * 17 + w) * 7 + c] == c + 10 * w + 1000 * h
    assert torch.equal(net.logits_unbiased(pool), pool @ net.fc.weight.T)


def test_load_inception_variants(weights, tmp_path, monkeypatch):
    full = weights["full"]
    net = fid.load_inception(full)
    assert net.has_classifier and not net.training and not any(p.requires_grad for p in net.parameters())

    # The shared offline file's format: fp16 convs, no classifier, and files with num_batches_tracked.
    nofc = fid.load_inception(weights["nofc"])
    assert not nofc.has_classifier and nofc.Conv2d_1a_3x3.conv.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="classifier"):
        fid.compute_features([random_images(2)], nofc, taps=("pool", "logits"))
    state = torch.load(full)
    torch.save({**state, "Mixed_5b.branch1x1.bn.num_batches_tracked": torch.tensor(0)}, tmp_path / "nbt.pth")
    fid.load_inception(tmp_path / "nbt.pth")

    # Environment variable, wrong files, and a missing download give clear errors.
    monkeypatch.setenv("FID_WEIGHTS", str(full))
    assert fid.weights_path() == str(full)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing"):
        fid.load_inception(tmp_path / "broken.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        fid.load_inception(tmp_path / "garbage.pth")
    monkeypatch.delenv("FID_WEIGHTS")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise fid.requests.ConnectionError("offline")

    monkeypatch.setattr(fid.requests, "get", offline)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth") as error:
        fid.load_inception()
    assert "--fid_weights=PATH" in str(error.value) and "--weights" not in str(error.value)  # the flag's one name

    monkeypatch.undo()  # requests.get is real again; a local server sends bytes whose SHA-256 is not 6726825d...
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / fid.WEIGHTS_FILE).write_bytes(b"not the weights")
    with edm_layouts.serve_folder(tmp_path / "served") as base_url:
        monkeypatch.setattr(fid, "WEIGHTS_URL", f"{base_url}/{fid.WEIGHTS_FILE}")
        with pytest.raises(FileNotFoundError, match="SHA-256"):
            fid.load_inception()
    assert not [p for p in (tmp_path / "hub").rglob("*") if p.is_file()]  # no partial file left behind


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_pytorch_fid_on_hand_made_image():
    # At 299x299 the resize is the identity and v maps to v / 127.5 - 1.
    image = torch.zeros(1, 3, 299, 299, dtype=torch.uint8)
    image[0, :, 0, :3] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = fid.preprocess_images(image)
    assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0, 0, :3], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    # A 1x2 image [0, 255] upsampled with half-pixel centres: column j samples (j + 0.5) * 2 / 299 - 0.5.
    x = fid.preprocess_images(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2))
    for j in (0, 74, 100, 150, 224, 298):
        source = min(max((j + 0.5) * 2 / 299 - 0.5, 0), 1)
        assert abs(x[0, 1, 7, j].item() - (2 * source - 1)) < 1e-6


def test_preprocess_tf_resize_and_normalisation():
    resize = fid.resize_tf1_bilinear
    assert resize(torch.tensor([0.0, 10.0]).view(1, 1, 1, 2), 4)[0, 0, 0].tolist() == [0, 5, 10, 10]
    rows = resize(torch.tensor([[2.0, 2.0], [4.0, 4.0]]).view(1, 1, 2, 2), 3)[0, 0]
    torch.testing.assert_close(rows, torch.tensor([[2.0] * 3, [10 / 3] * 3, [4.0] * 3]))
    ramp = resize(torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4), 299)[0, 0, 0]
    torch.testing.assert_close(ramp[:3], torch.tensor([0, 4 / 299, 8 / 299]))
    assert ramp[-4:].tolist() == [3, 3, 3, 3]
    # NVIDIA's detector (EDM, StyleGAN) emulates the same resize with a shifted affine grid and border sampling.
    for size in (32, 64):
        x = torch.rand(1, 3, size, size, dtype=torch.float64) * 255
        theta = torch.tensor([[[1, 0, 1 / size - 1 / 299], [0, 1, 1 / size - 1 / 299]]], dtype=torch.float64)
        grid = F.affine_grid(theta, [1, 3, 299, 299], align_corners=False)
        nvidia = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        assert (resize(x, 299) - nvidia).abs().max() < 1e-3  # TF's float32 coordinates against float64 ones
    image = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 299, 3).contiguous()
    image = F.pad(image, (0, 296))  # 299 x 299: identity resize
    assert fid.preprocess_images(image, "tf")[0, 0, 0, :3].tolist() == [-1, 0, 0.9921875]
    with pytest.raises(ValueError, match="preprocessing"):
        fid.preprocess_images(image, "clean")


# ----------------------------------------------------------------------------------------------------------------------
# Metric math against closed forms


def test_frechet_distance_closed_forms():
    d = 512  # pytorch-fid's own test uses 2048 dims: FD = d
    assert fid.frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d)) == pytest.approx(d, abs=1e-9)
    # Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2 = 14 + 5.
    assert fid.frechet_distance(np.zeros(3), np.diag([1.0, 4, 9]), np.array([1.0, 2, 3]),
                                np.diag([4.0, 4, 1])) == pytest.approx(19, abs=1e-12)
    assert fid.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10, abs=1e-12)
    # Non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2.
    s1, s2 = np.array([[2.0, 1], [1, 2]]), np.array([[1.0, 0], [0, 4]])
    assert fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(
        9 - 2 * math.sqrt(10 + 2 * math.sqrt(12)), abs=1e-12)


def pytorch_fid_reference(mu1, sigma1, mu2, sigma2):
    """The pytorch-fid / EDM formula with scipy's sqrtm, for comparison."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_sqrtm_and_is_symmetric():
    rng = np.random.RandomState(1)
    a, b = rng.randn(400, 64), rng.randn(400, 64) @ rng.randn(64, 64) * 0.3 + 0.5
    mu1, sigma1 = fid.mean_cov(a)
    mu2, sigma2 = fid.mean_cov(b)
    np.testing.assert_allclose(mu1.numpy(), a.mean(0)) and np.testing.assert_allclose(sigma1.numpy(), np.cov(a.T))
    value = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    args = [t.numpy() for t in (mu1, sigma1, mu2, sigma2)]
    assert value == pytest.approx(pytorch_fid_reference(*args), rel=1e-10)
    assert value == pytest.approx(fid.frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-10)


def test_frechet_distance_rank_deficient():
    # Singular diagonal covariances: the closed form still holds, with no eps and no complex parts.
    v1, v2 = np.array([1.0, 0, 4, 0]), np.array([0.0, 0, 1, 9])
    assert fid.frechet_distance(np.zeros(4), np.diag(v1), np.zeros(4), np.diag(v2)) == pytest.approx(11, abs=1e-12)
    # 50 samples in 256 dims (rank 49, as with fewer images than Inception dimensions).
    rng = np.random.RandomState(2)
    features = rng.randn(50, 256) * rng.uniform(0.1, 3, 256)
    mu, sigma = fid.mean_cov(features)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6 * float(sigma.trace())
    rotated = features @ np.linalg.qr(rng.randn(256, 256))[0]
    distance = fid.frechet_distance(mu, sigma, *fid.mean_cov(rotated))
    assert math.isfinite(distance) and distance > 0
    # The factor taken from the features themselves (what compute_metrics uses below 2048 images) agrees.
    assert fid.features_frechet_distance(features, *fid.mean_cov(rotated)) == pytest.approx(distance, rel=1e-9)
    assert fid.features_frechet_distance(features, *fid.mean_cov(rotated)) == pytest.approx(
        fid.features_frechet_distance(rotated, mu, sigma), rel=1e-9)
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(mu, sigma, mu[:10], sigma)


def test_fid_of_a_set_with_itself_is_zero():
    features = torch.from_numpy(np.random.RandomState(3).randn(1000, 512).astype(np.float32)).abs()
    mu, sigma = fid.mean_cov(features)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6 * float(sigma.trace())


def test_inception_score_known_values():
    assert fid.inception_score(torch.zeros(50, 1008)) == pytest.approx((1.0, 0.0), abs=1e-12)
    two = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64))
    assert fid.inception_score(two, num_splits=1)[0] == pytest.approx(1.4449348111684153, rel=1e-12)
    logits = 30 * F.one_hot(torch.arange(1000) % 10, 1008).double()
    mean, std = fid.inception_score(logits)
    assert mean == pytest.approx(9.99999999759, rel=1e-10) and std < 1e-9
    with pytest.raises(ValueError, match="at least 10"):
        fid.inception_score(torch.zeros(5, 1008))


def test_precision_recall_known_values():
    ref = torch.tensor([0.0, 1, 2, 3]).view(-1, 1)
    samples = torch.tensor([1.5, 6, 100, 101, 102, 103]).view(-1, 1)
    assert fid.manifold_radii(ref).tolist() == [9, 4, 4, 9]
    precision, recall = fid.precision_recall(ref, samples)
    assert precision == pytest.approx(2 / 6) and recall == 1.0  # 6 lies exactly on ref 3's radius: <= counts
    features = torch.randn(40, 32)
    assert fid.precision_recall(features, features) == (1.0, 1.0)
    assert fid.precision_recall(features, features + 100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 4"):
        fid.precision_recall(ref[:3], samples)


def test_kid_known_values():
    assert fid.kernel_inception_distance(torch.zeros(50, 2048), torch.ones(50, 2048), num_subsets=3) == (
        pytest.approx(7.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))  # k(0, .) = 1, k(1, 1) = 8: 1 + 8 - 2
    pair = torch.tensor([[0.0], [1.0]])
    assert fid.kernel_inception_distance(pair, pair, num_subsets=5)[0] == pytest.approx(-3.5, abs=1e-12)
    # Unbiased: about zero for two samples of one distribution, clearly positive after a shift.
    rng = np.random.RandomState(4)
    x, y = rng.randn(1500, 8), rng.randn(1500, 8)
    same, _ = fid.kernel_inception_distance(x, y, num_subsets=10)
    shifted, _ = fid.kernel_inception_distance(x + 0.5, y, num_subsets=10)
    assert abs(same) < 0.01 < shifted


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline, files and bad input


def test_compute_metrics_agrees_with_its_parts():
    detector, images, ref_images = TinyDetector(), random_images(24, seed=5), random_images(20, size=6, seed=6)
    ref = fid.compute_stats(batches_of(ref_images), detector, "cpu", max_features=100)
    assert ref["n"] == 20 and ref["pool"].shape == (20, 16) and ref["preprocess"] == "pytorch-fid"
    results = fid.compute_metrics(batches_of(images), ref, ("fid", "is", "sfid", "pr", "kid"), detector, "cpu")
    features = fid.compute_features(batches_of(images), detector, "cpu", taps=("pool", "spatial", "logits"))
    ref_features = fid.compute_features(batches_of(ref_images), detector, "cpu", taps=("pool", "spatial"))
    assert results["fid"] == pytest.approx(
        fid.frechet_distance(*fid.mean_cov(features["pool"]), *fid.mean_cov(ref_features["pool"])), rel=1e-9)
    assert results["sfid"] == pytest.approx(
        fid.frechet_distance(*fid.mean_cov(features["spatial"]), *fid.mean_cov(ref_features["spatial"])), rel=1e-9)
    assert (results["is"], results["is_std"]) == pytest.approx(fid.inception_score(features["logits"]))
    assert (results["precision"], results["recall"]) == fid.precision_recall(ref_features["pool"], features["pool"])
    assert (results["kid"], results["kid_std"]) == pytest.approx(
        fid.kernel_inception_distance(features["pool"], ref_features["pool"]))
    # Reference statistics computed on the fly from reference images (as for ADM sample batches) agree.
    from_images = fid.compute_metrics(batches_of(images), {"images": ref_images.permute(0, 2, 3, 1).numpy()},
                                      ("fid", "is", "sfid", "pr", "kid"), detector, "cpu")
    assert from_images == pytest.approx(results, rel=1e-6)  # batches of another size: float32 rounding
    # Against itself: FID 0, precision and recall 1; a batch order change does not matter.
    same = fid.compute_metrics(batches_of(ref_images.flip(0), 7), ref, ("fid", "pr"), detector, "cpu")
    assert abs(same["fid"]) < 1e-9 and same["precision"] == same["recall"] == 1.0


def test_compute_stats_random_subset_is_uniform_and_seeded():
    detector, images = TinyDetector(), random_images(30, seed=7)
    stats = fid.compute_stats(batches_of(images, 4), detector, "cpu", max_features=10, seed=1)
    again = fid.compute_stats(batches_of(images, 7), detector, "cpu", max_features=10, seed=1)
    everything = fid.compute_features(batches_of(images, 4), detector, "cpu")["pool"].numpy()
    assert stats["pool"].shape == (10, 16) and np.allclose(stats["pool"], again["pool"], rtol=1e-6, atol=0)
    rows = [np.flatnonzero(np.isclose(everything, row, rtol=1e-6, atol=0).all(1)) for row in stats["pool"]]
    assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == 10
    assert not np.array_equal(np.sort([int(r[0]) for r in rows]), np.arange(10))  # not simply the first ten
    mu, sigma = fid.mean_cov(everything)
    np.testing.assert_allclose(stats["mu"], mu.numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], sigma.numpy(), rtol=1e-9, atol=1e-12)


def test_ref_file_round_trip_and_formats(tmp_path):
    rng = np.random.RandomState(8)
    stats = {"mu": rng.randn(2048), "sigma": np.eye(2048) * 2, "mu_s": rng.randn(2023), "sigma_s": np.eye(2023),
             "pool": rng.randn(5, 2048).astype(np.float32), "n": 7, "preprocess": "tf"}
    fid.save_ref(tmp_path / "ref.npz", stats)
    with np.load(tmp_path / "ref.npz") as data:  # what EDM's and pytorch-fid's tools read
        assert data["mu"].dtype == np.float64 and np.array_equal(data["sigma"], stats["sigma"])
    loaded = fid.load_ref(tmp_path / "ref.npz")
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        assert np.array_equal(loaded[key], stats[key])
    assert loaded["preprocess"] == "tf" and int(loaded["n"]) == 7 and not list(tmp_path.glob("*.tmp*"))
    # A plain EDM fid-refs file, an ADM reference batch, and files that are no reference at all.
    np.savez(tmp_path / "edm.npz", mu=stats["mu"], sigma=stats["sigma"])
    assert set(fid.load_ref(tmp_path / "edm.npz")) == {"mu", "sigma", "path"}  # path: for messages
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=stats["mu"], sigma=stats["sigma"],
             mu_s=stats["mu_s"], sigma_s=stats["sigma_s"])
    assert fid.load_ref(tmp_path / "adm.npz")["images"] == str(tmp_path / "adm.npz")
    np.savez(tmp_path / "wrong.npz", features=np.zeros(3))
    with pytest.raises(ValueError, match="not a reference"):
        fid.load_ref(tmp_path / "wrong.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="2048"):  # the width is checked against the detector's, before a pass
        fid.resolve_protocol("edm", ref=tmp_path / "small.npz")
    np.savez(tmp_path / "skew.npz", mu=np.zeros(64), sigma=np.eye(63))
    with pytest.raises(ValueError, match="2048"):
        fid.load_ref(tmp_path / "skew.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(ValueError, match="cannot read"):
        fid.load_ref(tmp_path / "corrupt.npz")
    with pytest.raises(ValueError, match="mu_s"):
        fid.compute_metrics([random_images(4)], tmp_path / "edm.npz", ("sfid",), TinyDetector(), "cpu",
                            preprocess="pytorch-fid")
    with pytest.raises(ValueError, match="made with preprocess='tf'"):
        fid.compute_metrics([random_images(4)], tmp_path / "ref.npz", ("fid",), TinyDetector(), "cpu",
                            preprocess="pytorch-fid")


def test_bad_images_give_clear_errors(tmp_path):
    detector = TinyDetector()
    with pytest.raises(ValueError, match="uint8"):
        fid.compute_features([torch.rand(2, 3, 8, 8)], detector, "cpu")  # float samples must be converted first
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute_metrics([random_images(1)], {"mu": np.zeros(16), "sigma": np.eye(16), "preprocess": "tf"},
                            ("fid",), detector, "cpu")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        fid.ImageSource(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        list(fid.image_batches(fid.ImageSource(tmp_path / "bad"), [0]))
    np.savez(tmp_path / "floats.npz", x=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.ImageSource(tmp_path / "floats.npz")


def test_image_folder_modes_and_mixed_sizes(tmp_path):
    rng = np.random.RandomState(9)
    rgb = rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "sub" / "b.PNG")                          # grayscale
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 7, np.uint8)])).save(tmp_path / "c.png")  # RGBA
    Image.fromarray(rng.randint(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "d.png")  # other size
    source = fid.ImageSource(tmp_path)
    assert source.names == ["a.png", "c.png", "d.png", os.path.join("sub", "b.PNG")]
    assert np.array_equal(source[0], rgb.transpose(2, 0, 1)) and np.array_equal(source[1], source[0])
    assert np.array_equal(source[3], np.repeat(rgb[None, :, :, 0], 3, axis=0))
    with pytest.warns(UserWarning, match="mixed image sizes"):
        batches = list(fid.image_batches(source, range(4), batch_size=3))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 6, 6), (1, 3, 8, 8)]


def test_zip_and_npz_sources(tmp_path):
    images = np.random.RandomState(12).randint(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    with zipfile.ZipFile(tmp_path / "dataset.zip", "w") as archive:  # EDM layout: class folders + dataset.json
        archive.writestr("dataset.json", json.dumps({"labels": [["1/b.png", 1], ["0/a.png", 0], ["0/c.png", 0]]}))
        for name, image in zip(("0/a.png", "1/b.png", "0/c.png"), images):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="png")
            archive.writestr(name, buffer.getvalue())
    from_zip = fid.ImageSource(tmp_path / "dataset.zip")
    assert from_zip.names == ["0/a.png", "0/c.png", "1/b.png"]
    assert np.array_equal(from_zip[1], images[2].transpose(2, 0, 1))
    np.savez(tmp_path / "adm.npz", arr_0=images)
    np.savez(tmp_path / "gray.npz", x=images[..., 0])
    assert np.array_equal(fid.ImageSource(tmp_path / "adm.npz")[2], images[2].transpose(2, 0, 1))
    assert fid.ImageSource(tmp_path / "gray.npz")[0].shape == (3, 5, 7)


def test_labelled_image_sets_and_channels(tmp_path):
    # Class sub-folders (sorted names -> 0..K-1), dataset.json (EDM), npz `y`; rgb=False keeps grayscale as 1 channel.
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    for name in ("dog/b.png", "cat/a.png", "cat/c.png"):
        os.makedirs(tmp_path / "folder" / os.path.dirname(name), exist_ok=True)
        Image.fromarray(gray).save(tmp_path / "folder" / name)
    source = fid.ImageSource(tmp_path / "folder", rgb=False)
    assert source.names == ["cat/a.png", "cat/c.png", "dog/b.png"] and source.class_names == ["cat", "dog"]
    assert source.labels.tolist() == [0, 0, 1] and source.labels.dtype == np.int64 and source[0].shape == (1, 4, 4)
    images, labels = fid.read_image_set(tmp_path / "folder")
    assert images.shape == (3, 3, 4, 4) and np.array_equal(images[2, 1], gray) and labels.tolist() == [0, 0, 1]
    (tmp_path / "folder" / "dataset.json").write_text(json.dumps({"labels": [["cat/a.png", 7], ["cat/c.png", 3],
                                                                            ["dog/b.png", 3]]}))
    assert fid.read_image_set(tmp_path / "folder", rgb=False)[1].tolist() == [7, 3, 3]
    (tmp_path / "folder" / "dataset.json").write_text(json.dumps({"labels": None}))  # EDM's unlabelled sets
    assert fid.ImageSource(tmp_path / "folder").labels is None
    np.savez(tmp_path / "set.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([4, 1]), classes=np.array(["a", "b"]))
    images, labels = fid.read_image_set(tmp_path / "set.npz", rgb=False)
    assert images.shape == (2, 1, 4, 4) and labels.tolist() == [4, 1]
    assert fid.ImageSource(tmp_path / "set.npz").class_names == ["a", "b"]
    images, labels = fid.read_image_set(np.zeros((2, 4, 4, 4), np.uint8))  # RGBA array: alpha dropped
    assert images.shape == (2, 3, 4, 4) and labels is None


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation protocols: each against its reference tool's rules, written out here


def test_resolve_protocol_rules():
    edm, adm, pfid = (fid.resolve_protocol(name) for name in ("edm", "adm", "pytorch-fid"))
    assert (edm["preprocess"], edm["num"], edm["select"], edm["is_split_size"]) == ("tf", 50000, "random", None)
    assert (adm["preprocess"], adm["num"], adm["select"], adm["is_split_size"]) == ("tf", 50000, "first", 5000)
    assert (pfid["preprocess"], pfid["num"], pfid["is_split_size"]) == ("pytorch-fid", None, None)
    assert json.loads(json.dumps(edm)) == edm  # goes into the metrics JSON as it is
    assert fid.resolve_protocol("edm", num=1000, available=1000)["num"] == 1000
    assert fid.resolve_protocol(adm, available=50000) == adm  # a resolved dict resolves to itself
    assert fid.resolve_protocol(preprocess="tf")["protocol"] is None  # a preprocessing alone names no protocol
    untagged = {"mu": np.zeros(16), "sigma": np.eye(16)}
    tagged = dict(untagged, preprocess="tf", protocol="edm")
    assert fid.resolve_protocol(ref=tagged, detector=TinyDetector())["protocol"] == "edm"  # the reference's tag
    errors = [  # (arguments, what the one-line message names)
        (dict(protocol="clean-fid"), "unknown protocol"),
        (dict(protocol="edm", preprocess="pytorch-fid"), "protocol edm preprocesses with 'tf'"),
        (dict(ref=untagged, detector=TinyDetector()), "--protocol=edm|adm|pytorch-fid"),
        (dict(protocol="pytorch-fid", ref=tagged, detector=TinyDetector()), "was made with preprocess='tf'"),
        (dict(protocol="edm", available=49999), "found 49999 images, but --num=50000"),
        (dict(protocol="edm", num=1), "--num must be an integer >= 2"),
        (dict(metrics=("is",), detector=type("NoFc", (), {"has_classifier": False})()), "1008-way classifier"),
        (dict(protocol="edm", metrics=("sfid",), ref=untagged, detector=TinyDetector()), "mu_s/sigma_s"),
        (dict(protocol="edm", ref={"mu": np.zeros(5), "sigma": np.eye(5), "preprocess": "tf"}), "mu has shape (5,)"),
        (dict(protocol="pytorch-fid", metrics=("is",), available=9), "is needs at least 10 images"),
    ]
    for kwargs, message in errors:
        with pytest.raises(ValueError, match=None) as error:
            fid.resolve_protocol(**kwargs)
        assert message in str(error.value) and "\n" not in str(error.value), (kwargs, str(error.value))
    # ADM's splits of 5,000 allow IS from fewer than 10 images; 10 equal splits do not.
    fid.resolve_protocol("adm", metrics=("is",), num=9, available=9)


def adm_inception_score(logits, split_size=5000):
    """guided-diffusion evaluations/evaluator.py, restated: softmax of the unbiased logits, consecutive splits of
    split_size rows (the last one shorter), exp of the mean over rows of sum_c p (log p - log mean_split p), mean
    over splits."""
    logits = np.asarray(logits, np.float64)
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def scipy_fid(mu1, sigma1, mu2, sigma2):
    """The Frechet distance as EDM's fid.py, ADM's evaluator and pytorch-fid compute it (scipy's sqrtm)."""
    covmean = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)))


def test_adm_inception_score_splits_of_5000_at_n_not_50000():
    logits = torch.randn(5003, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    adm, _ = fid.inception_score(logits, split_size=5000)
    assert adm == pytest.approx(adm_inception_score(logits.numpy()), rel=1e-10)   # splits of 5000 and 3 images
    assert abs(fid.inception_score(logits)[0] - adm) > 0.1  # 10 equal splits: another number at N = 5,003
    at_50k = torch.cat([logits[:5000]] * 10)  # at N = 50,000 the two conventions select the same rows
    assert fid.inception_score(at_50k, split_size=5000)[0] == pytest.approx(fid.inception_score(at_50k)[0], rel=1e-12)


@pytest.fixture
def tiny_cli(monkeypatch):
    """fid.main with the tiny detector in place of the weights file, and a count of images read."""
    reads = []
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": TinyDetector())
    getitem, load_array = fid.ImageSource.__getitem__, fid.ImageSource._load_array
    monkeypatch.setattr(fid.ImageSource, "__getitem__", lambda self, i: reads.append(i) or getitem(self, i))
    monkeypatch.setattr(fid.ImageSource, "_load_array", lambda self: reads.append("npz") or load_array(self))

    def run(*argv):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fid.main([*argv, "--device=cpu", "--workers=1", "--batch=4"])
    run.reads = reads
    return run


def edm_features(images, preprocess="tf"):
    return fid.compute_features(batches_of(torch.from_numpy(images).permute(0, 3, 1, 2)), TinyDetector(), "cpu",
                                preprocess=preprocess, taps=("pool", "spatial", "logits"), progress=False)


def test_edm_protocol_reproduces_edm_fid_py(tiny_cli, tmp_path):
    images = np.random.RandomState(20).randint(0, 256, (13, 9, 9, 3), dtype=np.uint8)
    real = np.random.RandomState(21).randint(0, 200, (10, 9, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x=images)
    real_pool = edm_features(real)["pool"].double().numpy()
    np.savez(tmp_path / "edm-ref.npz", mu=real_pool.mean(0), sigma=np.cov(real_pool, rowvar=False))  # no tag
    calc = ["calc", f"--images={tmp_path / 'images.npz'}", f"--ref={tmp_path / 'edm-ref.npz'}", "--seed=5"]
    tiny_cli(*calc, "--protocol=edm", "--num=8", f"--json={tmp_path / 'edm.json'}")
    result = json.loads((tmp_path / "edm.json").read_text())

    # EDM's rule: dataset indices shuffled by RandomState(seed % 2**31), the first --num kept in sorted order; mu
    # and sigma from float64 sums of f and f f^T (N - 1 normalisation); FID through scipy's sqrtm.
    order = np.arange(13)
    np.random.RandomState(5 % (1 << 31)).shuffle(order)
    chosen = np.sort(order[:8])
    f = edm_features(images[chosen])["pool"].double()
    mu = f.sum(0) / 8
    sigma = (f.T @ f - 8 * torch.outer(mu, mu)) / 7
    expected = scipy_fid(mu.numpy(), sigma.numpy(), real_pool.mean(0), np.cov(real_pool, rowvar=False))
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert (result["protocol"], result["preprocess"], result["num"]) == ("edm", "tf", 8)
    # Without --num the protocol evaluates 50,000 images: an error before any image is read, as EDM's.
    tiny_cli.reads.clear()
    with pytest.raises(SystemExit) as error:
        tiny_cli(*calc, "--protocol=edm")
    assert error.value.code == 2 and not tiny_cli.reads


def test_adm_protocol_reproduces_guided_diffusion_evaluator(tiny_cli, tmp_path):
    samples = np.random.RandomState(22).randint(0, 256, (12, 10, 10, 3), dtype=np.uint8)
    ref_images = np.random.RandomState(23).randint(30, 256, (11, 10, 10, 3), dtype=np.uint8)
    ref = edm_features(ref_images)
    stats = {key + suffix: value for tap, suffix in (("pool", ""), ("spatial", "_s"))
             for key, value in zip(("mu", "sigma"), (ref[tap].double().numpy().mean(0),
                                                     np.cov(ref[tap].double().numpy(), rowvar=False)))}
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=ref_images, **stats)  # an ADM reference batch: no tag
    np.savez(tmp_path / "samples.npz", arr_0=samples)                  # an ADM sample batch
    calc = ["calc", f"--images={tmp_path / 'samples.npz'}", f"--ref={tmp_path / 'VIRTUAL_ref.npz'}",
            "--metrics=fid,sfid,is,pr"]
    tiny_cli(*calc, "--protocol=adm", "--num=12", f"--json={tmp_path / 'adm.json'}")
    result = json.loads((tmp_path / "adm.json").read_text())

    # The evaluator's rules: sample statistics np.mean / np.cov, the reference's stored mu/sigma and mu_s/sigma_s,
    # FID and sFID through scipy's sqrtm, IS in consecutive 5,000-image splits (here one split of 12), precision
    # and recall against the reference batch's images.
    f = edm_features(samples)
    for metric, tap, suffix in (("fid", "pool", ""), ("sfid", "spatial", "_s")):
        x = f[tap].double().numpy()
        assert result[metric] == pytest.approx(
            scipy_fid(x.mean(0), np.cov(x, rowvar=False), stats["mu" + suffix], stats["sigma" + suffix]), rel=1e-6)
    assert result["is"] == pytest.approx(adm_inception_score(f["logits"].numpy()), rel=1e-6)
    assert result["is"] != pytest.approx(fid.inception_score(f["logits"])[0], rel=1e-3)  # not 10 splits
    assert (result["precision"], result["recall"]) == fid.precision_recall(ref["pool"], f["pool"])
    assert (result["protocol"], result["preprocess"], result["is_split_size"]) == ("adm", "tf", 5000)
    # With more images than --num ADM's order is kept: the first ones.
    np.savez(tmp_path / "more.npz", arr_0=np.concatenate([samples, samples[::-1]]))
    tiny_cli(*calc[:1], f"--images={tmp_path / 'more.npz'}", *calc[2:], "--protocol=adm", "--num=12",
             f"--json={tmp_path / 'more.json'}")
    assert json.loads((tmp_path / "more.json").read_text())["fid"] == pytest.approx(result["fid"], rel=1e-9)


def test_pytorch_fid_protocol_reproduces_pytorch_fid(tiny_cli, tmp_path):
    (tmp_path / "images").mkdir()
    images = np.random.RandomState(24).randint(0, 256, (7, 11, 11, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "images" / f"{i:02d}.png")
    real = np.random.RandomState(25).randint(0, 256, (9, 11, 11, 3), dtype=np.uint8)
    real_pool = edm_features(real, "pytorch-fid")["pool"].double().numpy()
    np.savez_compressed(tmp_path / "stats.npz", mu=real_pool.mean(0), sigma=np.cov(real_pool, rowvar=False))
    tiny_cli("calc", f"--images={tmp_path / 'images'}", f"--ref={tmp_path / 'stats.npz'}", "--protocol=pytorch-fid",
             f"--json={tmp_path / 'pfid.json'}")
    result = json.loads((tmp_path / "pfid.json").read_text())
    # pytorch-fid: every image of the folder, ToTensor then bilinear resize and 2x - 1, np.mean / np.cov, sqrtm.
    x = edm_features(images, "pytorch-fid")["pool"].double().numpy()
    expected = scipy_fid(x.mean(0), np.cov(x, rowvar=False), real_pool.mean(0), np.cov(real_pool, rowvar=False))
    assert result["fid"] == pytest.approx(expected, rel=1e-6) and result["num"] == 7
    assert (result["protocol"], result["preprocess"]) == ("pytorch-fid", "pytorch-fid")
    tf = edm_features(images, "tf")["pool"].double().numpy()
    assert scipy_fid(tf.mean(0), np.cov(tf, rowvar=False), real_pool.mean(0), np.cov(real_pool, rowvar=False)) \
        != pytest.approx(expected, rel=1e-3)  # the test can tell the preprocessings apart


def test_untagged_reference_cannot_meet_the_wrong_preprocessing(tiny_cli, tmp_path, capsys):
    images = np.random.RandomState(26).randint(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x=images)
    np.savez(tmp_path / "untagged.npz", mu=np.zeros(16), sigma=np.eye(16))  # EDM / pytorch-fid layout
    calc = ["calc", f"--images={tmp_path / 'images.npz'}"]
    with pytest.raises(SystemExit) as error:
        tiny_cli(*calc, f"--ref={tmp_path / 'untagged.npz'}")
    err = capsys.readouterr().err.strip()
    assert error.value.code == 2 and len(err.splitlines()) == 1 and "--protocol=" in err and not tiny_cli.reads
    with pytest.raises(ValueError, match="does not say how"):  # the library refuses it too
        fid.compute_metrics([torch.from_numpy(images).permute(0, 3, 1, 2)], str(tmp_path / "untagged.npz"),
                            detector=TinyDetector(), device="cpu")
    # References we write carry their preprocessing and protocol, and a later calc follows them.
    tiny_cli("ref", f"--data={tmp_path / 'images.npz'}", f"--dest={tmp_path / 'ours.npz'}", "--protocol=edm")
    with np.load(tmp_path / "ours.npz") as data:
        assert (str(data["preprocess"]), str(data["protocol"])) == ("tf", "edm")
    tiny_cli(*calc, f"--ref={tmp_path / 'ours.npz'}", "--num=6", f"--json={tmp_path / 'tagged.json'}")
    tagged = json.loads((tmp_path / "tagged.json").read_text())
    assert (tagged["protocol"], tagged["preprocess"]) == ("edm", "tf") and abs(tagged["fid"]) < 1e-6
    with pytest.raises(SystemExit):  # the tag contradicts the flag: refused
        tiny_cli(*calc, f"--ref={tmp_path / 'ours.npz'}", "--preprocess=pytorch-fid")
    assert "was made with preprocess='tf'" in capsys.readouterr().err


def test_checks_fail_before_any_image_is_read(tiny_cli, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "images.npz", x=np.zeros((5, 8, 8, 3), np.uint8))
    (tmp_path / "folder").mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), 9 * i, np.uint8)).save(tmp_path / "folder" / f"{i}.png")
    fid.save_ref(tmp_path / "ref.npz", {"mu": np.zeros(16), "sigma": np.eye(16), "preprocess": "tf"})
    readonly = tmp_path / "blocker"  # a file where a folder should be: unwritable even for root
    readonly.write_text("")
    nofc = TinyDetector()
    nofc.has_classifier = False
    cases = [  # (argv, what the message names)
        (["--metrics=sfid"], "mu_s/sigma_s"),                              # the reference lacks what sfid needs
        (["--protocol=adm"], "found 5 images, but --num=50000"),            # fewer images than the protocol's
        (["--num=6"], "found 5 images, but --num=6"),
        (["--protocol=pytorch-fid"], "was made with preprocess='tf'"),
        (["--metrics=kid", "--num=4"], "pool features"),
        ([f"--json={readonly / 'm.json'}"], "not writable"),
    ]
    for images in ("images.npz", "folder"):
        for argv, message in cases:
            with pytest.raises(SystemExit) as error:
                tiny_cli("calc", f"--images={tmp_path / images}", f"--ref={tmp_path / 'ref.npz'}", *argv)
            err = capsys.readouterr().err.strip()
            assert error.value.code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": nofc)
    with pytest.raises(SystemExit) as error:  # IS with weights that have no classifier
        tiny_cli("calc", f"--images={tmp_path / 'folder'}", f"--ref={tmp_path / 'folder'}", "--metrics=fid,is")
    assert error.value.code == 2 and "classifier" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:  # ref: an unwritable --dest, found before the pass
        tiny_cli("ref", f"--data={tmp_path / 'folder'}", f"--dest={readonly / 'ref.npz'}")
    assert error.value.code == 2 and "--dest" in capsys.readouterr().err and readonly.read_text() == ""
    assert tiny_cli.reads == []


def test_preprocessing_without_protocol_and_a_full_disk(tiny_cli, tmp_path, monkeypatch, capsys):
    images = np.random.RandomState(27).randint(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x=images)
    # --preprocess alone names no protocol: all images, 10 IS splits; the JSON says so.
    tiny_cli("calc", f"--images={tmp_path / 'images.npz'}", f"--ref={tmp_path / 'images.npz'}", "--preprocess=tf",
             f"--json={tmp_path / 'm.json'}")
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["protocol"] is None and record["preprocess"] == "tf" and record["num"] == 5
    results = fid.compute_metrics([torch.from_numpy(images).permute(0, 3, 1, 2)], {"images": images}, ("fid",),
                                  TinyDetector(), "cpu", protocol=fid.resolve_protocol(preprocess="tf"))
    assert "protocol" not in results and results["preprocess"] == "tf"  # floats plus strings only where named
    # A disk that fills while the reference is written: one line, exit 1, no partial file.
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fid.np, "savez", full_disk)
    with pytest.raises(SystemExit) as error:
        tiny_cli("ref", f"--data={tmp_path / 'images.npz'}", f"--dest={tmp_path / 'refs' / 'ref.npz'}")
    err = capsys.readouterr().err.strip()
    assert error.value.code == 1 and "No space left" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "refs").iterdir())


def test_fid_weights_is_the_flag_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        fid.main(["calc", f"--images={tmp_path}", "--ref=x.npz", "--weights=w.pth"])
    err = capsys.readouterr().err.strip()
    assert error.value.code == 2 and len(err.splitlines()) == 1 and "--fid_weights" in err
    with pytest.raises(SystemExit):
        fid.main(["calc", f"--images={tmp_path}", "--ref=x.npz", "--fid=w.pth"])  # no prefix matching
    capsys.readouterr()
    with pytest.raises(SystemExit):
        fid.main(["ref", "--help"])
    assert "--fid_weights" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Command line and torchrun


def test_cli_end_to_end(weights, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    for i, image in enumerate(np.random.RandomState(10).randint(0, 256, (6, 12, 12, 3), dtype=np.uint8)):
        Image.fromarray(image).save(tmp_path / "images" / f"{i:03d}.png")
    common = [f"--fid_weights={weights['full']}", "--device=cpu", "--batch=5", "--workers=2"]
    fid.main(["ref", f"--data={tmp_path / 'images'}", f"--dest={tmp_path / 'refs' / 'ref.npz'}", *common])
    with np.load(tmp_path / "refs" / "ref.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma_s"].shape == (2023, 2023) and ref["pool"].shape == (6, 2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 2048 images
        fid.main(["calc", f"--images={tmp_path / 'images'}", f"--ref={tmp_path / 'refs' / 'ref.npz'}",
                  "--metrics=fid,pr,kid", f"--json={tmp_path / 'metrics.json'}", *common])
    lines = capsys.readouterr().out.splitlines()
    printed = dict(line.split() for line in lines if not line.startswith(("fid:", "saved")))
    results = json.loads((tmp_path / "metrics.json").read_text())
    assert abs(results["fid"]) < 1e-6 * np.trace(np.load(tmp_path / "refs" / "ref.npz")["sigma"])  # same images
    assert results["precision"] == results["recall"] == 1.0 and results["num"] == 6 and math.isfinite(results["kid"])
    assert float(printed["fid"]) == pytest.approx(results["fid"], rel=1e-5, abs=1e-9)


def test_cli_errors_exit_nonzero(tmp_path, capsys):
    with pytest.raises(SystemExit) as flag_error:
        fid.main(["calc", f"--images={tmp_path}", "--ref=x.npz", "--metrics=fid,bogus"])
    assert flag_error.value.code == 2 and "--metrics" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as data_error:
        fid.main(["calc", f"--images={tmp_path / 'empty'}", "--ref=x.npz", "--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert data_error.value.code == 2 and err.startswith("fid.py: error: no images") and len(err.splitlines()) == 1


DISTRIBUTED_WORKER = """
import os, sys, warnings, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
import fid, test_fid
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
images = test_fid.random_images(11, seed=11)
share = np.array_split(np.arange(11), world)[rank]  # 6 and 5 images: unequal counts
batches = test_fid.batches_of(images[share], 1)  # per-image passes: features independent of the split
detector = test_fid.TinyDetector()
features = fid.compute_features(batches, detector, "cpu", taps=("pool", "logits"))
stats = fid.compute_stats(batches, detector, "cpu", max_features=100)
metrics = fid.compute_metrics(batches, stats, ("fid", "is", "pr", "kid"), detector, "cpu")
if rank == 0:
    torch.save({"features": features, "stats": stats, "metrics": metrics}, sys.argv[2])
dist.destroy_process_group()
"""


def test_distributed_matches_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DISTRIBUTED_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, str(script), os.path.dirname(os.path.abspath(__file__)),
                                   str(tmp_path / "out.pt")],
                                  env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
                 for r in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    result = torch.load(tmp_path / "out.pt", weights_only=False)

    images, detector = random_images(11, seed=11), TinyDetector()
    features = fid.compute_features(batches_of(images, 1), detector, "cpu", taps=("pool", "logits"))
    stats = fid.compute_stats(batches_of(images, 1), detector, "cpu", max_features=100)
    metrics = fid.compute_metrics(batches_of(images, 1), stats, ("fid", "is", "pr", "kid"), detector, "cpu")
    for tap in ("pool", "logits"):
        assert torch.equal(result["features"][tap], features[tap])
    np.testing.assert_allclose(result["stats"]["mu"], stats["mu"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(result["stats"]["sigma"], stats["sigma"], rtol=1e-12, atol=1e-15)
    assert result["stats"]["n"] == 11  # the kept pool rows are all 11, in an order drawn per rank
    assert sorted(map(tuple, result["stats"]["pool"].tolist())) == sorted(map(tuple, stats["pool"].tolist()))
    assert result["metrics"].keys() == metrics.keys()
    for name, value in metrics.items():
        assert result["metrics"][name] == pytest.approx(value, rel=1e-9, abs=1e-6), name  # fid here is ~0


# ----------------------------------------------------------------------------------------------------------------------
# Real weights


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "fid_inception_tf2015_nofc_fp16.pth")),
                    reason="needs ../shared/data beside the repository")
def test_real_weights_match_pytorch_fid_features():
    detector = fid.load_inception(os.path.join(SHARED, "fid_inception_tf2015_nofc_fp16.pth"))
    images = torch.from_numpy(np.load(os.path.join(SHARED, "cifar10_small_uint8.npz"))["x"][:3]).permute(0, 3, 1, 2)
    pool = fid.compute_features([images], detector)["pool"].double()
    # pytorch-fid 0.3.0's InceptionV3 with the same weights file (fc zero-filled), run once on these three images.
    torch.testing.assert_close(pool[:, :5], torch.tensor([
        [0.030960779637098312, 0.01120822224766016, 0.6647468209266663, 0.2595881223678589, 1.1353075504302979],
        [0.08269847184419632, 0.2149249166250229, 0.32653579115867615, 0.29011476039886475, 0.4997023344039917],
        [0.08235403895378113, 0.1261657476425171, 0.4614452123641968, 0.3363988399505615, 0.46099933981895447]],
        dtype=torch.float64), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pool.norm(dim=1), torch.tensor(
        [24.27030275722727, 21.719218163619278, 25.755737632924582], dtype=torch.float64), rtol=1e-5, atol=0)


# Slow: 1000 images through Inception take minutes on CPU; RUN_SLOW=1 to run.


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "fid_inception_tf2015_nofc_fp16.pth"))
                    or not os.environ.get("RUN_SLOW"), reason="needs ../shared/data and RUN_SLOW=1")
def test_fid_of_cifar10_halves_with_real_weights():
    detector = fid.load_inception(os.path.join(SHARED, "fid_inception_tf2015_nofc_fp16.pth"))
    images = torch.from_numpy(np.load(os.path.join(SHARED, "cifar10_small_uint8.npz"))["x"]).permute(0, 3, 1, 2)
    first, second = (fid.compute_features(batches_of(half, 50), detector)["pool"] for half in images.split(500))
    assert fid.features_frechet_distance(first, *fid.mean_cov(second)) == pytest.approx(76.84, abs=0.01)  # 76.835


def test_random_weights_give_a_detector_that_separates_image_sets():
    """The paper scripts' end-to-end tests evaluate with a randomly initialised detector. Its features must not
    collapse (torch's default init shrinks them to ~1e-8), or every FID in those tests would be ~0 whatever the
    images: real-vs-real must come out far below real-vs-noise."""
    torch.manual_seed(0)
    detector = fid.InceptionV3().eval()
    images = torch.from_numpy(np.load(os.path.join(ROOT, "tests", "data", "cifar10_tiny.npz"))["x"][:24])
    images = images.permute(0, 3, 1, 2).contiguous()                         # (24, 3, 32, 32) uint8
    noise = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    real_a, real_b, pure_noise = (fid.compute_features([x], detector=detector, progress=False)["pool"].double()
                                  for x in (images[:12], images[12:], noise))
    assert real_a.std(0).mean() > 1e-3                                       # features vary from image to image

    def distance(x, y):
        return fid.frechet_distance(x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False),
                                    y.mean(0).numpy(), np.cov(y.numpy(), rowvar=False))

    assert distance(real_a, pure_noise) > 10 * distance(real_a, real_b)
