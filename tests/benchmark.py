"""Speed benchmark of the four paper scripts and fid.py, side by side with the official implementations.

Not a test (pytest does not collect it; tests/test_benchmark.py runs its CPU quick mode). For each script's standard
configuration it measures the training throughput (img/s in steady state, warm-up excluded), the peak GPU memory of
the timed steps, the model FLOPs utilisation of DiT, the sampling speed (EDM Heun 35 NFE at 32x32, ADM respaced to
100 steps, DPM-Solver++ 50 steps for DiT) and the Inception feature extraction speed of fid.py. It prints one table
and writes JSON.

Our training is the scripts themselves: each trains in a child process with its own command line (preset, data
pipeline, loss, precision, compile settings) for 2S + 1 steps with a progress tick every S steps, and the row takes
the img/s and peak memory of the last full tick it reports (the ticks before it are the warm-up: compilation, cuDNN
autotuning; a tick's clock stops after its host sync). The sampling rows load the snapshot that run wrote with the
scripts' own loaders and sampling functions. The data are random uint8 images of the right size; DiT trains on the
latents of a randomly initialised SD VAE (the real weights are a download, and the VAE's speed is not measured).
With --official=DIR, where DIR holds plain source trees of the official code (DIR/edm,
DIR/DDPM-IP or DIR/guided-diffusion, DIR/DiT, DIR/pytorch-fid, and DIR/ambient-diffusion for a like-for-like ambient
row), the same step of the official trainer runs on the same GPU, with the same network configuration and batch.
Whatever cannot run is reported as n/a with the reason; packages the official trees import but the timed code never
uses (wandb, s3fs, blobfile, mpi4py, Python 3.12's missing distutils) are stubbed when absent.

    python tests/benchmark.py --quick                                  # seconds on a CPU: keeps the tool working
    python tests/benchmark.py --official=official --json=bench.json   # GPU: default configurations, side by side
    python tests/benchmark.py --only=dit,fid --compile --peak_tflops=989
    python tests/benchmark.py --readme=bench1.json,bench2.json        # the README's table from earlier runs

The official trees are fetched into the ignored official/ folder, e.g. `git archive HEAD | tar -x -C official/edm`
from a clone of NVlabs/edm; never commit them.
"""

import argparse
import ast
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ambient  # noqa: E402
import ambient_laws  # noqa: E402
import ddpm_ip  # noqa: E402
import fid  # noqa: E402
import ldm_labelnoise  # noqa: E402
import nets  # noqa: E402

BENCHMARKS = ('ambient', 'ambient_laws', 'ddpm_ip', 'dit', 'fid')
# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name.
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}
# Speed goals: ours / theirs for each kind of row.
GOALS = {'ddpmpp': 1.5, 'adm': 2.0, 'dit': 1.5, 'sampling': 1.5, 'fid': 2.0}

# ----------------------------------------------------------------------------------------------------------------------
# Options and timing


@dataclasses.dataclass
class Options:
    quick: bool          # tiny networks, small batches, few steps (automatic on CPU)
    only: tuple          # which of BENCHMARKS to run
    official: str        # folder with the official source trees, '' = ours only
    compile: bool        # torch.compile our networks (ddpm_ip compiles on CUDA by default anyway)
    warmup: int          # training steps before the clock starts
    steps: int           # timed training steps
    batch: dict          # benchmark name -> global training batch override
    batch_gpu: int       # microbatch (gradient accumulation), 0 = the whole batch at once
    sample_batch: int    # images per sampling call
    fid_num: int         # images for the feature extraction
    fid_batch: int       # images per Inception forward pass
    peak_tflops: float   # for the MFU; 0 = look up the GPU name
    device: torch.device


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None


def time_training(step, batch, opt):
    """img/s over opt.steps steps after opt.warmup untimed ones, and the peak memory of the timed steps."""
    for _ in range(opt.warmup):  # compilation, cuDNN autotuning, allocator growth
        step()
    synchronize(opt.device)
    if opt.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(opt.device)
    start = time.perf_counter()
    for _ in range(opt.steps):
        step()
    synchronize(opt.device)  # the queued GPU work is part of the steps
    return dict(img_per_sec=batch * opt.steps / (time.perf_counter() - start), mem_gb=peak_memory_gb(opt.device))


