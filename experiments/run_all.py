"""Runs the evidence experiments of docs/evidence.md and rewrites its tables and figures.

    python experiments/run_all.py                      # all four papers, 3 seeds, 2 runs at a time
    python experiments/run_all.py --papers=ambient --seeds=3 --jobs=2
    python experiments/run_all.py --report_only        # rewrite docs/evidence.md from the finished runs

Every run goes through a paper script's own commands (`python ambient.py train ...`, `generate`, `exposure`) in a
subprocess with one thread (OMP_NUM_THREADS=1) and `nice`; its CPU time (user + sys of that process) and wall time
are recorded. A finished run keeps its result.json under --workdir and is not redone unless --force, so the command
can be stopped and started again. The protocol (sizes, steps, seeds, metrics) is in experiments/PROTOCOL.md and in
the PAPERS table below; change it only before looking at results.
"""

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import metrics  # noqa: E402
import plots  # noqa: E402
import report  # noqa: E402

MNIST = os.path.join('tests', 'data', 'mnist16.npz')  # 10,000 MNIST test digits at 16x16 (see experiments/README.md)
NUM_TRAIN = 8000                                     # first 8000 digits train, the last 2000 are held out


# ----------------------------------------------------------------------------------------------------------------------
# The protocol: what each paper runs (fixed before the final runs; see PROTOCOL.md)

SAMPLES = 500  # generated images per model for the Frechet distances (pixel space, against the 2000 held-out digits)

# Ambient Diffusion: a small EDM DDPM++ (ambient.py's tiny preset with overrides) on 8x8 digits.
AMBIENT_NET = ['--preset=tiny', '--augment=0', '--cbase=16', '--cres=1,2', '--batch=64', '--lr=5e-3']
AMBIENT_TRAIN = [*AMBIENT_NET, '--kimg=30', '--tick=5', '--snap=6', '--grid=64', '--steps=18']
AMBIENT_P = (0.6, 0.9)
# The sampler settings: primary (every model), then the extra rows of the ambient models.
AMBIENT_SAMPLING = {'samples': ['--steps=18', '--sigma_min=0.05'],
                    'default-sigma-min': ['--steps=18'],
                    'all-ones-mask': ['--steps=18', '--sigma_min=0.05', '--sampler=edm']}
# The CI test's configuration (tests/test_evidence.py), run here over the seeds to show its margin.
CI_TRAIN = [*AMBIENT_NET, '--kimg=10', '--tick=10', '--snap=1', '--grid=0', '--corruption_probability=0.6']
CI_SAMPLES = 400


def ambient_runs(data, seeds):
    """p = 0.6 and 0.9: EDM on clean images, EDM on the masked images (--precond=edm) and Ambient Diffusion; and the
    CI configuration (p = 0.6, 10 kimg) for both losses."""
    variants = [('clean', 0.0, 'edm')] + [(f'{kind}-p{p}', p, precond) for p in AMBIENT_P
                                          for kind, precond in (('masked-edm', 'edm'), ('ambient', 'ambient'))]
    runs = []
    for seed in seeds:
        for name, p, precond in variants:
            train = ['train', f'--data={data["train8"]}', f'--corruption_probability={p}', f'--precond={precond}',
                     f'--seed={seed}', *AMBIENT_TRAIN]
            samplers = AMBIENT_SAMPLING if precond == 'ambient' else {'samples': AMBIENT_SAMPLING['samples']}
            samples = [(key, ['generate', f'--seeds=0-{SAMPLES - 1}', *flags]) for key, flags in samplers.items()]
            runs.append(dict(paper='ambient', script='ambient.py', name=f'{name}-s{seed}', group=name, seed=seed,
                             train=train, samples=samples))
        for name, precond in (('ci-masked-edm', 'edm'), ('ci-ambient', 'ambient')):
            runs.append(dict(paper='ambient', script='ambient.py', name=f'{name}-s{seed}', group=name, seed=seed,
                             train=['train', f'--data={data["train8"]}', f'--precond={precond}', f'--seed={seed}',
                                    *CI_TRAIN],
                             samples=[('samples', ['generate', f'--seeds=0-{CI_SAMPLES - 1}',
                                                   *AMBIENT_SAMPLING['samples']])]))
    return runs


