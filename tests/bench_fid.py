"""Benchmark of fid.py's feature extraction: images per second and peak memory for N images at a batch size.

Not a test (pytest does not collect it). The images are preloaded as a uint8 tensor on the device, as when a
sampler yields batches, so the figures are the Inception pass alone. With --data the images are real and the FID
between their first and second halves is printed for every configuration, so a speed-up (bf16, tf32) can be
checked against the exact fp32 number (goal: within 0.01). With --pytorch_fid, pytorch-fid's own InceptionV3
(its module, with these weights) runs beside fid.py's pytorch-fid-mode extraction the way its get_activations runs
it (fp32, NCHW, one host copy per batch): the pool features are compared bitwise, then the two are timed in
alternation (A B B A ...) on the same batches and threads, and the medians give the speed ratio. pytorch-fid and
torchvision must be installed (see import_pytorch_fid for a torchvision wheel built for another torch).

    python tests/bench_fid.py --num=200 --batch=50 --device=cpu                  # random weights and images
    OMP_NUM_THREADS=1 python tests/bench_fid.py --device=cpu --num=100 --batch=50 --threads=1 --pytorch_fid \\
        --data=cifar10_small_uint8.npz --fid_weights=fid_inception_tf2015_nofc_fp16.pth --repeats=5
    python tests/bench_fid.py --num=50000 --batch=500 --data=cifar10.npz --precision=fp32,tf32,bf16 --pytorch_fid \\
        --fid_weights=pt_inception-2015-12-05-6726825d.pth
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
    if args.fid_weights:
        return fid.load_inception(args.fid_weights, device)
    print("no --fid_weights: random initialisation (speed only; the FIDs below mean nothing)")
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


_TORCHVISION_OPS = None  # keeps the op declarations of import_pytorch_fid alive


def import_pytorch_fid():
    """pytorch_fid.inception, the module itself. Where the installed torchvision wheel was built for another torch
    (the PyPI wheel is CUDA-linked; beside a CPU torch its compiled ops do not load and its import fails on the fake
    kernels it registers for nms and qnms), those two detection ops are declared first: Inception uses neither, and
    every line of torchvision's and pytorch-fid's Python that builds and runs the model stays theirs."""
    global _TORCHVISION_OPS
    try:
        import pytorch_fid.inception as reference
        return reference, ""
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for name in [name for name in sys.modules if name.startswith(("torchvision", "pytorch_fid"))]:
        del sys.modules[name]
    _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import pytorch_fid.inception as reference
    return reference, " (torchvision's compiled ops unavailable: nms/qnms declared)"


def pytorch_fid_model(detector, device):
    """pytorch-fid's InceptionV3 with this detector's weights (its own loader would download them)."""
    reference, note = import_pytorch_fid()
    import pytorch_fid
    import torchvision
    state = {k: v for k, v in detector.state_dict().items()}
    reference.load_state_dict_from_url = lambda *args, **kwargs: state
    model = reference.InceptionV3([3]).to(device).eval()
    return model, f"pytorch-fid {pytorch_fid.__version__}, torchvision {torchvision.__version__}{note}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200, help="images")
    parser.add_argument("--batch", type=int, default=50, help="images per forward pass")
    parser.add_argument("--resolution", type=int, default=32, help="size of the random images (without --data)")
    parser.add_argument("--data", default=None, help="real images (folder, zip, .npz): also report FID of halves")
    parser.add_argument("--fid_weights", default=None, help="FID weights (default: random initialisation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None,
                        help="comma-separated, from fp32, tf32, bf16 (default: fp32, none with --pytorch_fid)")
    parser.add_argument("--preprocess", default="pytorch-fid", choices=fid.PREPROCESS)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(detector)")
    parser.add_argument("--pytorch_fid", action="store_true",
                        help="also run pytorch-fid's model (if installed): bitwise check and interleaved timing")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing runs with --pytorch_fid")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    images = load_images(args, device)
    detector = load_detector(args, device)
    batches = images.split(args.batch)
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} | torch {torch.__version__}"
          f" | {args.num} images {tuple(images.shape[1:])} | batch {args.batch} | {args.preprocess} preprocessing")

    precisions = (args.precision or ("" if args.pytorch_fid else "fp32")).split(",")
    runs = [(precision, detector) for precision in precisions if precision]
    if args.compile:
        runs += [(f"{precision}+compile", torch.compile(detector)) for precision in precisions if precision]
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
            model, versions = pytorch_fid_model(detector, device)
        except ImportError as error:
            print(f"pytorch-fid not available ({error}); skipped")
            return

        def run_reference():
            features = []
            with torch.no_grad():
                for batch in batches:  # as pytorch_fid.fid_score.get_activations: [0, 1] input, copy out per batch
                    features.append(model(batch.float() / 255)[0].squeeze(3).squeeze(2).cpu())
            return torch.cat(features)

        def run_ours():
            return fid.compute_features(batches, detector, device, preprocess="pytorch-fid", progress=False)["pool"]

        # Side by side: same weights, batches and threads; runs interleaved (A B A B ...) so that load from other
        # processes falls on both alike; medians reported.
        ours, reference = run_ours(), run_reference()
        equal = torch.equal(ours.cpu(), reference.cpu())
        print(f"{versions} | threads {torch.get_num_threads()} | pool features bitwise equal: {equal} "
              f"(max abs difference {(ours.cpu() - reference.cpu()).abs().max().item():.3g})")
        times = {"fid.py": [], "pytorch-fid": []}
        for repeat in range(args.repeats):
            for name, run in (("fid.py", run_ours), ("pytorch-fid", run_reference))[::1 if repeat % 2 == 0 else -1]:
                times[name].append(timed(device, run)[1])
            print(f"repeat {repeat + 1}: fid.py {times['fid.py'][-1]:.2f} s, "
                  f"pytorch-fid {times['pytorch-fid'][-1]:.2f} s", flush=True)
        median = {name: float(np.median(values)) for name, values in times.items()}
        pairs = float(np.median(np.array(times["pytorch-fid"]) / np.array(times["fid.py"])))
        print(f"median of {args.repeats}: fid.py {args.num / median['fid.py']:.2f} img/s, pytorch-fid "
              f"{args.num / median['pytorch-fid']:.2f} img/s | ratio (fid.py speed / pytorch-fid speed): of the "
              f"medians {median['pytorch-fid'] / median['fid.py']:.3f}, median of the per-repeat ratios {pairs:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