def time_once(run, num_images, device):
    """img/s of one call of run() after one untimed call, and its peak memory."""
    run()
    synchronize(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return dict(img_per_sec=num_images / (time.perf_counter() - start), mem_gb=peak_memory_gb(device))


def release_memory(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def random_images(n, channels, resolution, seed=0):
    """(n, H, W, C) uint8 noise images and (n,) labels i % 10: the benchmark data."""
    generator = np.random.default_rng(seed)
    return generator.integers(0, 256, (n, resolution, resolution, channels), dtype=np.uint8), np.arange(n) % 10


def dataset_file(folder, n, resolution=32):
    """An .npz in the scripts' format (x (N, H, W, C) uint8, y (N,)), for the scripts that read --data."""
    path = os.path.join(folder, f'bench-{n}x{resolution}.npz')
    if not os.path.exists(path):
        x, y = random_images(n, 3, resolution)
        np.savez(path, x=x, y=y)
    return path

# ----------------------------------------------------------------------------------------------------------------------
# DiT model FLOPs (for the MFU)


def dit_forward_flops(net, num_tokens):
    """Forward FLOPs of one image through a DiT, counted from its layers: 2 per multiply-add of every linear map
    applied per token (patch embedding, attention projections, MLP, output layer), of the per-image ones (timestep
    MLP, adaLN modulations), plus attention's Q K^T and A V, 2 N^2 d each per block. Names are DiT's models.py
    names, which nets.DiT keeps, so the same count serves both implementations."""
    per_token = per_image = 0
    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            weights = module.weight.numel()
            if 'adaLN_modulation' in name or 't_embedder' in name:
                per_image += weights
            else:
                per_token += weights
    depth, hidden = len(net.blocks), net.x_embedder.proj.out_channels
    return 2 * per_token * num_tokens + 2 * per_image + depth * 4 * num_tokens ** 2 * hidden


def peak_tflops(opt):
    if opt.peak_tflops:
        return opt.peak_tflops
    if opt.device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(opt.device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)

# ----------------------------------------------------------------------------------------------------------------------
# Our training: the scripts themselves. ambient.py, ambient_laws.py and ddpm_ip.py train in a child process with their
# own command line, exactly as a user runs them, and the numbers are the ones their progress ticks report. Their
# sampling rows load the snapshot that run wrote, with the scripts' own loaders and sampling functions.


def default_flags():
    """torch's defaults, which the scripts' generate commands keep: the official samplers' conditions too."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = False


def train_precision(opt, given):
    """What the scripts train in when --precision is not given: bf16 autocast on CUDA, fp32 on the CPU."""
    return given or ('bf16' if opt.device.type == 'cuda' else 'fp32')


def train_script(opt, script, argv, batch, folder):
    """Runs `python SCRIPT.py train ARGV` in a child process for 2S + 1 steps with a progress tick every S steps
    (S = --steps), and returns the img/s and peak GPU memory of its last full tick, and its final snapshot. A tick's
    clock runs from the end of the previous tick's maintenance to the host sync of its own, so compilation, cuDNN
    autotuning (the ticks before) and checkpoint writing are outside it, and the data pipeline is inside."""
    steps, outdir = opt.steps, tempfile.mkdtemp(prefix=f'{script}-', dir=folder)
    # Half a batch under the tick and run lengths, so float rounding of kimg cannot move a tick by one step.
    tick, kimg = (steps * batch - batch / 2) / 1000, ((2 * steps + 1) * batch - batch / 2) / 1000
    command = [sys.executable, os.path.join(ROOT, f'{script}.py'), 'train', *argv, f'--batch={batch}',
               f'--kimg={kimg}', f'--tick={tick}', '--snap=1000000', f'--outdir={outdir}']
    env = dict(os.environ, PYTHONUNBUFFERED='1', **({'CUDA_VISIBLE_DEVICES': ''} if opt.device.type == 'cpu' else {}))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ['no output']
        raise RuntimeError(f'{script}.py train exited with {result.returncode}: {lines[-1]}')
    [run_dir] = [os.path.join(outdir, d) for d in os.listdir(outdir)]
    with open(os.path.join(run_dir, 'stats.jsonl')) as file:
        records = [json.loads(line) for line in file]
    nimg = [0] + [round(r['kimg'] * 1000) for r in records]
    full = [r for r, a, b in zip(records, nimg, nimg[1:]) if b - a == steps * batch]
    if len(full) < 2:
        raise RuntimeError(f'{script}.py: expected two ticks of {steps} steps, got ticks at nimg {nimg[1:]}')
    snapshots = sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-'))
    timing = dict(img_per_sec=1000 / full[-1]['sec_per_kimg'],
                  mem_gb=full[-1]['gpumem_gb'] if opt.device.type == 'cuda' else None)
    return timing, os.path.join(run_dir, snapshots[-1])


def ours_ambient(opt, data_path, folder):
    """ambient.py train --preset=cifar10 (tiny when quick): masks A / A_tilde fixed per image, DDPM++ with 6 gated
    input channels, batch 512. Sampling: the generate command's path (ambient sampler, 1 mask, bf16 on CUDA)."""
    argv = ['--preset=tiny', '--steps=3'] if opt.quick else ['--preset=cifar10']
    argv += [f'--data={data_path}', '--grid=4', '--dump=1000000'] + (['--compile=true'] if opt.compile else [])
    argv += [f'--batch_gpu={opt.batch_gpu}'] if opt.batch_gpu else []
    cfg = ambient.parse_train_args(argv)
    batch = opt.batch.get('ambient', 8 if opt.quick else cfg.batch)
    timing, snapshot = train_script(opt, 'ambient', argv, batch, folder)
    device = opt.device
    net, net_config = ambient.load_network(snapshot, device)
    precision = 'bf16' if device.type == 'cuda' else 'fp32'  # generate's default

    def sample(seeds):
        default_flags()
        return ambient.generate_images(net, net_config, seeds, device, steps=cfg.steps, precision=precision)

    unet = net_config['unet']
    info = dict(config=f'{cfg.arch} {unet["in_channels"]}ch gated={cfg.gated} {train_precision(opt, cfg.precision)}'
                       + (' compile' if cfg.compile else ''), unet=unet, precision=precision, sample=sample,
                steps=cfg.steps, cfg=dataclasses.replace(cfg, batch=batch))
    return timing, batch, info


def ours_ambient_laws(opt, data_path, folder, consistency):
    """ambient_laws.py train --preset=cifar10 (tiny when quick): observed images with their fixed noise, EDM
    augmentation, ambient score matching and, with consistency, the reverse-SDE consistency term on 32 rows (6 grid
    points, 6 runs each: official defaults). Sampling: the generate command's path (EDM Heun, fp32 network)."""
    argv = ['--preset=tiny', '--steps=3', '--cbase=16'] if opt.quick else ['--preset=cifar10']
    argv += [f'--data={data_path}', '--grid=4'] + (['--compile=true'] if opt.compile else [])
    argv += ['--consistency_coeff=1'] if consistency else []
    argv += ['--consistency_batch_size=2', '--num_primes=1', '--num_consistency_steps=2'] if consistency and \
        opt.quick else []
    argv += [f'--batch_gpu={opt.batch_gpu}'] if opt.batch_gpu else []
    cfg = ambient_laws.command_config('train', argv)
    batch = opt.batch.get('ambient_laws', 8 if opt.quick else cfg.batch)
    timing, snapshot = train_script(opt, 'ambient_laws', argv, batch, folder)
    sample_cfg = ambient_laws.command_config('generate', [f'--network={snapshot}'])  # generate's defaults
    device, net = opt.device, ambient_laws.load_network(snapshot, opt.device)[0]
    autocast = contextlib.nullcontext()  # generate: an fp32 network unless --precision=bf16

    def sample(seeds):
        default_flags()
        return ambient_laws.sample_images(net, seeds, device, sample_cfg, autocast)

    num_cons = min(cfg.consistency_batch_size, batch) if cfg.consistency_coeff > 0 else 0
    unet = torch.load(snapshot, map_location='cpu', weights_only=True)['net_kwargs']
    info = dict(config=f'{cfg.arch} {train_precision(opt, cfg.precision)}' + (' compile' if cfg.compile else '')
                + (f' +consistency({num_cons} rows x {cfg.num_primes} x {cfg.num_consistency_steps - 1})'
                   if num_cons else ''), unet=unet, precision='fp32', sample=sample, steps=sample_cfg.steps)
    return timing, batch, info


def ours_ddpm_ip(opt, data_path, folder):
    """ddpm_ip.py train --preset=cifar10 (tiny when quick): ADM with learned sigma, input perturbation,
    loss-second-moment timestep sampler, AdamW, EMA, batch 128, gamma 0.15, compiled on CUDA. Sampling: the generate
    command's path, ancestral sampling respaced to 100 steps (4 when quick), bf16 on CUDA."""
    argv = ['--preset=tiny'] if opt.quick else ['--preset=cifar10']
    argv += [f'--data={data_path}', '--grid=4'] + (['--compile=True'] if opt.compile else [])
    argv += [f'--batch_gpu={opt.batch_gpu}'] if opt.batch_gpu else []
    _, c = ddpm_ip.parse_args(['train'] + argv)
    batch = opt.batch.get('ddpm_ip', 8 if opt.quick else c.batch)
    timing, snapshot = train_script(opt, 'ddpm_ip', argv, batch, folder)
    sample_steps = '4' if opt.quick else '100'
    _, g = ddpm_ip.parse_args(['generate', f'--network={snapshot}', f'--timestep_respacing={sample_steps}'])
    g = ddpm_ip.check_config(g, 'generate', 1)
    device = opt.device
    g.precision = g.precision or ('bf16' if device.type == 'cuda' else 'fp32')
    net, diffusion = ddpm_ip.load_network(snapshot, g, device)
    denoiser = ddpm_ip.make_denoiser(net, g.precision)
    shape = (net.in_channels, net.img_resolution, net.img_resolution)

    def sample(seeds):
        default_flags()
        return ddpm_ip.generate_images(denoiser, diffusion, seeds, shape, net.label_dim, device, g)

    net_kwargs = torch.load(snapshot, map_location='cpu', weights_only=True)['net_kwargs']
    compiled = c.compile if c.compile is not None else device.type == 'cuda'
    info = dict(config=f'{c.arch} {train_precision(opt, c.precision)}' + (' compile' if compiled else ''),
                unet=net_kwargs,
                precision=g.precision, sample=sample, steps=int(sample_steps), gamma=c.input_perturbation)
    return timing, batch, info


def ours_dit(opt, folder):
    """ldm_labelnoise.py train --preset=in1k-dit: DiT-XL/2 on the KL-f8 latents of 256x256 images with x-flips, batch
    256, label dropout 0.1 (DiT-tiny on 16x16 images when quick). The SD VAE weights are a download that an offline
    GPU machine lacks, and the VAE's speed is not measured here (the script encodes the data once, into its latent
    cache, before training), so a randomly initialised VAE of the same architecture stands in. Sampling: the generate
    path's DPM-Solver++(2M), 50 steps, CFG 1.75, without the VAE decode (the official sampler is timed without it)."""
    resolution, vae_config, num_classes = (16, nets.AUTOENCODER_TINY, 10) if opt.quick else (256, {}, 1000)
    argv = ['--preset=in1k-dit', f'--resolution={resolution}', f'--num_classes={num_classes}']
    argv += ['--arch=DiT-tiny', '--ddim_steps=3'] if opt.quick else []
    argv += ['--compile=true'] if opt.compile else []
    argv += [f'--batch_gpu={opt.batch_gpu}'] if opt.batch_gpu else []
    cfg = ldm_labelnoise.parse_config('train', ldm_labelnoise.TrainConfig, argv, presets=ldm_labelnoise.PRESETS)
    batch = opt.batch.get('dit', 8 if opt.quick else cfg.batch)
    images, _ = random_images(2 * batch, 3, resolution)
    data_path, vae_path = os.path.join(folder, f'dit-{resolution}.npz'), os.path.join(folder, 'random-vae.bin')
    np.savez(data_path, x=images, y=np.arange(len(images)) % num_classes)
    torch.manual_seed(0)
    torch.save(nets.AutoencoderKL(**vae_config).state_dict(), vae_path)
    argv += [f'--data={data_path}', f'--vae={vae_path}', f'--cache_dir={folder}', '--grid=4']
    timing, snapshot = train_script(opt, 'ldm_labelnoise', argv, batch, folder)

    device = opt.device
    sample_cfg = ldm_labelnoise.parse_config('generate', ldm_labelnoise.GenerateConfig, [
        f'--network={snapshot}', f'--scheduler={cfg.scheduler}', f'--ddim_steps={cfg.ddim_steps}',
        f'--scale={cfg.scale}'])
    sample_cfg = dataclasses.replace(sample_cfg, precision=train_precision(opt, sample_cfg.precision))
    net, spec, _ = ldm_labelnoise.load_snapshot(snapshot, device, sample_cfg.scale)
    shape, backbone = tuple(spec['shape']), net.backbone

    def sample(seeds):
        default_flags()
        noise, randn_like = ldm_labelnoise.seeded_noise(seeds, shape, device)
        y = torch.tensor([seed % spec['num_classes'] for seed in seeds], device=device)  # class-balanced
        return ldm_labelnoise.sample_images(net, spec, None, noise, y, sample_cfg, randn_like)

    patch = backbone.x_embedder.proj.stride[0]
    info = dict(config=f'{cfg.arch} latents {shape[1]}x{shape[2]}x{shape[0]} {train_precision(opt, cfg.precision)}'
                       + (' compile' if cfg.compile else ''),
                flops=3 * dit_forward_flops(backbone, (shape[1] // patch) ** 2), precision=sample_cfg.precision,
                sample=sample, steps=sample_cfg.ddim_steps, scale=sample_cfg.scale, num_classes=num_classes,
                shape=shape, dit=dict(depth=len(backbone.blocks), hidden_size=backbone.hidden_size, patch_size=patch,
                                      num_heads=backbone.blocks[0].attn.num_heads))
    return timing, batch, info

# ----------------------------------------------------------------------------------------------------------------------
# The official implementations, imported by path from --official.


class Unavailable(Exception):
    """The official code for a row cannot run here (missing tree or package): the row says n/a and why."""


def official_tree(opt, *names):
    """The first of DIR/name that exists, put at the front of sys.path. edm and ambient-diffusion both have top-level
    packages named training, torch_utils and dnnlib, so whatever another official tree put on sys.path or in
    sys.modules is taken out first."""
    for name in names:
        path = os.path.join(opt.official, name)
        if os.path.isdir(path):
            inside = lambda file, folder: file.startswith(folder + os.sep)  # noqa: E731
            sys.path[:] = [p for p in sys.path if not inside(p, opt.official) or p == path]
            for module_name, module in list(sys.modules.items()):
                file = getattr(module, '__file__', None) or ''
                if inside(file, opt.official) and not inside(file, path) or module_name in STUBS:
                    del sys.modules[module_name]
            STUBS.clear()
            if path not in sys.path:
                sys.path.insert(0, path)
            return path
    raise Unavailable(f'no {" or ".join(names)} in {opt.official}')


def official_function(path, name, namespace):
    """One top-level function or class of an official script, compiled from its source without importing the script
    (EDM's generate.py imports click and its whole tool chain at the top). The code runs unchanged."""
    with open(path) as file:
        tree = ast.parse(file.read())
    node = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, 'exec'), namespace)
    return namespace[name]


def process_group(device):
    """A one-process group: the official trainers wrap their network in DDP (and guided-diffusion's timestep sampler
    all-gathers) even on one GPU, so their timed step includes that, as when they run."""
    if not torch.distributed.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix='bench-pg-'), 'store')
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                             init_method=f'file://{store}', rank=0, world_size=1)