def ambient_metrics(run, outputs, data):
    out = {}
    for key, folder in outputs.items():
        images = metrics.read_pngs(folder)
        suffix = '' if key == 'samples' else f'_{key}'
        out['fd' + suffix] = metrics.frechet(images, data['test8_x'])
        out['nn' + suffix] = metrics.nearest_distance(images[:300], data['train8_x'])
        out['brightness' + suffix] = float(images.mean() / 255)
    return out


# Ambient-laws: the same network on N clean digits, N clean + M noisy (sigma_n = 0.2), N + M clean.
LAWS_N, LAWS_M, LAWS_SIGMA = 20, 1980, 0.2
LAWS_TRAIN = ['--preset=tiny', '--augment=0', '--cbase=16', '--cres=1,2', '--batch=64', '--lr=5e-3', '--kimg=30',
              '--ema_halflife_kimg=0.5', '--lr_rampup_kimg=0.1', '--tick=5', '--snap=6', '--dump=100', '--grid=16']


def laws_runs(data, seeds):
    runs = []
    for seed in seeds:
        for name, extra in (('clean-N', [f'--data={data["laws_clean_N"]}']),
                            ('N-clean+M-noisy', [f'--data={data["laws_clean_NM"]}',
                                                 f'--sigma_per_image={data["laws_sigmas"]}']),
                            ('clean-N+M', [f'--data={data["laws_clean_NM"]}'])):
            runs.append(dict(paper='ambient_laws', script='ambient_laws.py', name=f'{slug(name)}-s{seed}', group=name,
                             seed=seed, train=['train', *extra, f'--seed={seed}', *LAWS_TRAIN],
                             samples=[('samples', ['generate', f'--seeds=0-{SAMPLES - 1}', '--steps=18'])]))
    return runs


def laws_metrics(run, outputs, data):
    images = metrics.read_pngs(outputs['samples'])[:, :, :, :1]
    train = data['train8_x'][:LAWS_N] if run['group'] == 'clean-N' else data['train8_x'][:LAWS_N + LAWS_M]
    return dict(fd=metrics.frechet(images, data['test8_x']), nn_train=metrics.nearest_distance(images[:300], train),
                nn_clean_N=metrics.nearest_distance(images[:300], data['train8_x'][:LAWS_N]))


# DDPM-IP: ADM (tiny-adm) with gamma = 0 and 0.1, sampled with 10, 20 and 100 respaced steps; exposure at 20 steps.
IP_TRAIN = ['--preset=tiny', '--random_flip=False', '--batch=64', '--lr=1e-3', '--kimg=30', '--ema_rate=0.99',
            '--tick=5', '--snap=6', '--grid=16', '--grid_steps=20']
IP_STEPS = (10, 20, 100)


def ip_runs(data, seeds):
    runs = []
    for seed in seeds:
        for gamma in (0.0, 0.1):
            samples = [(f'steps{s}', ['generate', f'--seeds=0-{SAMPLES - 1}', f'--timestep_respacing={s}'])
                       for s in IP_STEPS]
            samples.append(('exposure', ['exposure', f'--data={data["test8"]}', '--timestep_respacing=20',
                                         '--num=500']))
            runs.append(dict(paper='ddpm_ip', script='ddpm_ip.py', name=f'gamma{gamma}-s{seed}', group=f'gamma={gamma}',
                             seed=seed, train=['train', f'--data={data["train8"]}', f'--input_perturbation={gamma}',
                                               f'--seed={seed}', *IP_TRAIN], samples=samples))
    return runs


def ip_metrics(run, outputs, data):
    out = {f'fd_{s}': metrics.frechet(metrics.read_pngs(outputs[f'steps{s}']), data['test8_x']) for s in IP_STEPS}
    found = re.findall(r'sum of delta_t ([0-9.eE+-]+)', outputs['exposure'])
    out['delta_sum'] = float(found[-1]) if found else float('nan')
    return out


