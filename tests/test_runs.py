"""Runs side by side, interrupted and resumed (issue 23, items 5, 6, 10, 11, 12), through the
command line of each of the four paper scripts, on CPU and tiny sizes. One scenario per script:

1. two processes start at once in one --outdir and get two run folders (item 6);
2. while they run, `--resume=auto` with the same config picks the newest of them, which is locked,
   and refuses in one line naming the process that holds it (item 11);
3. SIGINT stops both at a step boundary: each saves a training state, prints one line and exits
   130 (item 10);
4. `--resume=auto` continues the newest run from that state (taking over the lock that a killed
   process left), with a separator in log.txt, and ends on the same weights as a run that was
   never interrupted (bitwise on CPU);
5. `--resume=auto` with another data set, or another method flag, starts a new folder and says
   why (item 5);
6. every run folder holds the same file names, in all four scripts (item 12).
And the plumbing block itself is the same text in all four scripts (issue 22)."""

import contextlib
import glob
import importlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, TINY_DATA

# Per script: flags of a tiny run (a step of 8 images is a tick, so every step prints a progress
# line; no snapshot during the run), and a flag of the method that changes the experiment.
SCRIPTS = {
    'ambient.py': dict(
        flags=['--preset=tiny', '--batch=8', '--tick=0.008', '--snap=1000', '--dump=1000',
               '--grid=4', '--steps=3', '--workers=1'],
        method='--delta_probability=0.2'),
    'ambient_laws.py': dict(
        flags=['--preset=tiny', '--cbase=16', '--batch=8', '--tick=0.008', '--snap=1000',
               '--dump=1000', '--grid=2', '--steps=3', '--workers=1', '--seed=0'],
        method='--sigma=0.1'),
    'ddpm_ip.py': dict(
        flags=['--preset=tiny', '--channel_mult=1,2', '--num_res_blocks=1',
               '--attention_resolutions=4', '--batch=8', '--tick=0.008', '--snap=1000', '--grid=2',
               '--grid_steps=5', '--seed=1'],
        method='--input_perturbation=0.2'),
    'ldm_labelnoise.py': dict(
        flags=['--preset=tiny', '--resolution=16', '--batch=8', '--tick=0.008', '--snap=1000',
               '--grid=4', '--ddim_steps=2', '--workers=1'],
        method='--corruption_ratio=0.1'),
}
BATCH = 8
# The files of every run folder (CONTRACT.md); <kimg> stands for the kimg tag of a file name.
RUN_FILES = {'config.json', 'log.txt', 'stats.jsonl', 'source.py', 'data-preview.png',
             'training-state-<kimg>.pt'}
FINISHED_RUN_FILES = RUN_FILES | {'network-snapshot-<kimg>.pt'}
# Also allowed: the sample grids, ambient's official training_options.json, and ldm_labelnoise's
# conditions.npz (the corrupted labels, drawn once per run and reused when it is resumed).
OPTIONAL_FILES = {'samples-<kimg>.png', 'training_options.json', 'conditions.npz'}
BLOCK = re.compile(r'^# ==== BEGIN canonical block (v\d+).*?^# ==== END canonical block \1',
                   re.M | re.S)


def call(module, argv):
    """module.main(argv) in this process -> (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main([str(arg) for arg in argv])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    return code, out.getvalue(), err.getvalue()


def start(path, argv):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, path, *map(str, argv)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_progress(process, seen, timeout=240):
    """Reads the process's stdout into `seen` until its first progress line ('kimg ...')."""
    done = threading.Event()

    def read():
        for line in process.stdout:
            seen.append(line)
            if line.startswith('kimg '):
                done.set()
                return
        done.set()
    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout), f'no progress line after {timeout} s: {"".join(seen)}'
    assert process.poll() is None, f'exited early ({process.returncode}): {"".join(seen)}'