def one_hot_labels(label_dim, n):
    """The labels EDM's dataset hands over: one-hot rows, (n, 0) for an unconditional network."""
    return torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else torch.zeros(n, 0)


def accumulation_rounds(net_ddp, rounds):
    """EDM's gradient accumulation (misc.ddp_sync): DDP all-reduces the gradients in the last round only."""
    for round_idx in range(rounds):
        with contextlib.nullcontext() if round_idx == rounds - 1 else net_ddp.no_sync():
            yield


def ddp(net, device):
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)


def theirs_edm(opt, unet, label_dim, batch):
    """NVlabs/edm training_loop.py for `train.py --arch=ddpmpp`: EDMPrecond(SongUNet) in fp32 with TF32 off (as
    training_loop.py sets it), EDMLoss with AugmentPipe(p=0.12, the train.py set), Adam, nan cleanup, EMA loop, DDP.
    The same UNet size as ours (ambient: 2C input channels; EDM has no gated convolutions)."""
    official_tree(opt, 'edm')
    stub_missing()
    from training import augment as edm_augment, loss as edm_loss, networks as edm_networks
    from torch_utils import training_stats
    device, cuda = opt.device, opt.device.type == 'cuda'
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    channels, resolution = unet['in_channels'], unet['img_resolution']
    net = edm_networks.EDMPrecond(
        img_resolution=resolution, img_channels=channels, label_dim=label_dim, use_fp16=False,
        model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
        channel_mult_noise=1, resample_filter=[1, 1], model_channels=unet['model_channels'],
        channel_mult=list(unet['channel_mult']), num_blocks=unet['num_blocks'],
        attn_resolutions=list(unet['attn_resolutions']), dropout=unet['dropout'], augment_dim=unet['augment_dim'])
    net.train().requires_grad_(True).to(device)
    loss_fn = edm_loss.EDMLoss()
    augment_pipe = edm_augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                                           translate_frac=1) if unet['augment_dim'] else None
    optimizer = torch.optim.Adam(net.parameters(), lr=10e-4, betas=[0.9, 0.999], eps=1e-8)
    process_group(device)
    net_ddp = ddp(net, device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    batch_gpu = opt.batch_gpu or batch
    # Their DataLoader hands over pinned uint8 batches and one-hot labels.
    images = torch.from_numpy(random_images(batch_gpu, channels, resolution)[0]).permute(0, 3, 1, 2)
    images = images.pin_memory() if cuda else images
    labels = one_hot_labels(label_dim, batch_gpu)
    progress = dict(cur_nimg=0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for _ in accumulation_rounds(net_ddp, batch // batch_gpu):
            x = images.to(device).to(torch.float32) / 127.5 - 1
            loss = loss_fn(net=net_ddp, images=x, labels=labels.to(device), augment_pipe=augment_pipe)
            training_stats.report('Loss/loss', loss)
            loss.sum().mul(1 / batch).backward()
        for g in optimizer.param_groups:
            g['lr'] = 10e-4 * min(progress['cur_nimg'] / max(10000 * 1000, 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        ema_beta = 0.5 ** (batch / max(min(500 * 1000, progress['cur_nimg'] * 0.05), 1e-8))
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
        progress['cur_nimg'] += batch

    edm_sampler = official_function(os.path.join(opt.official, 'edm', 'generate.py'), 'edm_sampler',
                                    dict(torch=torch, np=np))
    stacked = official_function(os.path.join(opt.official, 'edm', 'generate.py'), 'StackedRandomGenerator',
                                dict(torch=torch, np=np))

    def sample(seeds, num_steps):
        # generate.py: per-seed generators, fp32 network, Heun (it draws churn noise even at S_churn = 0).
        rnd = stacked(device, seeds)
        latents = rnd.randn([len(seeds), channels, resolution, resolution], device=device)
        class_labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(seeds)], device=device)] \
            if label_dim else None
        with torch.no_grad():
            x = edm_sampler(ema, latents, class_labels, randn_like=rnd.randn_like, num_steps=num_steps)
        return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

    return step, dict(config='EDM SongUNet fp32 (TF32 off) DDP', sample=sample)


def theirs_ambient(opt, info, batch):
    """giannisdaras/ambient-diffusion training_loop.py for `train.py --precond=ambient --arch=ddpmpp --gated=True`, like
    for like with ours: EDMPrecond(SongUNet) with 2C input channels and gated convolutions, torch.compile'd as that
    loop does, fp32 with TF32 off, AmbientLoss with AugmentPipe(p=0.12), Adam, nan cleanup, optional clipping, EMA,
    DDP. Its DataLoader's batches (images in [-1, 1], A and A_tilde as float32, drawn by NumPy per image in a worker
    process) are stood in for by pinned float32 tensors made once, so the loader's CPU cost is left out of both."""
    path = official_tree(opt, 'ambient-diffusion')
    stub_missing('wandb', 's3fs', 'torchvision')
    if not hasattr(sys.modules['torchvision'], 'transforms'):  # dnnlib/util.py: `from torchvision import transforms`
        sys.modules['torchvision'].transforms = types.ModuleType('torchvision.transforms')
    from training import augment as their_augment, loss as their_loss, networks as their_networks
    from torch_utils import training_stats
    device, cuda, unet, cfg = opt.device, opt.device.type == 'cuda', info['unet'], info['cfg']
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    channels, resolution, label_dim = unet['in_channels'], unet['img_resolution'], unet['label_dim']
    net = their_networks.EDMPrecond(
        img_resolution=resolution, img_channels=channels, label_dim=label_dim, use_fp16=False, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
        resample_filter=[1, 1], model_channels=unet['model_channels'], channel_mult=list(unet['channel_mult']),
        num_blocks=unet['num_blocks'], attn_resolutions=list(unet['attn_resolutions']), dropout=unet['dropout'],
        augment_dim=unet['augment_dim'], gated=unet['gated'])
    net.train().requires_grad_(True).to(device)
    loss_fn = their_loss.AmbientLoss(norm=cfg.norm)
    augment_pipe = their_augment.AugmentPipe(p=cfg.augment, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                                             translate_frac=1) if unet['augment_dim'] else None
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=[0.9, 0.999], eps=1e-8)
    ema = copy.deepcopy(net).eval().requires_grad_(False)  # (their ema copies the compiled module: same parameters)
    compiled = net if opt.quick and not opt.compile else torch.compile(net)  # quick mode: CPU compile takes minutes
    process_group(device)
    net_ddp = ddp(compiled, device)
    batch_gpu = opt.batch_gpu or batch
    image_channels = channels // 2
    shape = (batch_gpu, image_channels, resolution, resolution)
    generator = np.random.default_rng(0)
    images = torch.from_numpy(random_images(batch_gpu, image_channels, resolution)[0]).permute(0, 3, 1, 2)
    images = images.float().div(127.5).sub(1)
    A = torch.from_numpy(generator.binomial(1, 1 - cfg.corruption_probability, shape).astype(np.float32))
    A_tilde = A * torch.from_numpy(generator.binomial(1, 1 - cfg.delta_probability, shape).astype(np.float32))
    labels = one_hot_labels(label_dim, batch_gpu)
    images, A, A_tilde, labels = (t.pin_memory() if cuda else t for t in (images, A, A_tilde, labels))
    progress = dict(cur_nimg=0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for _ in accumulation_rounds(net_ddp, batch // batch_gpu):
            train_loss, val_loss, test_loss = loss_fn(
                net=net_ddp, images=images.to(device).to(torch.float32), labels=labels.to(device),
                augment_pipe=augment_pipe, corruption_matrix=A.to(device), hat_corruption_matrix=A_tilde.to(device))
            training_stats.report('Loss/loss', val_loss)
            training_stats.report('Loss/loss_test', test_loss)
            training_stats.report('Loss/loss_train', train_loss)
            val_loss.sum().mul(1 / batch).backward()
        for g in optimizer.param_groups:
            g['lr'] = cfg.lr * min(progress['cur_nimg'] / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
        optimizer.step()
        ema_beta = 0.5 ** (batch / max(min(cfg.ema * 1e6, progress['cur_nimg'] * cfg.ema_rampup_ratio), 1e-8))
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
        progress['cur_nimg'] += batch

    # eval.py's ambient_sampler and its helpers, taken from the source without importing eval.py (click, wandb, ...).
    read = lambda file, name, **namespace: official_function(  # noqa: E731
        os.path.join(path, file), name, dict(torch=torch, np=np, **namespace))
    sampler = read('eval.py', 'ambient_sampler', cdist_masked=read('eval.py', 'cdist_masked'),
                   tensor_clipping=read(os.path.join('dnnlib', 'util.py'), 'tensor_clipping'),
                   get_random_mask=read(os.path.join('torch_utils', 'ambient_diffusion.py'), 'get_random_mask'))
    stacked = read(os.path.join('torch_utils', 'misc.py'), 'StackedRandomGenerator')
    survival = (1 - cfg.corruption_probability) * (1 - cfg.delta_probability)

    def sample(seeds, num_steps):
        # eval.py: per-seed latents and labels, fp32 network, the fixed-mask Heun sampler in float64 (one mask,
        # no guidance: the official README's CIFAR-10 setting), masks from NumPy's global generator.
        rnd = stacked(device, seeds)
        latents = rnd.randn([len(seeds), image_channels, resolution, resolution], device=device)
        class_labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(seeds)], device=device)] \
            if label_dim else None
        x = sampler(ema, latents, class_labels, randn_like=rnd.randn_like, num_steps=num_steps,
                    survival_probability=survival, mask_full_rgb=cfg.mask_full_rgb, num_masks=1, guidance_scale=0.0)
        return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

    compiled_note = '' if compiled is net else ' compile'
    return step, dict(config=f'ambient-diffusion SongUNet gated fp32 (TF32 off){compiled_note} DDP', sample=sample)


STUBS = set()  # names of the stand-in modules, dropped again when another official tree is put on the path


def stub_module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules.setdefault(name, module)
    STUBS.add(name)


def stub_missing(*names):
    """Empty stand-ins for packages the official trees import at the top but never use in the timed code (wandb,
    s3fs, blobfile, ...), for those not installed. distutils (gone in Python 3.12) gets the one function dnnlib uses."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            stub_module(name)
    try:
        from distutils.util import strtobool  # noqa: F401
    except ImportError:
        stub_module('distutils')
        stub_module('distutils.util', strtobool=lambda text: int(text.lower() in ('y', 'yes', 't', 'true', 'on', '1')))
        sys.modules['distutils'].util = sys.modules['distutils.util']


def theirs_guided(opt, unet, gamma, batch, fp16):
    """guided-diffusion's TrainLoop.run_step (DDPM-IP's fork when DIR/DDPM-IP exists: its training_losses adds the
    input perturbation): create_model_and_diffusion with the DDPM-IP CIFAR-10 flags, loss-second-moment sampler,
    MixedPrecisionTrainer with --use_fp16 True on CUDA, AdamW, EMA, DDP. blobfile and mpi4py are stubbed when
    missing: only checkpoint I/O and process-group setup use them, never the timed step."""
    path = official_tree(opt, 'DDPM-IP', 'guided-diffusion')
    stub_missing('blobfile', 'mpi4py')
    if not hasattr(sys.modules['mpi4py'], 'MPI'):
        stub_module('mpi4py.MPI')
        sys.modules['mpi4py'].MPI = sys.modules['mpi4py.MPI']
    if not hasattr(np, 'int'):  # resample.py's np.int, removed in NumPy 1.24: the alias meant the builtin int
        np.int = int
    from guided_diffusion import logger, resample, script_util, train_util
    device, cuda = opt.device, opt.device.type == 'cuda'
    torch.backends.cudnn.benchmark = False  # their defaults: neither sets cuDNN autotuning nor TF32 matmuls
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    logger.configure(dir=tempfile.mkdtemp(prefix='bench-guided-'), format_strs=[])
    process_group(device)
    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=unet['img_resolution'], num_channels=unet['model_channels'],
                 num_res_blocks=unet['num_blocks'], channel_mult=','.join(map(str, unet['channel_mult'])),
                 num_head_channels=unet['num_head_channels'],
                 attention_resolutions=','.join(map(str, unet['attn_resolutions'])), dropout=unet['dropout'],
                 learn_sigma=True, diffusion_steps=1000, noise_schedule='cosine', use_scale_shift_norm=True,
                 resblock_updown=True, use_new_attention_order=True, rescale_learned_sigmas=True, use_fp16=fp16)
    if 'input_pertub' in flags:
        flags['input_pertub'] = gamma
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    model.to(device)
    loop = train_util.TrainLoop(
        model=model, diffusion=diffusion, data=None, batch_size=batch, microbatch=opt.batch_gpu or -1, lr=1e-4,
        ema_rate='0.9999', log_interval=10, save_interval=10 ** 9, resume_checkpoint='', use_fp16=fp16,
        schedule_sampler=resample.create_named_schedule_sampler('loss-second-moment', diffusion), weight_decay=0.0)
    # Their data loader yields float32 host batches in [-1, 1].
    images = torch.from_numpy(random_images(batch, 3, unet['img_resolution'])[0]).permute(0, 3, 1, 2)
    images = images.float().div(127.5).sub(1)
    images = images.pin_memory() if cuda else images

    def step():
        loop.run_step(images, {})
        if loop.step % loop.log_interval == 0:
            logger.dumpkvs()
        loop.step += 1

    sample_flags = dict(flags, timestep_respacing='4' if opt.quick else '100')
    sample_model, sample_diffusion = script_util.create_model_and_diffusion(**sample_flags)
    sample_model.to(device).eval()
    if fp16:
        sample_model.convert_to_fp16()

    def sample(num):
        with torch.no_grad():
            x = sample_diffusion.p_sample_loop(sample_model, (num, 3, unet['img_resolution'], unet['img_resolution']),
                                               clip_denoised=True)
        return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)

    name = os.path.basename(path)
    return step, dict(config=f'{name} UNetModel {"fp16" if fp16 else "fp32"} DDP', sample=sample)


def theirs_dit(opt, info, batch):
    """facebookresearch/DiT train.py: DiT_models[...] (fp32 with TF32, as train.py sets it), create_diffusion(''),
    training_losses with its label dropout inside the model, AdamW(1e-4, 0), update_ema, loss.item() per step,
    DDP. The latents are given (train.py encodes images with the VAE inside the step; our script caches them)."""
    official_tree(opt, 'DiT')
    try:
        import timm  # noqa: F401 (DiT's models.py builds on timm's layers)
    except ImportError:
        raise Unavailable('timm is not installed (DiT models.py needs it)') from None
    import models as dit_models
    from diffusion import create_diffusion
    device = opt.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    shape, spec = info['shape'], info['dit']
    model = dit_models.DiT(input_size=shape[1], patch_size=spec['patch_size'], in_channels=shape[0],
                           hidden_size=spec['hidden_size'], depth=spec['depth'], num_heads=spec['num_heads'],
                           num_classes=info['num_classes'], class_dropout_prob=0.1, learn_sigma=True).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    update_ema = official_function(os.path.join(opt.official, 'DiT', 'train.py'), 'update_ema',
                                   dict(torch=torch, OrderedDict=__import__('collections').OrderedDict))
    process_group(device)
    model_ddp = ddp(model, device)
    diffusion = create_diffusion(timestep_respacing='')
    opt_dit = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model.train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=generator).to(device)
    y = torch.randint(info['num_classes'], (batch,), generator=generator).to(device)
    running = dict(loss=0.0)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        loss = diffusion.training_losses(model_ddp, x, t, dict(y=y))['loss'].mean()
        opt_dit.zero_grad()
        loss.backward()
        opt_dit.step()
        update_ema(ema, model_ddp.module)
        running['loss'] += loss.item()

    def sample(num):
        # sample.py with the DDPM sampler respaced to our number of steps (same network evaluations), CFG doubled.
        sample_diffusion = create_diffusion(str(info['steps']))
        z = torch.randn(num, *shape, device=device)
        z = torch.cat([z, z], 0)
        labels = torch.cat([torch.arange(num, device=device) % info['num_classes'],
                            torch.full((num,), info['num_classes'], device=device)])
        with torch.no_grad():
            out = sample_diffusion.p_sample_loop(ema.forward_with_cfg, z.shape, z, clip_denoised=False,
                                                 model_kwargs=dict(y=labels, cfg_scale=info['scale']), progress=False,
                                                 device=device)
        return out

    flops = 3 * dit_forward_flops(model, (shape[1] // spec['patch_size']) ** 2)
    return step, dict(config='DiT models.py fp32+TF32 DDP', sample=sample, flops=flops)


def theirs_pytorch_fid(opt, detector):
    """pytorch-fid's InceptionV3([3]) with the same weights, run as fid_score.get_activations: [0, 1] float input,
    one host copy of the features per batch; torch's defaults (TF32 convolutions)."""
    path = official_tree(opt, os.path.join('pytorch-fid', 'src'))
    try:
        import pytorch_fid.inception as reference
    except ImportError as error:
        raise Unavailable(f'pytorch-fid cannot be imported from {path}: {error}') from None
    state = detector.state_dict()
    reference.load_state_dict_from_url = lambda *args, **kwargs: state  # no download: the same weights as ours
    model = reference.InceptionV3([3]).to(opt.device).eval()
    torch.backends.cudnn.allow_tf32 = True

    def run(batches):
        features = []
        with torch.no_grad():
            for batch in batches:
                features.append(model(batch.float() / 255)[0].squeeze(3).squeeze(2).cpu().numpy())
        return np.concatenate(features)

    return run

