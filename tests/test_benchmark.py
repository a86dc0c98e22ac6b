"""tests/benchmark.py stays working: its CPU quick mode runs every row, and its FLOP count for the MFU is right.

The official implementations are not part of CI, so the side-by-side columns are not exercised here."""
import json
import math
import os
import subprocess
import sys

import pytest

import nets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ['ambient train', 'ambient sample', 'ambient_laws train', 'EDM Heun sample', 'ambient_laws train +consistency',
        'ddpm_ip train', 'ADM sample', 'DiT train', 'DiT sample', 'fid.py features fp32', 'fid.py features tf32']


@pytest.mark.parametrize('arch, paper_gflops', [('DiT-S/2', 6.06), ('DiT-B/4', 5.56), ('DiT-S/8', 0.36)])
def test_dit_flops_match_the_paper(arch, paper_gflops):
    """DiT's Table 4 counts multiply-adds of one 256x256 image (32x32x4 latents); we count 2 FLOPs per multiply-add."""
    net = nets.DiT_models[arch](input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                                class_dropout_prob=0.1)
    patch = net.x_embedder.proj.stride[0]
    assert benchmark.dit_forward_flops(net, (32 // patch) ** 2) / 2e9 == pytest.approx(paper_gflops, abs=0.006)


def test_quick_mode_writes_every_row(tmp_path):
    path = tmp_path / 'bench.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, 'tests/benchmark.py', '--quick', f'--json={path}', '--peak_tflops=1'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report['gpu'] == 'cpu' and report['torch'] and report['date'] and '--quick' in report['command']
    assert [r['name'] for r in report['rows']] == ROWS
    for r in report['rows']:
        assert r['batch'] >= 1 and r['config']
        assert math.isfinite(r['ours']) and r['ours'] > 0, r
        assert r['theirs'] is None and r['ratio'] is None  # no --official
        assert r['name'] in result.stdout  # the printed table has the row
    # The MFU of the DiT row follows from its img/s and the FLOPs of a training step (3 x forward).
    dit = next(r for r in report['rows'] if r['name'] == 'DiT train')
    assert 0 < dit['mfu_ours'] < 1
    assert all(r['mfu_ours'] is None for r in report['rows'] if r['name'] != 'DiT train')
    # The README table from that report: a header, a rule, one line per row with its numbers.
    table = benchmark.readme_table([report]).splitlines()
    assert len(table) == 2 + len(ROWS) and table[0].startswith('| GPU | torch | date | row |')
    for line, r in zip(table[2:], report['rows']):
        cells = [c.strip() for c in line.strip('|').split('|')]
        assert cells[:4] == ['cpu', report['torch'], report['date'][:10], r['name']]
        assert cells[6] == f'{r["ours"]:.1f}' and cells[7] == '-'


@pytest.mark.parametrize('flags', [['--only=nothing'], ['--batch=dit=zero'], ['--official=/no/such/folder']])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(flags)
    assert exit_info.value.code == 2 and 'error:' in capsys.readouterr().err
