"""No host sync per training step. Reading a tensor's value on the host (.item(), float(), int(), bool(), .tolist(),
nonzero, unique, boolean-mask indexing) makes the CPU wait for the GPU; the training loops do it once per progress
tick, never per step. Each script trains twice in this process, for 3 and for 7 steps with one tick at the end, and
every op that reads a value on the host is counted by the function of our code that asked for it: what grows with the
number of steps is a per-step read, and only the reads of CPU-only tensors listed in ALLOWED may do so."""
import collections
import os
import traceback

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

import ambient
import ambient_laws
import ddpm_ip
import ldm_labelnoise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data', 'cifar10_tiny.npz')
HOST_READS = {'_local_scalar_dense', 'item', 'nonzero', 'masked_select', 'is_nonzero', 'equal', '_unique2',
              'unique_dim', 'unique_consecutive', 'repeat_interleave'}
ALLOWED = {
    'torch.optim': "torch's non-fused Adam(W) reads its CPU step counter; on CUDA the scripts use fused=True",
    'ambient.py:indices': 'the data order, from CPU positions',
    'ambient_laws.py:image_noise': 'hashes the integer seed in a CPU tensor',
}


class HostReads(TorchDispatchMode):
    """Counts host reads by the innermost frame of our scripts that caused them ('torch.optim' inside optimizers)."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            frames = traceback.extract_stack()[:-1]
            mine = [k for k, f in enumerate(frames) if os.path.dirname(os.path.abspath(f.filename)) == ROOT]
            inner = frames[mine[-1] + 1:] if mine else frames  # torch's frames below our innermost one
            if any('/torch/optim/' in f.filename.replace(os.sep, '/') for f in inner):
                site = 'torch.optim'
            else:
                site = f'{os.path.basename(frames[mine[-1]].filename)}:{frames[mine[-1]].name}' if mine else 'torch'
            self.sites[site] += 1
        return func(*args, **(kwargs or {}))


def count_reads(script, steps, outdir, extra):
    batch = 4
    argv = ['train', '--preset=tiny', f'--data={DATA}', f'--batch={batch}', f'--kimg={(steps * batch - 4) / 1000}',
            '--tick=1000', '--grid=4', f'--outdir={outdir}'] + extra
    with HostReads() as reads:
        script.main(argv)
    return reads.sites


@pytest.mark.parametrize('script, extra', [(ambient, ['--corruption_probability=0.6']),
                                           (ambient_laws, ['--sigma=0.2', '--corruption_probability=0.5',
                                                           '--consistency_coeff=1', '--consistency_batch_size=2',
                                                           '--num_primes=1', '--num_consistency_steps=2']),
                                           (ddpm_ip, []), (ldm_labelnoise, ['--cep=uniform'])],
                         ids=['ambient', 'ambient_laws', 'ddpm_ip', 'ldm_labelnoise'])
def test_no_host_read_per_training_step(script, extra, tmp_path):
    short = count_reads(script, 3, str(tmp_path / 'short'), extra)
    long = count_reads(script, 7, str(tmp_path / 'long'), extra)
    per_step = {site: (long[site] - short[site]) / 4 for site in long if long[site] > short[site]}
    assert set(per_step) <= set(ALLOWED), per_step
    assert long.total() > 0  # the counter sees the reads (the optimizer's at least)