# Label noise: a class-conditional DiT (DiT-tiny: 2 blocks of width 64, patch 2) in pixel space; eta = 0, 5 %, 20 %
# wrong labels; CEP-U (gamma 1) on clean labels.
LN_TRAIN = ['--preset=tiny', '--arch=DiT-tiny', '--batch=64', '--lr=2e-3', '--kimg=120', '--ema_decay=0.99',
            '--tick=20', '--snap=6', '--grid=20']
LN_SAMPLE = ['--scheduler=dpm', '--ddim_steps=20', '--scale=1.5']


def ln_runs(data, seeds):
    runs = []
    for seed in seeds:
        for name, extra in (('eta=0', []), ('eta=5%', ['--corruption_ratio=0.05']),
                            ('eta=20%', ['--corruption_ratio=0.2']), ('CEP-U, eta=0', ['--cep=uniform'])):
            runs.append(dict(paper='labelnoise', script='ldm_labelnoise.py', name=f'{slug(name)}-s{seed}', group=name,
                             seed=seed,
                             train=['train', f'--data={data["train8"]}', f'--seed={seed}', *LN_TRAIN, *extra],
                             samples=[('samples', ['generate', f'--seeds=0-{SAMPLES - 1}', *LN_SAMPLE])]))
    return runs


def ln_metrics(run, outputs, data):
    images, labels = metrics.read_pngs(outputs['samples'], with_labels=True)  # dataset.json of generate
    shuffled = np.random.default_rng(0).permutation(labels)  # the same FD with the class information destroyed
    return dict(class_fd=metrics.class_frechet(images, labels, data['test8_x'], data['test8_y']),
                class_fd_shuffled=metrics.class_frechet(images, shuffled, data['test8_x'], data['test8_y']),
                fd=metrics.frechet(images, data['test8_x']),
                diversity=metrics.within_class_diversity(images, labels))


# ----------------------------------------------------------------------------------------------------------------------
# The tables and figures of docs/evidence.md (report.py has the helpers)


