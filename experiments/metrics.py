"""Metrics of the evidence experiments, computed in pixel space (the images are 16x16 grey digits or shapes).

- frechet(a, b): Frechet distance between Gaussians fitted to the flattened pixels (fid.mean_cov and
  fid.frechet_distance), pixels in [0, 1]. Lower = the two image sets are closer as distributions.
- nearest_distance(a, train): mean L2 distance of each image of a to its nearest image of train (memorisation:
  a model that copies its training images has distances near 0).
- within_class_diversity(images, labels): mean pairwise L2 distance between images of the same class, averaged
  over classes (higher = more diverse conditional samples).
- class_frechet(a, labels_a, b, labels_b): Frechet distance per class, averaged over classes.
All take uint8 or float arrays (N, ...) and flatten them; grey = the mean over channels when there are 3.
"""

import json
import os
import sys

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402  (the project's own Frechet distance)


def as_pixels(images):
    """(N, H, W), (N, H, W, C) or (N, C, H, W) uint8/float -> (N, H*W) float64 in [0, 1], grey."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float64) / 255
    if x.ndim == 4:  # average the channels, wherever they are
        x = x.mean(axis=3) if x.shape[3] in (1, 3) else x.mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float64))


def frechet(a, b):
    """Frechet distance of the pixel Gaussians of two image sets."""
    mu1, sigma1 = fid.mean_cov(as_pixels(a))
    mu2, sigma2 = fid.mean_cov(as_pixels(b))
    return float(fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def nearest_distance(a, train):
    """Mean over a of the L2 distance to the nearest image of train (pixels in [0, 1])."""
    a, train = as_pixels(a), as_pixels(train)
    best = torch.cat([torch.cdist(chunk, train).min(dim=1).values for chunk in a.split(256)])
    return float(best.mean())


def within_class_diversity(images, labels):
    """Mean pairwise L2 distance within each class, averaged over the classes present."""
    x, labels = as_pixels(images), np.asarray(labels)
    values = []
    for c in np.unique(labels):
        xc = x[torch.from_numpy(labels == c)]
        if len(xc) > 1:
            d = torch.cdist(xc, xc)
            values.append(float(d.sum() / (len(xc) * (len(xc) - 1))))
    return float(np.mean(values))


def class_frechet(a, labels_a, b, labels_b):
    """Frechet distance between the images of each class in a and in b, averaged over classes."""
    a, b, labels_a, labels_b = as_pixels(a), as_pixels(b), np.asarray(labels_a), np.asarray(labels_b)
    values = []
    for c in np.unique(labels_b):
        mu1, s1 = fid.mean_cov(a[torch.from_numpy(labels_a == c)])
        mu2, s2 = fid.mean_cov(b[torch.from_numpy(labels_b == c)])
        values.append(float(fid.frechet_distance(mu1, s1, mu2, s2)))
    return float(np.mean(values))


def read_pngs(folder, with_labels=False):
    """Every PNG under a folder (sub-folders too), in file-name order (generate names them by seed) -> uint8
    (N, H, W, C); with_labels: also the labels of dataset.json ([[name, label], ...], EDM layout) or None."""
    paths = sorted((os.path.join(root, n) for root, _, files in os.walk(folder) for n in files if n.endswith('.png')),
                   key=lambda p: (os.path.basename(p), p))
    if not paths:
        raise FileNotFoundError(f'no PNG under {folder}')
    images = np.stack([np.asarray(PIL.Image.open(p).convert('RGB')) for p in paths])
    if not with_labels:
        return images
    labels = None
    meta = os.path.join(folder, 'dataset.json')
    if os.path.exists(meta):
        with open(meta) as file:
            table = {os.path.basename(name): label for name, label in json.load(file)['labels']}
        labels = np.array([table[os.path.basename(p)] for p in paths])
    return images, labels