def names(run_dir):
    """The file names of a run folder, with kimg tags as <kimg>."""
    return {re.sub(r'-\d+(\.\d+)?((-ema[\d.]+)?\.(pt|png))$', r'-<kimg>\2', name)
            for name in os.listdir(run_dir)}


def weights(run_dir):
    """(cur_nimg, {name: tensor}) of the network in a run folder's latest training state."""
    states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')),
                    key=lambda path: float(re.search(r'-([\d.]+)\.pt$', path)[1]))
    state = torch.load(states[-1], map_location='cpu', weights_only=True)
    net = next(state[key] for key in ('net', 'model') if key in state)
    return state['cur_nimg'], net


class Scenario:
    """The steps 1-5 of the module docstring for one script, run once; the tests check them."""

    def __init__(self, script, tmp, module=None, path=None):
        spec = SCRIPTS.get(script, {})
        self.module = module or importlib.import_module(script[:-3])
        self.path = path or os.path.join(ROOT, script)
        self.flags = [f'--data={TINY_DATA}', *spec.get('flags', ()),]
        self.method = spec.get('method', '')
        self.outdir = os.path.join(tmp, 'runs')

        # 1-3: two processes, a refusal while they run, SIGINT.
        argv = ['train', *self.flags, f'--outdir={self.outdir}', '--kimg=50']
        self.processes = [start(self.path, argv) for _ in range(2)]
        self.early = [[], []]
        try:
            for process, seen in zip(self.processes, self.early):
                wait_for_progress(process, seen)
            self.locked = call(self.module, [*argv, '--resume=auto'])
        finally:
            for process in self.processes:
                process.send_signal(signal.SIGINT)
            self.results = [process.communicate(timeout=240) for process in self.processes]
        self.run_dirs = sorted(glob.glob(os.path.join(self.outdir, '*')))
        self.locks_left = [d for d in self.run_dirs if os.path.exists(os.path.join(d, 'run.lock'))]

        # 4: continue the newest run two steps further, and run the same from the start. Its lock
        # is left as a kill -9 leaves it (the pid of an ended process): the resume takes it over.
        dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], text=True,
                              capture_output=True).stdout.strip()
        self.dead_lock = f'{dead} {socket.gethostname()}\n'
        with open(os.path.join(self.run_dirs[-1], 'run.lock'), 'w') as file:
            file.write(self.dead_lock)
        stopped_nimg = weights(self.run_dirs[-1])[0] if len(self.run_dirs) == 2 else 0
        self.total_kimg = (stopped_nimg + 2 * BATCH) / 1000
        length = f'--kimg={self.total_kimg:g}'
        self.resumed = call(self.module, ['train', *self.flags, f'--outdir={self.outdir}', length,
                                          '--resume=auto'])
        straight_dir = os.path.join(tmp, 'straight')
        self.straight = call(self.module, ['train', *self.flags, f'--outdir={straight_dir}',
                                           length])
        self.straight_dir = sorted(glob.glob(os.path.join(straight_dir, '*')))[-1]

        # 5: another data set (the same images under another name), another method flag.
        other_data = os.path.join(tmp, 'other.npz')
        shutil.copy(TINY_DATA, other_data)
        self.other = {}
        for case, extra in (('data', [f'--data={other_data}']), ('method', [self.method])):
            before = set(os.listdir(self.outdir))
            result = call(self.module, ['train', *self.flags, *extra, f'--outdir={self.outdir}',
                                        f'--kimg={BATCH / 1000:g}', '--resume=auto'])
            self.other[case] = result, sorted(set(os.listdir(self.outdir)) - before)


@pytest.fixture(scope='module', params=list(SCRIPTS))
def scenario(request, tmp_path_factory):
    return Scenario(request.param, str(tmp_path_factory.mktemp(request.param[:-3])))


def test_two_processes_get_two_folders(scenario):
    assert len(scenario.run_dirs) == 2, scenario.run_dirs
    for run_dir in scenario.run_dirs:
        assert os.path.isfile(os.path.join(run_dir, 'config.json'))
        assert os.path.isfile(os.path.join(run_dir, 'log.txt'))