def ambient_report(results, data, figures):
    groups = ['clean'] + [f'{kind}-p{p}' for p in AMBIENT_P for kind in ('masked-edm', 'ambient')] + [
        'ci-masked-edm', 'ci-ambient']
    rows = [(g, report.mean_std(report.values(results, 'ambient', g, 'fd')),
             report.mean_std(report.values(results, 'ambient', g, 'nn'), 3),
             report.mean_std(report.values(results, 'ambient', g, 'brightness'), 3),
             report.cpu_column(results, 'ambient', g)) for g in groups]
    blocks = {'ambient-table': report.table(
        ('training data and loss', 'FD to held-out digits (lower is better)', 'nearest training digit',
         'mean brightness (real: %.3f)' % (data['test8_x'].mean() / 255), 'train CPU s'), rows)}
    ordering = []
    for p in AMBIENT_P:
        c, a, m = (np.mean(report.values(results, 'ambient', g, 'fd') or [np.nan])
                   for g in ('clean', f'ambient-p{p}', f'masked-edm-p{p}'))
        ordering.append(f'- p = {p}: clean {c:.2f} < ambient {a:.2f}: {"yes" if c < a else "no"}; '
                        f'ambient {a:.2f} < masked-EDM {m:.2f}: {"yes" if a < m else "no"} '
                        f'(ratio masked / ambient {m / a:.1f})')
    blocks['ambient-ordering'] = '\n'.join(ordering)
    rows = []
    for p in AMBIENT_P:
        g = f'ambient-p{p}'
        for key, label in (('', 'fixed masks, sigma_min 0.05 (primary)'),
                           ('_default-sigma-min', 'fixed masks, sigma_min 0.002 (official default)'),
                           ('_all-ones-mask', 'all-ones masks (--sampler=edm), sigma_min 0.05')):
            rows.append((g, label, report.mean_std(report.values(results, 'ambient', g, 'fd' + key)),
                         report.mean_std(report.values(results, 'ambient', g, 'brightness' + key), 3)))
    blocks['ambient-samplers'] = report.table(('model', 'sampler', 'FD', 'mean brightness'), rows)
    ci = {g: report.values(results, 'ambient', g, 'fd') for g in ('ci-ambient', 'ci-masked-edm')}
    seeds = sorted(s for (p, g, s) in results if p == 'ambient' and g == 'ci-ambient'
                   and ('ambient', 'ci-masked-edm', s) in results)
    amb, med = ({s: results['ambient', g, s] for s in seeds} for g in ('ci-ambient', 'ci-masked-edm'))
    rows = [(s, f'{amb[s]["metrics"]["fd"]:.2f}', f'{med[s]["metrics"]["fd"]:.2f}',
             f'{med[s]["metrics"]["fd"] / amb[s]["metrics"]["fd"]:.2f}',
             f'{amb[s]["train_cpu_s"] + med[s]["train_cpu_s"]:.0f}') for s in seeds]
    rows.append(('mean ± std', report.mean_std(ci['ci-ambient']), report.mean_std(ci['ci-masked-edm']),
                 report.mean_std([results['ambient', 'ci-masked-edm', s]['metrics']['fd']
                                  / results['ambient', 'ci-ambient', s]['metrics']['fd'] for s in seeds]), ''))
    blocks['ci'] = report.table(('training seed', 'FD ambient', 'FD masked-EDM', 'ratio (test needs > 2)',
                                 'train CPU s (both)'), rows)
    real = data['test8_x'][:36]
    keep = np.random.default_rng(0).random(real.shape) >= 0.6
    panels = [plots.grid(real, 6, 3), plots.grid(np.where(keep, real, 128).astype(np.uint8), 6, 3)]
    titles = ['held-out digits', 'as masked, p = 0.6']
    for g, folder, title in [('clean', 'samples', 'clean EDM'), ('masked-edm-p0.6', 'samples', 'masked-EDM p 0.6'),
                             ('ambient-p0.6', 'samples', 'ambient p 0.6'),
                             ('ambient-p0.6', 'default-sigma-min', 'ambient, sigma_min .002'),
                             ('ambient-p0.6', 'all-ones-mask', 'ambient, all-ones'),
                             ('masked-edm-p0.9', 'samples', 'masked-EDM p 0.9'),
                             ('ambient-p0.9', 'samples', 'ambient p 0.9')]:
        if ('ambient', g, 0) in results:
            panels.append(report.sample_panel(results['ambient', g, 0], name=folder, count=36, columns=6))
            titles.append(title)
    if panels:
        report.save_png(plots.side_by_side(panels, titles), os.path.join(figures, 'ambient-samples.png'))
    return blocks


def laws_report(results, data, figures):
    groups = ['clean-N', 'N-clean+M-noisy', 'clean-N+M']
    rows = [(g, report.mean_std(report.values(results, 'ambient_laws', g, 'fd'), 3),
             report.mean_std(report.values(results, 'ambient_laws', g, 'nn_train'), 3),
             report.mean_std(report.values(results, 'ambient_laws', g, 'nn_clean_N'), 3),
             report.cpu_column(results, 'ambient_laws', g)) for g in groups]
    blocks = {'laws-table': report.table(
        ('training set', 'FD to held-out digits', 'nearest training digit (its own set)',
         f'nearest of the {LAWS_N} clean digits', 'train CPU s'), rows)}
    panels = [report.sample_panel(results['ambient_laws', g, 0], count=36, columns=6) for g in groups
              if ('ambient_laws', g, 0) in results]
    if panels:
        report.save_png(plots.side_by_side(panels, [g for g in groups if ('ambient_laws', g, 0) in results]),
                        os.path.join(figures, 'ambient_laws-samples.png'))
    return blocks


