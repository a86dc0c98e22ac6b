"""Benchmark of fid.py's feature extraction: images per second and peak memory for N images at a batch size.

Not a test (pytest does not collect it). The images are preloaded as a uint8 tensor on the device, as when a
sampler yields batches, so the figures are the Inception pass alone. With --data the images are real and the FID
between their first and second halves is printed for every configuration, so a speed-up (bf16, tf32) can be
checked against the exact fp32 number (goal: within 0.01). With --pytorch_fid the same model run the way
pytorch-fid's get_activations runs it (fp32, NCHW, one host copy per batch) is timed too, if pytorch-fid and
torchvision are installed.

    python tests/bench_fid.py --num=200 --batch=50 --device=cpu                  # random weights and images
    python tests/bench_fid.py --num=50000 --batch=500 --data=cifar10.npz --precision=fp32,tf32,bf16 --pytorch_fid \\
        --weights=pt_inception-2015-12-05-6726825d.pth
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402


def load_images(args, device):
    """(N, 3, H, W) uint8 on the device: the first --num images of --data, else uniform noise."""
    if args.data:
        source = fid.ImageSource(args.data)
        if len(source) < args.num:
            sys.exit(f"error: {args.data} has {len(source)} images, fewer than --num={args.num}")
        images = torch.cat(list(fid.image_batches(source, range(args.num), batch_size=1000, workers=8)))
    else:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.num, 3, args.resolution, args.resolution), dtype=torch.uint8,
                               generator=generator)
    return images.to(device)


def load_detector(args, device):
    if args.weights:
        return fid.load_inception(args.weights, device)
    print("no --weights: random initialisation (speed only; the FIDs below mean nothing)")
    net = fid.InceptionV3().eval().requires_grad_(False)
    return net.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)


def peak_memory(device):
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def timed(device, run):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    features = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return features, time.perf_counter() - start


def report(name, features, seconds, device, with_fid):
    line = f"{name:30s} {len(features)} images in {seconds:7.2f} s = {len(features) / seconds:8.1f} img/s | " \
           f"{peak_memory(device)}"
    if with_fid:
        first, second = features.split(len(features) // 2)[:2]
        line += f" | FID(first half, second half) {fid.features_frechet_distance(first, *fid.mean_cov(second)):.4f}"
    print(line, flush=True)


def pytorch_fid_model(detector, device):
    """pytorch-fid's InceptionV3 with this detector's weights (its own loader would download them)."""
    import pytorch_fid.inception as reference
    state = detector.state_dict()
    reference.load_state_dict_from_url = lambda *args, **kwargs: state
    return reference.InceptionV3([3]).to(device).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200, help="images")
    parser.add_argument("--batch", type=int, default=50, help="images per forward pass")
    parser.add_argument("--resolution", type=int, default=32, help="size of the random images (without --data)")
    parser.add_argument("--data", default=None, help="real images (folder, zip, .npz): also report FID of halves")
    parser.add_argument("--weights", default=None, help="FID weights (default: random initialisation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", help="comma-separated, from fp32, tf32, bf16")
    parser.add_argument("--preprocess", default="pytorch-fid", choices=fid.PREPROCESS)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(detector)")
    parser.add_argument("--pytorch_fid", action="store_true", help="also time pytorch-fid's model (if installed)")
    args = parser.parse_args()
    device = torch.device(args.device)

    images = load_images(args, device)
    detector = load_detector(args, device)
    batches = images.split(args.batch)
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} | torch {torch.__version__}"
          f" | {args.num} images {tuple(images.shape[1:])} | batch {args.batch} | {args.preprocess} preprocessing")

    runs = [(precision, detector) for precision in args.precision.split(",")]
    if args.compile:
        runs += [(f"{precision}+compile", torch.compile(detector)) for precision in args.precision.split(",")]
    for name, net in runs:
        precision = name.split("+")[0]

        def run(batches):
            return fid.compute_features(batches, net, device, preprocess=args.preprocess, precision=precision,
                                        progress=False)["pool"]

        run([batches[0], batches[-1]])  # warm-up: cuDNN autotuning, compilation for both batch shapes
        features, seconds = timed(device, lambda: run(batches))
        report(f"fid.py {name}", features, seconds, device, args.data)

    if args.pytorch_fid:
        try:
            model = pytorch_fid_model(detector, device)
        except ImportError as error:
            print(f"pytorch-fid not available ({error}); skipped")
            return

        def run_reference():
            features = []
            with torch.no_grad():
                for batch in batches:  # as pytorch_fid.fid_score.get_activations: [0, 1] input, copy out per batch
                    features.append(model(batch.float() / 255)[0].squeeze(3).squeeze(2).cpu().numpy())
            return torch.from_numpy(np.concatenate(features))

        with torch.no_grad():
            model(batches[0].float() / 255)  # warm-up
        features, seconds = timed(device, run_reference)
        tf32 = " (TF32 convs, torch's default)" if device.type == "cuda" else ""
        report(f"pytorch-fid{tf32}", features, seconds, device, args.data)


if __name__ == "__main__":
    main()
