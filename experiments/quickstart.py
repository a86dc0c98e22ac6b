"""Quick starts that show each method working in about two minutes on two CPU cores (8x8 MNIST digits).

    python experiments/quickstart.py ambient        # Ambient Diffusion beside EDM on the same masked digits
    python experiments/quickstart.py ambient_laws   # 10% clean + 90% noisy digits (sigma_n = 0.2)
    python experiments/quickstart.py ddpm_ip        # ADM with input perturbation gamma = 0.1
    python experiments/quickstart.py labelnoise     # class-conditional DiT, 5% wrong labels + CEP-U

Each runs the paper script's own `train` (and `generate`) commands with the flags printed below, on
tests/data/mnist8.npz, and writes runs/quickstart/<paper>.png: the samples (for ambient: the real digits, the
masked training digits, masked-EDM's samples and Ambient Diffusion's samples side by side). It prints the wall
and CPU time it took. Two training runs (ambient's pair) go side by side, one thread each.
"""

import argparse
import glob
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import metrics  # noqa: E402
import plots  # noqa: E402

DATA = os.path.join('tests', 'data', 'mnist8.npz')
EDM_NET = ['--preset=tiny', '--augment=0', '--cbase=16', '--cres=1,2', '--batch=64', '--lr=5e-3']
COMMANDS = {
    'ambient': {
        'masked-EDM': ['ambient.py', f'--data={DATA}', '--corruption_probability=0.6', '--precond=edm', *EDM_NET,
                       '--kimg=20', '--tick=5', '--snap=4', '--grid=0'],
        'Ambient Diffusion': ['ambient.py', f'--data={DATA}', '--corruption_probability=0.6', *EDM_NET, '--kimg=20',
                              '--tick=5', '--snap=4', '--grid=0'],
    },
    'ambient_laws': {
        '10% clean + 90% noisy': ['ambient_laws.py', f'--data={DATA}', '--sigma=0.2', '--corruption_probability=0.9',
                                  *EDM_NET, '--kimg=20', '--ema_halflife_kimg=0.5', '--lr_rampup_kimg=0.1',
                                  '--tick=5', '--snap=4', '--grid=16', '--seed=0'],
    },
    'ddpm_ip': {
        'ADM-IP (gamma 0.1)': ['ddpm_ip.py', '--preset=tiny', f'--data={DATA}', '--random_flip=False', '--batch=64',
                               '--lr=1e-3', '--kimg=20', '--ema_rate=0.99', '--tick=5', '--snap=4', '--grid=16',
                               '--grid_steps=20'],
    },
    'labelnoise': {
        'DiT, 5% wrong labels + CEP-U': ['ldm_labelnoise.py', '--preset=tiny', '--arch=DiT-tiny', f'--data={DATA}',
                                         '--batch=64', '--lr=2e-3', '--kimg=120', '--ema_decay=0.99',
                                         '--corruption_ratio=0.05', '--cep=uniform', '--tick=20', '--snap=6',
                                         '--grid=20'],
    },
}
# A second grid from the same network: (paper, run title) -> (title of the grid, generate flags).
EXTRA = {('ambient', 'Ambient Diffusion'): ('Ambient, all-ones masks', ['--steps=18', '--sigma_min=0.05',
                                                                          '--sampler=edm'])}
GENERATE = {  # the sampling flags of each script's generate command
    'ambient': ['--steps=18', '--sigma_min=0.05'],  # why sigma_min 0.05: experiments/PROTOCOL.md
    'ambient_laws': ['--steps=18'],
    'ddpm_ip': ['--timestep_respacing=100'],
    'labelnoise': ['--scheduler=dpm', '--ddim_steps=20', '--scale=1.5'],
}


def start(argv, log):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_all(processes):
    """Waits for every process; returns their CPU seconds (user + sys); exits on the first failure."""
    cpu = 0.0
    for process, log_path in processes:
        _, status, usage = os.wait4(process.pid, 0)
        cpu += usage.ru_utime + usage.ru_stime
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f'quickstart: a command failed, see {log_path}')
    return cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('paper', choices=sorted(COMMANDS))
    parser.add_argument('--outdir', default=os.path.join(ROOT, 'runs', 'quickstart'))
    parser.add_argument('--scripts', default=ROOT, help='folder holding the paper scripts (default: this checkout)')
    args = parser.parse_args(argv)
    begin = time.time()
    folder = os.path.join(args.outdir, args.paper)
    os.makedirs(folder, exist_ok=True)
    # Train (side by side when there are two), then generate 64 digits from each final snapshot.
    runs, processes = {}, []
    for k, (title, command) in enumerate(COMMANDS[args.paper].items()):
        outdir = os.path.join(folder, f'run{k}')
        command = [*command, f'--outdir={outdir}', '--device=cpu']
        print('python ' + ' '.join(command), flush=True)
        command = [os.path.join(args.scripts, command[0]), *command[1:]]
        log_path = os.path.join(folder, f'run{k}.log')
        processes.append((start(command, open(log_path, 'w')), log_path))
        runs[title] = (os.path.basename(command[0]), outdir)
    cpu = wait_all(processes)
    processes, samples = [], {}
    for title, (script, outdir) in runs.items():
        network = max(glob.glob(os.path.join(outdir, '**', 'network-snapshot*.pt'), recursive=True),
                      key=os.path.getmtime)
        grids = [(title, GENERATE[args.paper])] + ([EXTRA[args.paper, title]] if (args.paper, title) in EXTRA else [])
        for k, (grid_title, flags) in enumerate(grids):
            out = os.path.join(outdir, f'samples{k}')
            command = [os.path.join(args.scripts, script), 'generate', f'--network={network}',
                       '--seeds=0-63', f'--outdir={out}', '--device=cpu', *flags]
            processes.append((start(command, open(os.path.join(folder, 'generate.log'), 'a')), outdir))
            samples[grid_title] = out
    cpu += wait_all(processes)
    # One picture: (real digits, masked digits,) then the samples of each run.
    with np.load(os.path.join(ROOT, DATA)) as npz:
        real = npz['x'][:64]
    panels, titles = [plots.grid(real, 8, 3)], ['real digits']
    if args.paper == 'ambient':
        keep = np.random.default_rng(0).random(real.shape) >= 0.6  # what the masked data look like (p = 0.6)
        panels.append(plots.grid(np.where(keep, real, 128).astype(np.uint8), 8, 3))
        titles.append('training data (p = 0.6)')
    columns = 10 if args.paper == 'labelnoise' else 8  # labelnoise: seed k has class k mod 10, one class a column
    for title, out in samples.items():
        panels.append(plots.grid(metrics.read_pngs(out)[:columns * 6, ..., 0], columns, 3))
        titles.append(title + (' (a class a column)' if columns == 10 else ''))
    path = os.path.join(args.outdir, f'{args.paper}.png')
    plots.side_by_side(panels, titles).save(path)
    print(f'quickstart {args.paper}: {path} in {time.time() - begin:.0f} s wall, {cpu:.0f} s CPU', flush=True)


if __name__ == '__main__':
    main()