def ip_report(results, data, figures):
    groups = ['gamma=0.0', 'gamma=0.1']
    rows = []
    for g in groups:
        rows.append((g, *[report.mean_std(report.values(results, 'ddpm_ip', g, f'fd_{s}'), 3) for s in IP_STEPS],
                     report.mean_std(report.values(results, 'ddpm_ip', g, 'delta_sum'), 3),
                     report.cpu_column(results, 'ddpm_ip', g)))
    blocks = {'ip-table': report.table(
        ('model', *[f'FD, {s} steps' for s in IP_STEPS], 'sum of delta_t (20 steps)', 'train CPU s'), rows)}
    series = []
    for g in groups:
        means = [np.mean(report.values(results, 'ddpm_ip', g, f'fd_{s}') or [np.nan]) for s in IP_STEPS]
        stds = [np.std(report.values(results, 'ddpm_ip', g, f'fd_{s}') or [0], ddof=1)
                if len(report.values(results, 'ddpm_ip', g, f'fd_{s}')) > 1 else 0 for s in IP_STEPS]
        if not np.isnan(means).any():
            series.append((g, list(IP_STEPS), means, stds))
    if series:
        report.save_png(plots.line_plot(series, 'sampling steps (log scale)', 'FD to held-out digits', log_x=True),
                        os.path.join(figures, 'ddpm_ip-fd-steps.png'))
    panels = [report.sample_panel(results['ddpm_ip', g, 0], name=f'steps{s}', count=36, columns=6)
              for g in groups for s in (10, 100) if ('ddpm_ip', g, 0) in results]
    if panels:
        report.save_png(plots.side_by_side(panels, [f'{g}, {s} steps' for g in groups for s in (10, 100)
                                                    if ('ddpm_ip', g, 0) in results]),
                        os.path.join(figures, 'ddpm_ip-samples.png'))
    return blocks


def ln_report(results, data, figures):
    groups = ['eta=0', 'eta=5%', 'eta=20%', 'CEP-U, eta=0']
    rows = [(g, report.mean_std(report.values(results, 'labelnoise', g, 'class_fd'), 3),
             report.mean_std(report.values(results, 'labelnoise', g, 'class_fd_shuffled'), 3),
             report.mean_std(report.values(results, 'labelnoise', g, 'fd'), 3),
             report.mean_std(report.values(results, 'labelnoise', g, 'diversity'), 3),
             report.cpu_column(results, 'labelnoise', g)) for g in groups]
    real = metrics.within_class_diversity(data['test8_x'][:1000], data['test8_y'][:1000])
    blocks = {'ln-table': report.table(
        ('labels', 'class-conditional FD (mean over classes)', 'the same, sample labels shuffled', 'FD (all samples)',
         f'within-class diversity (held-out digits: {real:.3f})', 'train CPU s'), rows)}
    series = []
    for key, label in (('class_fd', 'class-conditional FD'),):
        xs = [0, 5, 20]
        vals = [report.values(results, 'labelnoise', g, key) for g in groups[:3]]
        if all(vals):
            series.append(('label corruption', xs, [np.mean(v) for v in vals],
                           [np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals]))
            cep = report.values(results, 'labelnoise', groups[3], key)
            if cep:
                series.append(('CEP-U (clean labels)', [0], [np.mean(cep)],
                               [np.std(cep, ddof=1) if len(cep) > 1 else 0]))
    if series:
        report.save_png(plots.line_plot(series, 'corrupted labels (%)', 'class-conditional FD'),
                        os.path.join(figures, 'labelnoise-fd-corruption.png'))
    panels = [report.sample_panel(results['labelnoise', g, 0], count=50, columns=10) for g in groups
              if ('labelnoise', g, 0) in results]
    if panels:
        report.save_png(plots.side_by_side(panels, [g for g in groups if ('labelnoise', g, 0) in results]),
                        os.path.join(figures, 'labelnoise-samples.png'))
    return blocks


REPORTS = {'ambient': ambient_report, 'ambient_laws': laws_report, 'ddpm_ip': ip_report, 'labelnoise': ln_report}