# ----------------------------------------------------------------------------------------------------------------------
# The rows


def row(name, config, batch, ours, theirs=None, goal=None, flops=None, peak=None, note=''):
    """One table row; ours / theirs are time_* dicts, or a string saying why there is no number."""
    def number(result, key):
        return result.get(key) if isinstance(result, dict) else None
    entry = dict(name=name, config=config, batch=batch, ours=number(ours, 'img_per_sec'),
                 theirs=number(theirs, 'img_per_sec'), mem_ours_gb=number(ours, 'mem_gb'),
                 mem_theirs_gb=number(theirs, 'mem_gb'), goal=goal, note=note)
    entry['theirs_config'] = theirs.get('config') if isinstance(theirs, dict) else None
    entry['ratio'] = entry['ours'] / entry['theirs'] if entry['ours'] and entry['theirs'] else None
    for side, result in (('ours', ours), ('theirs', theirs)):
        if isinstance(result, str):
            entry['note'] = (entry['note'] + '; ' if entry['note'] else '') + f'{side}: {result}'
        model_flops = result.get('flops', flops) if isinstance(result, dict) else None
        entry[f'mfu_{side}'] = entry[side] * model_flops / (peak * 1e12) if entry[side] and model_flops and peak \
            else None
    return entry


def attempt(what, function, *args):
    """function(*args), or the reason it could not run (the official code may be missing or break)."""
    try:
        return function(*args)
    except Unavailable as error:
        return f'n/a ({error})'
    except torch.cuda.OutOfMemoryError:
        return 'n/a (out of GPU memory: try --batch_gpu)'
    except Exception as error:  # noqa: BLE001 (one failing row must not lose the others)
        traceback.print_exc()
        return f'n/a ({what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""})'


