"""Rewrites the measured parts of docs/evidence.md (between <!-- evidence:NAME --> and <!-- /evidence:NAME -->
markers) and the figures under docs/evidence/ from the result.json files of experiments/run_all.py."""

import json
import os
import re

import numpy as np

import metrics
import plots


def load_results(args, runs):
    """result.json of every run that finished, keyed by (paper, group, seed)."""
    out = {}
    for run in runs:
        path = os.path.join(args.workdir, run['paper'], run['name'], 'result.json')
        if os.path.exists(path):
            with open(path) as file:
                out[run['paper'], run['group'], run['seed']] = json.load(file)
    return out


def values(results, paper, group, key):
    return [r['metrics'][key] for (p, g, _), r in sorted(results.items()) if p == paper and g == group
            and key in r['metrics']]


def mean_std(xs, digits=2):
    """'m ± s (n)' over seeds; std with ddof=1."""
    if not xs:
        return 'not run'
    if len(xs) == 1:
        return f'{xs[0]:.{digits}f} (1 seed)'
    return f'{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1):.{digits}f}'


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def cpu_column(results, paper, group):
    cpu = [r['train_cpu_s'] for (p, g, _), r in results.items() if p == paper and g == group]
    return f'{np.mean(cpu):.0f}' if cpu else '-'


def replace_block(text, name, body):
    """Replaces the text between the markers of block `name` (adds the block at the end when missing)."""
    start, end = f'<!-- evidence:{name} -->', f'<!-- /evidence:{name} -->'
    block = f'{start}\n{body.strip()}\n{end}'
    pattern = re.compile(re.escape(start) + '.*?' + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip('\n') + '\n\n' + block + '\n'


def save_png(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, optimize=True)


def sample_panel(result, name='samples', count=64, columns=8):
    folder = os.path.join(os.path.dirname(result['_path']), name)
    images = metrics.read_pngs(folder)[:count]
    return plots.grid(images[..., 0], columns=columns, scale=3)


def runs_listing(results):
    """Every run made: name, seed, CPU seconds of training and of sampling."""
    rows = []
    for (paper, group, seed), r in sorted(results.items()):
        sample_cpu = sum(c['cpu_s'] for c in r['commands'][1:])
        rows.append((paper, group, seed, f'{r["train_cpu_s"]:.0f}', f'{sample_cpu:.0f}',
                     ', '.join(f'{k} {v:.4g}' for k, v in r['metrics'].items() if isinstance(v, float))))
    return table(('paper', 'configuration', 'seed', 'train CPU s', 'sampling CPU s', 'metrics'), rows)


def verification(args, runs, results):
    """The runs that --compare_workdir also holds (the same commands on other scripts): their metrics side by side."""
    rows = []
    for run in runs:
        other = os.path.join(args.compare_workdir, run['paper'], run['name'], 'result.json')
        key = (run['paper'], run['group'], run['seed'])
        if key in results and os.path.exists(other):
            with open(other) as file:
                theirs = json.load(file)
            ours = results[key]
            same = all(abs(ours['metrics'][k] - v) <= 1e-9 * max(1, abs(v)) for k, v in theirs['metrics'].items()
                       if isinstance(v, float) and not np.isnan(v))
            shown = [k for k in ('fd', 'fd_100', 'class_fd') if k in ours['metrics']][:1]
            rows.append((run['paper'], run['name'], *(f"{ours['metrics'][k]:.4f}" for k in shown),
                         *(f"{theirs['metrics'][k]:.4f}" for k in shown),
                         'identical' if same else 'DIFFERENT'))
    return table(('paper', 'run', 'FD (final runs)', 'FD (integrated scripts)', 'all metrics'), rows)


def write(args, papers, runs, data, reports):
    results = load_results(args, runs)
    for run in runs:
        key = (run['paper'], run['group'], run['seed'])
        if key in results:
            results[key]['_path'] = os.path.join(args.workdir, run['paper'], run['name'], 'result.json')
    path = os.path.join(args.docs, 'evidence.md')
    text = open(path).read() if os.path.exists(path) else '# Evidence\n'
    figures = os.path.join(args.docs, 'evidence')
    for paper in papers:
        blocks = reports[paper](results, data, figures)
        for name, body in blocks.items():
            text = replace_block(text, name, body)
    text = replace_block(text, 'runs', runs_listing(results))
    if getattr(args, 'compare_workdir', ''):
        text = replace_block(text, 'verification', verification(args, runs, results))
    with open(path + '.tmp', 'w') as file:
        file.write(text)
    os.replace(path + '.tmp', path)
    print(f'wrote {path} and {figures}/', flush=True)