PAPERS = {
    'ambient': (ambient_runs, ambient_metrics),
    'ambient_laws': (laws_runs, laws_metrics),
    'ddpm_ip': (ip_runs, ip_metrics),
    'labelnoise': (ln_runs, ln_metrics),
}


# ----------------------------------------------------------------------------------------------------------------------
# Data: MNIST digits at 16x16 and 8x8, split into training and held-out images


def slug(text):
    """A folder name for a configuration label ('eta=5%' -> 'eta-5pc')."""
    return re.sub(r'[^A-Za-z0-9.+]+', '-', text.replace('%', 'pc')).strip('-')


def prepare_data(workdir):
    """Writes the training and held-out .npz files the scripts read; returns their paths and arrays."""
    with np.load(os.path.join(ROOT, MNIST)) as npz:
        x16, y = npz['x'], npz['y']
    x8 = x16.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4)).round().astype(np.uint8)  # 2x2 average
    out = {}
    os.makedirs(os.path.join(workdir, 'data'), exist_ok=True)
    for name, x in (('16', x16), ('8', x8)):
        for part, rows in (('train', slice(0, NUM_TRAIN)), ('test', slice(NUM_TRAIN, None))):
            path = os.path.join(workdir, 'data', f'mnist{name}-{part}.npz')
            if not os.path.exists(path):
                np.savez(path, x=x[rows], y=y[rows])
            out[f'{part}{name}'] = os.path.abspath(path)
            out[f'{part}{name}_x'], out[f'{part}{name}_y'] = x[rows], y[rows]
    # Ambient-laws: the first N training digits clean; the first N + M, of which the last M get sigma_n.
    for name, x in (('laws_clean_N', x8[:LAWS_N]), ('laws_clean_NM', x8[:LAWS_N + LAWS_M])):
        path = os.path.join(workdir, 'data', f'{name}.npz')
        if not os.path.exists(path):
            np.savez(path, x=x, y=y[:len(x)])
        out[name] = os.path.abspath(path)
    path = os.path.join(workdir, 'data', 'laws_sigmas.npy')
    np.save(path, np.r_[np.zeros(LAWS_N), np.full(LAWS_M, LAWS_SIGMA)].astype(np.float32))
    out['laws_sigmas'] = os.path.abspath(path)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Running one command and one run