def bench_training(opt, ours_builder, theirs_builder, name, goal, peak, rows):
    """Runs our script (it times itself), then times their step (same batch, same network); returns our info and
    theirs for the sampling rows."""
    ours, batch, info = ours_builder()  # the script ran and timed itself
    release_memory(opt.device)
    theirs = None
    if opt.official and theirs_builder:
        def run_theirs():
            their_step, their_info = theirs_builder(info, batch)
            result = time_training(their_step, batch, opt)
            return dict(result, **{k: v for k, v in their_info.items() if k in ('config', 'flops')},
                        sample=their_info.get('sample'))
        theirs = attempt(f'official {name}', run_theirs)
        release_memory(opt.device)
    rows.append(row(name, info['config'], batch, ours, theirs, goal, info.get('flops'), peak))
    return info, theirs


def bench_sampling(opt, name, config, info, theirs, their_call, note=''):
    """Times our sampler on --sample_batch seeds and, when the official trainer gave a sampler, theirs on as many
    images (their_call(sampler, seeds) runs it); a failed official trainer's reason carries over."""
    seeds = list(range(opt.sample_batch))
    ours = time_once(lambda: info['sample'](seeds), len(seeds), opt.device)
    theirs_sample = theirs if isinstance(theirs, str) else None
    if isinstance(theirs, dict) and theirs.get('sample'):
        theirs_sample = attempt(f'official {name}', lambda: time_once(
            lambda: their_call(theirs['sample'], seeds), len(seeds), opt.device))
    return row(name, config, len(seeds), ours, theirs_sample, GOALS['sampling'], note=note)