def test_locked_run_is_refused_in_one_line(scenario):
    code, out, err = scenario.locked
    pids = '|'.join(str(process.pid) for process in scenario.processes)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'{os.path.basename(scenario.path)}: error: ')
    assert re.search(rf'in use by process ({pids}) ', lines[0]), lines[0]


def test_sigint_saves_a_state_and_exits_with_one_line(scenario):
    for process, (out, err) in zip(scenario.processes, scenario.results):
        assert process.returncode == 130, (out, err)
        last = out.strip().splitlines()[-1]
        assert re.fullmatch(r'stopped by SIGINT at kimg [\d.]+: state saved to \S+'
                            r'training-state-[\d.]+\.pt; continue with --resume=auto', last), last
        assert 'Traceback' not in err, err
    for run_dir in scenario.run_dirs:
        assert glob.glob(os.path.join(run_dir, 'training-state-*.pt'))
    assert not scenario.locks_left  # released on the way out


def test_resume_auto_continues_the_state_bitwise(scenario):
    code, out, err = scenario.resumed
    assert code == 0, (out, err)
    run_dir = scenario.run_dirs[-1]
    assert not os.path.exists(os.path.join(run_dir, 'run.lock'))  # the dead one's, taken over
    assert f'continuing {run_dir}' in out, out
    assert re.fullmatch(r'done: [\d.]+ kimg in \S+', out.strip().splitlines()[-1])
    with open(os.path.join(run_dir, 'log.txt')) as file:
        log = file.read().splitlines()
    stopped = [i for i, line in enumerate(log) if line.startswith('stopped by SIGINT')]
    separator = [i for i, line in enumerate(log) if re.fullmatch(
        r'---- resumed from training-state-[\d.]+\.pt at kimg [\d.]+ ----', line)]
    assert stopped and separator and stopped[0] < separator[0], log
    # The same weights as a run that was never stopped.
    assert scenario.straight[0] == 0, scenario.straight
    resumed_nimg, resumed = weights(run_dir)
    straight_nimg, straight = weights(scenario.straight_dir)
    assert resumed_nimg == straight_nimg == round(scenario.total_kimg * 1000)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


@pytest.mark.parametrize('case', ['data', 'method'])
def test_resume_auto_starts_a_new_folder_when_the_config_differs(scenario, case):
    (code, out, err), new = scenario.other[case]
    assert code == 0, (out, err)
    assert len(new) == 1, new  # a new folder, none continued
    flag = '--data=' if case == 'data' else scenario.method.split('=')[0] + '='
    reason = [line for line in out.splitlines() if 'nothing to continue' in line]
    assert reason and flag in reason[0], out


def test_run_folders_hold_the_same_files(scenario):
    for run_dir in scenario.run_dirs:  # stopped runs
        assert RUN_FILES <= names(run_dir) <= FINISHED_RUN_FILES | OPTIONAL_FILES, names(run_dir)
    finished = [scenario.run_dirs[-1], scenario.straight_dir]
    finished += [os.path.join(scenario.outdir, new[0]) for _, new in scenario.other.values()]
    for run_dir in finished:
        assert FINISHED_RUN_FILES <= names(run_dir) <= FINISHED_RUN_FILES | OPTIONAL_FILES, \
            names(run_dir)


def plumbing_block(script):
    """(version, text) of the canonical plumbing block pasted in a script, or (None, None)."""
    with open(os.path.join(ROOT, script)) as file:
        match = BLOCK.search(file.read())
    return (match[1], match[0]) if match else (None, None)


def test_the_plumbing_block_is_the_same_text_in_all_four():
    blocks = {script: plumbing_block(script) for script in SCRIPTS}
    first = blocks['ambient.py']
    assert first[1] and all(block == first for block in blocks.values()), \
        [script for script, block in blocks.items() if block != first]