def run_command(argv, log_path, cwd):
    """Runs argv niced with one thread; returns (return code, CPU seconds of the child, wall seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    start = time.time()
    with open(log_path, 'a') as log:
        log.write('$ ' + ' '.join(shlex.quote(a) for a in argv) + '\n')
        log.flush()
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=lambda: os.nice(10))
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime, time.time() - start


def newest_snapshot(folder):
    paths = glob.glob(os.path.join(folder, '**', 'network-snapshot*.pt'), recursive=True)
    if not paths:
        raise RuntimeError(f'no network snapshot under {folder}')
    return max(paths, key=os.path.getmtime)


def execute(run, args, data, lock):
    """Trains, samples and measures one run; writes and returns its result.json."""
    folder = os.path.join(args.workdir, run['paper'], run['name'])
    result_path = os.path.join(folder, 'result.json')
    if os.path.exists(result_path) and not args.force:
        with open(result_path) as file:
            return json.load(file)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, 'log.txt')
    python = [sys.executable, os.path.join(args.scripts, run['script'])]
    result = dict(run, commands=[], scripts=os.path.abspath(args.scripts))
    train_dir = os.path.join(folder, 'train')
    argv = python + run['train'] + [f'--outdir={train_dir}', '--device=cpu']
    code, cpu, wall = run_command(argv, log_path, ROOT)
    result['commands'].append(dict(argv=argv[1:], cpu_s=cpu, wall_s=wall, rc=code))
    if code != 0:
        raise RuntimeError(f'{run["name"]}: training failed (exit {code}), see {log_path}')
    network = newest_snapshot(train_dir)
    folders = {}
    for name, sample_args in run['samples']:
        out = os.path.join(folder, name)
        if sample_args[0] == 'exposure':
            argv = python + sample_args + [f'--network={network}', '--device=cpu']
        else:
            argv = python + sample_args + [f'--network={network}', f'--outdir={out}', '--device=cpu']
        before = os.path.getsize(log_path)
        code, cpu, wall = run_command(argv, log_path, ROOT)
        result['commands'].append(dict(argv=argv[1:], cpu_s=cpu, wall_s=wall, rc=code))
        if code != 0:
            raise RuntimeError(f'{run["name"]}: {sample_args[0]} failed (exit {code}), see {log_path}')
        with open(log_path) as file:
            file.seek(before)
            folders[name] = out if sample_args[0] != 'exposure' else file.read()
    result['train_cpu_s'] = result['commands'][0]['cpu_s']
    result['metrics'] = PAPERS[run['paper']][1](run, folders, data)
    with open(result_path + '.tmp', 'w') as file:
        json.dump(result, file, indent=1)
    os.replace(result_path + '.tmp', result_path)
    with lock:
        print(f'{run["paper"]}/{run["name"]}: train {result["train_cpu_s"]:.0f} s CPU, '
              + ', '.join(f'{k} {v:.4g}' for k, v in result['metrics'].items() if isinstance(v, float)), flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    parser.add_argument('--papers', default=','.join(PAPERS), help='comma list of ' + ', '.join(PAPERS))
    parser.add_argument('--seeds', type=int, default=3, help='training seeds 0..N-1 per configuration')
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time (each one thread)')
    parser.add_argument('--scripts', default=ROOT, help='folder holding the paper scripts (default: this checkout)')
    parser.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'evidence'), help='runs and results')
    parser.add_argument('--docs', default=os.path.join(ROOT, 'docs'), help='evidence.md and evidence/ go here')
    parser.add_argument('--force', action='store_true', help='redo runs that have a result.json')
    parser.add_argument('--compare_workdir', default='', help='also tabulate the runs this other workdir holds')
    parser.add_argument('--only', default='', help='comma list of run names (e.g. clean-s0,ci-ambient-s0) to run')
    parser.add_argument('--report_only', action='store_true', help='only rewrite docs/evidence.md and the figures')
    parser.add_argument('--smoke', action='store_true', help='check the plumbing: 0.2 kimg, 100 samples (not evidence)')
    args = parser.parse_args(argv)
    papers = [p for p in args.papers.split(',') if p]
    unknown = [p for p in papers if p not in PAPERS]
    if unknown:
        parser.error(f'unknown paper {unknown[0]!r}; choose from {", ".join(PAPERS)}')
    data = prepare_data(args.workdir)
    runs = [run for paper in papers for run in PAPERS[paper][0](data, list(range(args.seeds)))]
    # Seed 0 of every paper first, so that a stopped study still covers all papers; the last seed of Ambient
    # Diffusion (whose differences are far outside seed noise) goes last.
    runs.sort(key=lambda run: (run['seed'], run['paper'] == 'ambient' and run['seed'] == max(args.seeds - 1, 1)))
    if args.only:
        runs = [run for run in runs if run['name'] in args.only.split(',')]
    if args.smoke:  # shorter runs into the same folders: use another --workdir and --docs
        shorten = lambda a: re.sub(r'^--kimg=.*', '--kimg=0.2', re.sub(r'^--seeds=0-\d+', '--seeds=0-99', a))  # noqa
        for run in runs:
            run['train'] = [shorten(a) for a in run['train']]
            run['samples'] = [(k, [shorten(a) for a in v]) for k, v in run['samples']]
    if not args.report_only:
        lock = threading.Lock()
        start = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(execute, run, args, data, lock) for run in runs]
            for future in futures:
                future.result()
        print(f'all runs done in {time.time() - start:.0f} s wall', flush=True)
    report.write(args, papers, runs, data, REPORTS)


if __name__ == '__main__':
    main()