def run_benchmarks(opt, folder):
    rows, peak = [], peak_tflops(opt)
    quick = opt.quick

    if {'ambient', 'ambient_laws', 'ddpm_ip'} & set(opt.only):
        data_path = dataset_file(folder, 64 if quick else 4096)

    if 'ambient' in opt.only:
        info, theirs = bench_training(
            opt, lambda: ours_ambient(opt, data_path, folder),
            lambda info, batch: theirs_edm(opt, info['unet'], info['unet']['label_dim'], batch),
            'ambient train', GOALS['ddpmpp'], peak, rows)
        if opt.official:  # like for like: the same gated network, loss and sampler in ambient-diffusion's code
            del info, theirs
            release_memory(opt.device)
            info, theirs = bench_training(opt, lambda: ours_ambient(opt, data_path, folder),
                                          lambda info, batch: theirs_ambient(opt, info, batch),
                                          'ambient train vs ambient-diffusion', None, peak, rows)
        else:
            theirs = None
        rows.append(bench_sampling(opt, 'ambient sample',
                                   f'ambient Heun {2 * info["steps"] - 1} NFE {info["precision"]}', info, theirs,
                                   lambda sample, seeds: sample(seeds, info['steps']),
                                   note='fixed-mask sampler, 1 mask'))
        del info, theirs
        release_memory(opt.device)

    if 'ambient_laws' in opt.only:
        info, theirs = bench_training(
            opt, lambda: ours_ambient_laws(opt, data_path, folder, consistency=False),
            lambda info, batch: theirs_edm(opt, info['unet'], info['unet']['label_dim'], batch),
            'ambient_laws train', GOALS['ddpmpp'], peak, rows)
        rows.append(bench_sampling(opt, 'EDM Heun sample', f'{info["unet"]["arch"]} Heun {2 * info["steps"] - 1} NFE '
                                   f'{info["precision"]}', info, theirs,
                                   lambda sample, seeds: sample(seeds, info['steps'])))
        del info, theirs
        release_memory(opt.device)
        bench_training(opt, lambda: ours_ambient_laws(opt, data_path, folder, consistency=True), None,
                       'ambient_laws train +consistency', None, peak, rows)
        release_memory(opt.device)

    if 'ddpm_ip' in opt.only:
        fp16 = opt.device.type == 'cuda'
        info, theirs = bench_training(
            opt, lambda: ours_ddpm_ip(opt, data_path, folder),
            lambda info, batch: theirs_guided(opt, info['unet'], info['gamma'], batch, fp16),
            'ddpm_ip train', GOALS['adm'], peak, rows)
        rows.append(bench_sampling(opt, 'ADM sample', f'{info["unet"]["arch"]} ancestral, respaced {info["steps"]} '
                                   f'steps {info["precision"]}', info, theirs,
                                   lambda sample, seeds: sample(len(seeds))))
        del info, theirs
        release_memory(opt.device)

    if 'dit' in opt.only:
        info, theirs = bench_training(opt, lambda: ours_dit(opt, folder),
                                      lambda info, batch: theirs_dit(opt, info, batch),
                                      'DiT train', GOALS['dit'], peak, rows)
        rows.append(bench_sampling(opt, 'DiT sample', f'DPM-Solver++(2M) {info["steps"]} steps CFG {info["scale"]} '
                                   f'{info["precision"]}', info, theirs, lambda sample, seeds: sample(len(seeds)),
                                   note='theirs: DDPM p_sample_loop respaced to the same number of steps'))
        del info, theirs
        release_memory(opt.device)

    if 'fid' in opt.only:
        images = torch.from_numpy(random_images(opt.fid_num, 3, 32)[0]).permute(0, 3, 1, 2).to(opt.device)
        batches = images.split(opt.fid_batch)
        detector = fid.InceptionV3().eval().requires_grad_(False).to(opt.device)  # speed only: weights do not matter
        for precision in ('fp32', 'tf32'):
            def ours_features(precision=precision):
                return fid.compute_features(batches, detector, opt.device, precision=precision, progress=False)
            ours = time_once(ours_features, opt.fid_num, opt.device)
            theirs = attempt('pytorch-fid', lambda: time_once(
                lambda run=theirs_pytorch_fid(opt, detector): run(batches), opt.fid_num, opt.device)) \
                if opt.official else None
            rows.append(row(f'fid.py features {precision}', f'Inception-v3 pool3, 32x32 -> 299, {precision}',
                            opt.fid_batch, ours, theirs, GOALS['fid'],
                            note='pytorch-fid: torch defaults (TF32 convolutions)' if opt.official else ''))
        release_memory(opt.device)
    return rows

