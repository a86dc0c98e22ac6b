"""CI version of the Ambient Diffusion evidence (docs/evidence.md, "Ambient Diffusion"): a real short training run.

Two networks train through `ambient.py train` on the same 8x8 MNIST digits with 60% of the pixels erased (fixed
masks): Ambient Diffusion (the ambient loss) and the paper's naive baseline, EDM on the masked images
(--precond=edm). The ambient model must land far closer to held-out clean digits in pixel-space Frechet distance.
The margin comes from seed runs (experiments/PROTOCOL.md): a broken ambient loss or training loop falls on the
baseline's side of it (checked by hand as described in docs/evidence.md).
"""

import glob
import os
import sys

import numpy as np

import ambient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import metrics  # noqa: E402

# The CI run (seed 0 of the CI rows in docs/evidence.md): 8x8 digits, p = 0.6, a 2-level DDPM++ of 16 channels.
TRAIN = ['--preset=tiny', '--augment=0', '--cbase=16', '--cres=1,2', '--batch=64', '--lr=5e-3', '--kimg=10',
         '--tick=10', '--snap=1', '--grid=0', '--corruption_probability=0.6', '--seed=0', '--device=cpu']
SAMPLING = ['--steps=18', '--sigma_min=0.05', '--device=cpu']  # why sigma_min: experiments/PROTOCOL.md
SAMPLES = 400
RATIO = 2.0  # required FD(masked-EDM) / FD(ambient), fixed before the seed runs (docs/evidence.md, CI rows)


def run(tmp_path, precond, data):
    outdir = str(tmp_path / precond)
    ambient.main(['train', f'--data={data}', f'--precond={precond}', f'--outdir={outdir}', '--nosubdir=1', *TRAIN])
    network = max(glob.glob(os.path.join(outdir, 'network-snapshot-*.pt')), key=os.path.getmtime)
    ambient.main(['generate', f'--network={network}', f'--seeds=0-{SAMPLES - 1}', *SAMPLING,
                  f'--outdir={outdir}/samples'])
    return metrics.read_pngs(f'{outdir}/samples')


def test_ambient_beats_masked_edm(tmp_path):
    with np.load(os.path.join(ROOT, 'tests', 'data', 'mnist8.npz')) as npz:
        x = npz['x']
    np.savez(tmp_path / 'train.npz', x=x[:8000])
    held_out = x[8000:]
    fd = {precond: metrics.frechet(run(tmp_path, precond, str(tmp_path / 'train.npz')), held_out)
          for precond in ('ambient', 'edm')}
    print(f'FD to held-out digits: ambient {fd["ambient"]:.2f}, masked EDM {fd["edm"]:.2f}')
    assert fd['edm'] > RATIO * fd['ambient'], fd