# ----------------------------------------------------------------------------------------------------------------------
# Output and main


def format_number(value, digits=0):
    return '-' if value is None else f'{value:.{digits}f}'


def format_table(rows, header):
    columns = ['name', 'config', 'batch', 'ours img/s', 'theirs img/s', 'ratio', 'goal', 'mem GiB ours/theirs',
               'MFU ours/theirs']
    lines = []
    for r in rows:
        memory = f'{format_number(r["mem_ours_gb"], 1)}/{format_number(r["mem_theirs_gb"], 1)}'
        mfu = '-' if r['mfu_ours'] is None and r['mfu_theirs'] is None else \
            f'{format_number(100 * r["mfu_ours"] if r["mfu_ours"] else None)}%/' \
            f'{format_number(100 * r["mfu_theirs"] if r["mfu_theirs"] else None)}%'
        lines.append([r['name'], r['config'], str(r['batch']), format_number(r['ours'], 1),
                      format_number(r['theirs'], 1), format_number(r['ratio'], 2) + ('x' if r['ratio'] else ''),
                      f'{r["goal"]}x' if r['goal'] else '-', memory, mfu])
    widths = [max(len(c), *(len(line[k]) for line in lines)) for k, c in enumerate(columns)] if lines else \
        [len(c) for c in columns]
    text = [header, ' | '.join(c.ljust(w) for c, w in zip(columns, widths)), '-+-'.join('-' * w for w in widths)]
    text += [' | '.join(v.ljust(w) for v, w in zip(line, widths)) for line in lines]
    notes = [f'  {r["name"]}: {r["note"]}' for r in rows if r['note']]
    return '\n'.join(text + (['notes:'] + notes if notes else []))


def readme_table(reports):
    """The README's performance table (Markdown) from the JSON reports of one or more runs."""
    lines = ['| GPU | torch | date | row | config | batch | ours img/s | theirs img/s | ours/theirs | goal | '
             'peak GiB ours/theirs | MFU ours/theirs |', '|' + '---|' * 12]
    for report in reports:
        for r in report['rows']:
            mfu = '-' if r['mfu_ours'] is None and r['mfu_theirs'] is None else \
                f'{format_number(100 * r["mfu_ours"] if r["mfu_ours"] else None)}% / ' \
                f'{format_number(100 * r["mfu_theirs"] if r["mfu_theirs"] else None)}%'
            lines.append(' | '.join([
                '', report['gpu'], report['torch'], report['date'][:10], r['name'], r['config'], str(r['batch']),
                format_number(r['ours'], 1), format_number(r['theirs'], 1),
                format_number(r['ratio'], 2) + ('x' if r['ratio'] else ''), f'{r["goal"]}x' if r['goal'] else '-',
                f'{format_number(r["mem_ours_gb"], 1)} / {format_number(r["mem_theirs_gb"], 1)}', mfu, '']).strip())
    return '\n'.join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny configurations (automatic on CPU)')
    parser.add_argument('--only', default=','.join(BENCHMARKS), help='comma list of ' + ','.join(BENCHMARKS))
    parser.add_argument('--official', default='',
                        help='folder with edm, DDPM-IP or guided-diffusion, DiT, pytorch-fid, ambient-diffusion')
    parser.add_argument('--json', default='', help='write the results here')
    parser.add_argument('--readme', default='', metavar='A.json,B.json',
                        help='print the README table of earlier --json reports, and run nothing')
    parser.add_argument('--batch', action='append', default=[], metavar='NAME=N',
                        help='global training batch of one benchmark, e.g. --batch=dit=128 (repeatable)')
    parser.add_argument('--batch_gpu', type=int, default=0, help='microbatch for ours and theirs, 0 = whole batch')
    parser.add_argument('--compile', action='store_true', help='torch.compile our networks')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed steps before the official steps (default 5, quick 2)')
    parser.add_argument('--steps', type=int, default=None,
                        help='timed training steps S (default 20, quick 3); our scripts warm up for one tick of S')
    parser.add_argument('--sample_batch', type=int, default=None, help='images per sampling run (64, quick 4)')
    parser.add_argument('--fid_num', type=int, default=None, help='images for fid (10000, quick 4)')
    parser.add_argument('--fid_batch', type=int, default=None, help='Inception batch (500, quick 2)')
    parser.add_argument('--peak_tflops', type=float, default=0, help='dense bf16 peak for the MFU, 0 = from the GPU')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    only = tuple(name for name in args.only.split(',') if name)
    if not only or set(only) - set(BENCHMARKS):
        parser.error(f'--only must list some of {",".join(BENCHMARKS)}')
    batch = {}
    for text in args.batch:
        name, _, value = text.partition('=')
        if name not in BENCHMARKS or not value.isdigit() or int(value) < 1:
            parser.error(f'--batch takes NAME=N with NAME in {",".join(BENCHMARKS)}, got {text!r}')
        batch[name] = int(value)
    if args.official and not os.path.isdir(args.official):
        parser.error(f'--official: no folder {args.official}')
    device = torch.device(args.device)
    quick = args.quick or device.type == 'cpu'
    pick = lambda value, full, small: value if value is not None else small if quick else full  # noqa: E731
    return args, Options(
        quick=quick, only=only, official=os.path.abspath(args.official) if args.official else '',
        compile=args.compile, warmup=pick(args.warmup, 5, 2), steps=pick(args.steps, 20, 3), batch=batch,
        batch_gpu=args.batch_gpu, sample_batch=pick(args.sample_batch, 64, 4), fid_num=pick(args.fid_num, 10000, 4),
        fid_batch=pick(args.fid_batch, 500, 2), peak_tflops=args.peak_tflops, device=device)


def main(argv=None):
    args, opt = parse_args(sys.argv[1:] if argv is None else argv)
    if args.readme:
        reports = []
        for path in args.readme.split(','):
            with open(path) as file:
                reports.append(json.load(file))
        print(readme_table(reports))
        return
    gpu = torch.cuda.get_device_name(opt.device) if opt.device.type == 'cuda' else 'cpu'
    header = f'{gpu} | torch {torch.__version__} | {datetime.datetime.now().isoformat(timespec="seconds")} | ' \
             f'{"quick" if opt.quick else "full"} | {opt.steps} timed steps after {opt.warmup} (theirs) ' \
             f'or one tick of {opt.steps} (ours)' \
             f' | peak {peak_tflops(opt) or "-"} TFLOP/s'
    print(f'running {", ".join(opt.only)} on {gpu}' + (f' against {opt.official}' if opt.official else ''), flush=True)
    with tempfile.TemporaryDirectory(prefix='bench-') as folder:
        rows = run_benchmarks(opt, folder)
    print(format_table(rows, header), flush=True)
    if args.json:
        report = dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda,
                      date=datetime.datetime.now().isoformat(),
                      command=' '.join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)),
                      options={k: str(v) for k, v in dataclasses.asdict(opt).items()}, peak_tflops=peak_tflops(opt),
                      rows=rows)
        with open(args.json + '.tmp', 'w') as file:
            json.dump(report, file, indent=2)
        os.replace(args.json + '.tmp', args.json)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
