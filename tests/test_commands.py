"""Every documented command runs (issue 22; CONTRACT.md: "Every command in README.md, docs/*.md and the scripts'
docstrings is run by a test").

Collected: each line that starts with `python `, `python3 `, `torchrun ` or `NAME=VALUE ... python` inside a ``` block
of README.md or docs/*.md, or on an indented line of the four paper scripts' module docstrings; backslash
continuations are joined and a trailing `# comment` dropped. `pip` lines are not commands of ours and are skipped.
A `torchrun` line runs its script part in this process (one process; the flags are the same either way).

How each command runs (in this process, in a temporary folder shared by the commands of one file, in file order, so
that a recipe's later lines read what its earlier lines wrote; nothing may open a network connection):
- training at scale (any data but the embedded tiny set): `--dry_run` appended. It must succeed and write nothing.
  test_dry_run_prints_the_network checks, once per script, that a dry run shows the network and its size.
- training on the embedded tiny set (`tests/data/...`): end to end with `--kimg=0.008 --grid=4`. Its snapshot then
  stands in for `NET.pt` in that script's later commands.
- generate / eval / sample / neighbors / walk / exposure and `fid.py ref|calc`: end to end with tiny sizes
  (`--seeds=0-9`, `--num=10`, 4 sampling steps). Inputs that do not exist in the folder (a placeholder `NET.pt`, a
  released model, a URL, the word `cifar10`, `imagenet/val`) are replaced by tiny ones: a snapshot of a tiny training
  run of the same script, 10 labelled CIFAR-10 images (also as PNGs and as an ADM-style `arr_0` batch), reference
  statistics (tagged with the protocol the command names; untagged, like EDM's published files, when it names
  none), and a random-weights Inception (FID_WEIGHTS). Files an earlier line of the same recipe wrote are used as
  they are, so a recipe whose defaults disagree (a reference made under one protocol, evaluated under another) fails.
- PARSE_ONLY commands (a released checkpoint's own architecture flags): the flags must parse.
- `python -c CODE`: compiled; every attribute it takes from a repository module must exist.
- other scripts (tests/benchmark.py, tests/bench_fid.py): their argument parser must accept the flags.
A repeated dry run or quick start (the same flags in another file) runs once.

A command that no longer works fails with its file and line. KNOWN_FAILURES lists the ones that fail today, with the
reason; empty it as they are fixed.
"""

import argparse
import ast
import contextlib
import dataclasses
import glob
import importlib
import io
import os
import re
import shlex
import signal
import socket
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('ambient.py', 'ambient_laws.py', 'ddpm_ip.py', 'ldm_labelnoise.py')
TINY_DATA = os.path.join(ROOT, 'tests', 'data', 'cifar10_tiny.npz')
pytestmark = pytest.mark.filterwarnings('ignore:FID from:UserWarning')  # 10 images: rank-deficient, as expected
TIMEOUT_S = 60  # per command
NUM = 10        # images generated or evaluated end to end (an Inception Score needs 10)

# (file, a piece of the command's text) -> why it fails today. The coordinator empties this list.
KNOWN_FAILURES = {
}


# ---------------------------------------------------------------------------------------------------------------------
# Collection.

@dataclasses.dataclass
class Command:
    file: str    # relative to the repository root
    line: int    # 1-based line of the command's first line
    text: str    # continuations joined, trailing comment dropped

    @property
    def id(self):
        return f'{self.file}:{self.line}'


COMMAND_START = re.compile(r'^((\w+=\S*\s+)*(python3?|torchrun)\s)')


def _commands_in_lines(lines, file, first_line, inside):
    """Commands among `lines` (numbered from first_line); inside(i) says whether line i may hold one."""
    commands, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if inside(i) and COMMAND_START.match(stripped):
            start, text = i, stripped
            while text.endswith('\\') and i + 1 < len(lines):  # (a non-raw docstring may show it doubled)
                i += 1
                text = text.rstrip('\\').rstrip() + ' ' + lines[i].strip()
            words = shlex.split(text, comments=True)
            commands.append(Command(file, first_line + start, shlex.join(words)))
        i += 1
    return commands


def read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def markdown_commands(path):
    lines = read(path).splitlines()
    fenced, in_block = set(), False
    for i, line in enumerate(lines):
        if line.lstrip().startswith('```'):
            in_block = not in_block
        elif in_block:
            fenced.add(i)
    return _commands_in_lines(lines, os.path.relpath(path, ROOT), 1, lambda i: i in fenced)


def docstring_commands(path):
    source = read(path)
    node = ast.parse(source).body[0]
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
        return []
    # The source lines of the docstring (not its value: a backslash continuation must stay visible as in the file).
    lines = source.splitlines()[node.lineno - 1:node.end_lineno]
    return _commands_in_lines(lines, os.path.basename(path), node.lineno,
                              lambda i: lines[i].startswith((' ', '\t')))


def collect():
    files = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
    commands = [c for path in files if os.path.exists(path) for c in markdown_commands(path)]
    commands += [c for script in SCRIPTS for c in docstring_commands(os.path.join(ROOT, script))]
    return commands


COMMANDS = collect()


def _param(command):
    reasons = [why for (file, piece), why in KNOWN_FAILURES.items() if file == command.file and piece in command.text]
    marks = [pytest.mark.xfail(reason=reasons[0], strict=False)] if reasons else []
    return pytest.param(command, id=command.id, marks=marks)


def test_known_failures_and_parse_only_entries_match_a_command():
    # An entry that matches no command any more is stale: remove it.
    texts = [(c.file, c.text) for c in COMMANDS]
    stale = [key for key in KNOWN_FAILURES if not any(f == key[0] and key[1] in t for f, t in texts)]
    stale += [key for key in PARSE_ONLY if not any(key[0] in t and key[1] in t for _, t in texts)]
    assert not stale, stale


def test_commands_were_found():
    # Each paper script documents commands in its docstring, and the README holds a quick start per paper.
    files = {c.file for c in COMMANDS}
    assert set(SCRIPTS) <= files and 'README.md' in files, files
    readme = [c.text for c in COMMANDS if c.file == 'README.md']
    for script in SCRIPTS:
        assert any(script in text for text in readme), f'README.md has no command for {script}'


# ---------------------------------------------------------------------------------------------------------------------
# Parsing a command line into what to run.

VALUE_FLAGS = {  # flags that take a value, for the `--flag value` spelling
    '--network', '--model_path', '--pretrained_model_name_or_path', '--model_list', '--transfer', '--resume',
    '--seeds', '--num', '--num_samples', '--n_samples', '--kimg', '--outdir', '--output_dir', '--dest', '--data',
    '--data_dir', '--ref', '--ref_stats', '--images', '--gen_path', '--input_dir', '--batch', '--batch_size',
    '--ddim_steps', '--steps', '--timestep_respacing', '--walk_steps', '--features', '--classes', '--json',
    '--protocol', '--forward_t', '--preset', '--fid_weights', '--grid', '--vae',
}
SUBCOMMANDS = {'train', 'generate', 'eval', 'sample', 'neighbors', 'walk', 'exposure', 'ref', 'calc'}


def split_command(text):
    """(env, script, args) for a `python X.py ...` / `torchrun ... X.py ...` line; script '-c' for `python -c`."""
    words = shlex.split(text)
    env = {}
    while words and re.match(r'^\w+=', words[0]):
        name, _, value = words.pop(0).partition('=')
        env[name] = value
    launcher = words.pop(0)
    if launcher == 'torchrun':  # skip the launcher's own options (and the `--` that ends them)
        while words and not words[0].endswith('.py'):
            words.pop(0)
    if words and words[0] == '-c':
        return env, '-c', words[1:]
    return env, words[0], words[1:]


def get_flag(args, name):
    """The value of --name in args (`--name=v` or `--name v`), or None."""
    for k, word in enumerate(args):
        if word.startswith(name + '='):
            return word.split('=', 1)[1]
        if word == name and k + 1 < len(args) and name in VALUE_FLAGS:
            return args[k + 1]
    return None


def set_flag(args, name, value):
    """args with --name set to value (replacing either spelling, or appended); value None removes the flag."""
    out, k, found = [], 0, False
    while k < len(args):
        word = args[k]
        if word.startswith(name + '=') or word == name:
            skip = 2 if word == name and name in VALUE_FLAGS else 1
            if value is not None and not found:
                out.append(f'{name}={value}')
            found = True
            k += skip
            continue
        out.append(word)
        k += 1
    if not found and value is not None:
        out.append(f'{name}={value}')
    return out


def command_word(script, args):
    """The sub-command of a paper script's argument list (train when none is given)."""
    if args and args[0] in SUBCOMMANDS:
        return args[0]
    if script == 'ddpm_ip.py' and (get_flag(args, '--model_path') is not None or '--num_samples' in ' '.join(args)):
        return 'sample'  # image_sample.py's flags select `sample`
    return 'train'


# ---------------------------------------------------------------------------------------------------------------------
# Running a command in this process.

class CommandTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def alarm(signum, frame):
        raise CommandTimeout(f'took longer than {seconds} s')
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Documented commands run offline here: any connection attempt fails the command (with its own one line)."""
    def refuse(*args, **kwargs):
        raise OSError('test_commands: a documented command tried to open a network connection')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


def run_main(module_name, argv, cwd):
    """Run module.main(argv) in cwd; returns (exit code, stdout, stderr)."""
    module = importlib.import_module(module_name)
    out, err = io.StringIO(), io.StringIO()
    old_cwd = os.getcwd()
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(TIMEOUT_S):
            try:
                result = module.main(argv)
                code = result if isinstance(result, int) else 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(old_cwd)
    return code, out.getvalue(), err.getvalue()


def parses(script_path, args):
    """Whether the argparse parser of a helper script accepts args (its work is never started)."""
    class Parsed(Exception):
        pass

    def stop(self, args=None, namespace=None):
        result = original(self, args, namespace)
        raise Parsed(result)
    original = argparse.ArgumentParser.parse_known_args
    name = os.path.splitext(os.path.basename(script_path))[0]
    sys.path.insert(0, os.path.dirname(script_path))
    argparse.ArgumentParser.parse_known_args = stop
    err = io.StringIO()
    try:
        module = importlib.import_module(name)
        old_argv = sys.argv
        sys.argv = [script_path, *args]
        try:
            with contextlib.redirect_stderr(err):
                module.main(args) if 'argv' in module.main.__code__.co_varnames else module.main()
        except Parsed as parsed:
            namespace, extra = parsed.args[0]
            return not extra, extra
        except SystemExit:
            return False, err.getvalue()
        finally:
            sys.argv = old_argv
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.path.remove(os.path.dirname(script_path))
    return False, 'the parser was never called'


# ---------------------------------------------------------------------------------------------------------------------
# Tiny stand-ins for inputs that cannot exist here.

STEPS_FLAG = {'ambient.py': '--steps', 'ambient_laws.py': '--steps', 'ddpm_ip.py': '--timestep_respacing',
              'ldm_labelnoise.py': '--ddim_steps'}   # sampling steps, set to 4 end to end
TINY_TRAIN = {  # a few steps of the tiny preset: enough for a snapshot
    'ambient.py': ['--preset=tiny', '--corruption_probability=0.6', '--kimg=0.008', '--grid=4'],
    'ambient_laws.py': ['--preset=tiny', '--sigma=0.2', '--corruption_probability=0.9', '--kimg=0.008', '--grid=4'],
    'ddpm_ip.py': ['--preset=tiny', '--kimg=0.008', '--grid=4'],
    'ldm_labelnoise.py': ['--preset=tiny', '--kimg=0.008', '--grid=4'],
}


class StandIns:
    def __init__(self, folder):
        self.folder = folder
        self._snapshots = {}
        self._refs = {}
        import torch
        import fid
        self.torch, self.fid = torch, fid
        data = np.load(TINY_DATA)
        first = [int(np.flatnonzero(data['y'] == c)[0]) for c in range(10)]
        self.images = data['x'][first]  # 10 images (the fewest an Inception Score takes), one of each class
        self.labels = data['y'][first]
        self.data = os.path.join(folder, 'tiny10.npz')
        np.savez(self.data, x=self.images, y=self.labels)
        self.weights = os.path.join(folder, 'inception.pth')
        torch.manual_seed(0)
        torch.save(fid.InceptionV3().state_dict(), self.weights)
        self.pngs = os.path.join(folder, 'pngs')
        os.makedirs(self.pngs)
        import PIL.Image
        for k, image in enumerate(self.images):
            PIL.Image.fromarray(image).save(os.path.join(self.pngs, f'{k:06d}.png'))
        self.npz_images = os.path.join(folder, 'samples.npz')
        np.savez(self.npz_images, arr_0=self.images)

    def snapshot(self, script):
        if script not in self._snapshots:
            outdir = os.path.join(self.folder, 'snapshot-' + script[:-3])
            argv = ['train', f'--data={TINY_DATA}', f'--outdir={outdir}', *TINY_TRAIN[script]]
            code, out, err = run_main(script[:-3], argv, self.folder)
            found = sorted(glob.glob(os.path.join(outdir, '*', 'network-snapshot-*.pt')))
            assert code == 0 and found, f'tiny training run of {script} failed: {err or out}'
            self._snapshots[script] = found[-1]
        return self._snapshots[script]

    def ref(self, protocol):
        """Reference statistics of the 10 images; tagged with protocol, or untagged (as EDM's published files)."""
        if protocol not in self._refs:
            fid, torch = self.fid, self.torch
            preprocess = {'edm': 'tf', 'adm': 'tf', None: 'tf'}.get(protocol, 'pytorch-fid')
            detector = fid.load_inception(self.weights, torch.device('cpu'))
            batch = torch.from_numpy(self.images).permute(0, 3, 1, 2)
            stats = fid.compute_stats([batch], detector, torch.device('cpu'), preprocess=preprocess, progress=False)
            path = os.path.join(self.folder, f'ref-{protocol or "untagged"}.npz')
            if protocol is None:
                stats = {k: v for k, v in stats.items() if k not in ('preprocess', 'protocol', 'n')}
            else:
                stats['protocol'] = protocol
            fid.save_ref(path, stats)
            self._refs[protocol] = path
        return self._refs[protocol]


@pytest.fixture(scope='session')
def stand_ins(tmp_path_factory):
    return StandIns(str(tmp_path_factory.mktemp('stand_ins')))


@pytest.fixture(scope='module')
def work_dirs(tmp_path_factory):
    """One working folder per documentation file, shared by its commands in file order."""
    dirs = {}

    def get(file):
        if file not in dirs:
            dirs[file] = str(tmp_path_factory.mktemp(re.sub(r'\W', '_', file)))
        return dirs[file]
    return get


def exists_in(cwd, value):
    return value is not None and '://' not in value and os.path.exists(os.path.join(cwd, value))


def tiny_args(script, command, args, cwd, stand_ins):
    """args of an end-to-end run with tiny sizes and stand-ins for the inputs that do not exist in cwd."""
    args, replaced_network = list(args), False
    for name in ('--network', '--model_path', '--pretrained_model_name_or_path', '--model_list'):
        value = get_flag(args, name)
        if value is not None and not all(exists_in(cwd, v) for v in value.split(',')):
            args = set_flag(args, name, ','.join(stand_ins.snapshot(script) for _ in value.split(',')))
            replaced_network = True
    for name in ('--data', '--data_dir'):
        value = get_flag(args, name)
        if value is not None and not exists_in(cwd, value) and not value.startswith('tests/'):
            args = set_flag(args, name, stand_ins.data)
    for name in ('--images', '--gen_path', '--input_dir'):
        value = get_flag(args, name)
        if value is not None and not exists_in(cwd, value):
            args = set_flag(args, name, stand_ins.npz_images if value.endswith('.npz') else stand_ins.pngs)
    for name in ('--ref', '--ref_stats'):
        value = get_flag(args, name)
        if value is not None and not exists_in(cwd, value):
            args = set_flag(args, name, stand_ins.ref(get_flag(args, '--protocol')))
    seeds = get_flag(args, '--seeds')
    if seeds is not None:
        args = set_flag(args, '--seeds', f'0-{NUM - 1}')
    if command in ('eval', 'calc'):  # at least as many as the stand-in images, and no more
        args = set_flag(args, '--num', str(NUM))
    limits = {'--num': NUM, '--num_samples': NUM, '--n_samples': 1, '--ddim_steps': 4, '--steps': 4, '--walk_steps': 3,
              '--timestep_respacing': 4}
    for name, limit in limits.items():
        value = get_flag(args, name)
        if value is not None and value.isdigit() and int(value) > limit:
            args = set_flag(args, name, str(limit))
    if command == 'walk':
        args = set_flag(args, '--n_samples', '1')
    if get_flag(args, '--forward_t') is not None:
        args = set_flag(args, '--forward_t', '3')
    if get_flag(args, '--classes') is not None:
        args = set_flag(args, '--classes', '0,1')
    if get_flag(args, '--vae') and replaced_network:   # the autoencoder of the released model it stood for
        args = set_flag(args, '--vae', None)
    if get_flag(args, '--features') == 'dinov2':  # DINOv2 weights are a download; Inception is the offline choice
        args = set_flag(args, '--features', 'inception')
    if command in ('generate', 'eval', 'sample', 'walk', 'neighbors') and any(
            get_flag(args, name) for name in ('--network', '--model_path', '--pretrained_model_name_or_path')):
        args = set_flag(args, STEPS_FLAG[script], str(min(4, int(get_flag(args, STEPS_FLAG[script]) or 4))))
    if command == 'train':
        args = set_flag(args, '--kimg', '0.008')
        args = set_flag(args, '--grid', '4')
        args = set_flag(args, '--outdir', os.path.join(cwd, 'runs-' + script[:-3]))
    return args


def is_tiny_run(args):
    """A training command on the embedded data (runs end to end) rather than at scale (dry run)."""
    data = get_flag(args, '--data') or get_flag(args, '--data_dir') or ''
    return data.startswith('tests/')


# ---------------------------------------------------------------------------------------------------------------------
# The tests.

# Commands that can only be checked for parsing here (script, a piece of the command) -> why.
PARSE_ONLY = {
    ('ddpm_ip.py', '--model_path'): "image_sample.py's network flags describe the released 57M-parameter checkpoint",
}


def check_python_code(code):
    tree = ast.parse(code)
    modules = {alias.asname or alias.name: alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            name = modules[node.value.id]
            if os.path.exists(os.path.join(ROOT, name + '.py')):
                module = importlib.import_module(name)
                assert hasattr(module, node.attr), f'{name}.{node.attr} does not exist'


class Parsed(BaseException):
    """Raised by the patched parser: the flags were accepted, and nothing else runs."""


def parse_only(module_name, args, monkeypatch):
    """Run module.main(args) up to the end of flag parsing (the shared parse_config, or the script's parse_args)."""
    module = importlib.import_module(module_name)
    name = next((n for n in ('parse_config', 'parse_args', 'parse_train_args') if hasattr(module, n)), None)
    assert name, f'{module_name} has no parse_config to check the flags with'
    original = getattr(module, name)

    def stop(*a, **k):
        raise Parsed(original(*a, **k))
    monkeypatch.setattr(module, name, stop)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main(args)
    except Parsed:
        return 0, ''
    except SystemExit as exit_:
        return exit_.code, err.getvalue() or out.getvalue()
    return 1, f'main returned without parsing its flags with {name}'


DONE = {}   # command text -> failure message ('' = passed), for repeated dry runs and quick starts


def dry_run(module, args, cwd):
    """Exit code, stdout and what a dry run wrote (it must write nothing)."""
    empty = os.path.join(cwd, 'dry-run')
    os.makedirs(empty, exist_ok=True)
    code, out, err = run_main(module, args + ['--dry_run'], empty)
    return code, out, err, os.listdir(empty)


@pytest.mark.parametrize('command', [_param(c) for c in COMMANDS])
def test_documented_command_runs(command, stand_ins, work_dirs, monkeypatch):
    where = f'{command.id}: {command.text}'
    env, script, args = split_command(command.text)
    if script == '-c':
        check_python_code(args[0])
        return
    assert os.path.exists(os.path.join(ROOT, script)), f'{where}\n{script} does not exist'
    if script not in SCRIPTS and script != 'fid.py':
        ok, detail = parses(os.path.join(ROOT, script), args)
        assert ok, f'{where}\nits parser refused: {detail}'
        return
    monkeypatch.setenv('FID_WEIGHTS', stand_ins.weights)
    for name in env:
        if name != 'OMP_NUM_THREADS':
            monkeypatch.setenv(name, env[name])
    cwd = work_dirs(command.file)
    module = script[:-3]
    verb = args[0] if script == 'fid.py' else command_word(script, args)
    tiny = is_tiny_run(args)
    args = [re.sub(r'^((--\w+=)?)(tests/)', lambda m: m.group(1) + ROOT + os.sep + m.group(3), a) for a in args]
    key = command.text.split(script, 1)[1].strip().replace(' -- ', ' ')
    for (name, piece), why in PARSE_ONLY.items():
        if name == script and piece in command.text:
            code, detail = parse_only(module, args, monkeypatch)
            assert code == 0, f'{where}\nits flags are refused (exit {code}): {detail.strip()}'
            return
    if verb == 'train' and not tiny:
        # At scale: a dry run, which neither writes nor downloads.
        if (script, key) not in DONE:
            code, out, err, written = dry_run(module, args, cwd)
            DONE[script, key] = (f'--dry_run failed (exit {code}): {err.strip() or out[-2000:]}' if code else
                                 f'--dry_run wrote {written}' if written else '')
        assert not DONE[script, key], f'{where}\n{DONE[script, key]}'
        return
    args = tiny_args(script, verb, args, cwd, stand_ins)
    key = tuple(sorted(a for a in args if not a.startswith('--outdir=')))
    if verb == 'train' and (script, key) in DONE:   # the same quick start in another file
        assert not DONE[script, key], f'{where}\n{DONE[script, key]}'
        return
    code, out, err = run_main(module, args, cwd)
    message = f'ran as {module}.main({args})\nexit {code}: {err.strip()[-3000:] or out[-3000:]}' if code else ''
    if verb == 'train':
        DONE[script, key] = message
        if not message:   # its snapshot stands in for NET.pt from now on
            found = sorted(glob.glob(os.path.join(get_flag(args, '--outdir'), '*', 'network-snapshot-*.pt')))
            if found:
                stand_ins._snapshots.setdefault(script, found[-1])
    assert not message, f'{where}\n{message}'


def first_dry_run_command(script):
    """The first at-scale training command documented for script (its doc, else its docstring)."""
    for c in COMMANDS:
        if c.file in (f'docs/{script[:-3]}.md', script):
            env, name, args = split_command(c.text)
            if name == script and command_word(script, args) == 'train' and not is_tiny_run(args) \
                    and not any(piece in c.text for (s, piece) in PARSE_ONLY if s == script):
                return c
    return None


@pytest.mark.parametrize('script', SCRIPTS)
def test_dry_run_prints_the_network(script, tmp_path):
    # Issue 22: `--dry_run` prints the resolved network (architecture, channel multipliers, parameter count), and
    # neither writes nor downloads anything.
    command = first_dry_run_command(script)
    assert command, f'no at-scale training command is documented for {script}'
    _, _, args = split_command(command.text)
    code, out, err, written = dry_run(script[:-3], args, str(tmp_path))
    assert code == 0 and not written, f'{command.id}: {command.text}\nexit {code}: {err.strip()}; wrote {written}'
    count = re.search(r'param\w*\W+(\d[\d,]{3,})|(\d[\d,]{3,})\s+param', out, re.I)
    assert count and 'arch' in out, \
        f'{command.id}: {command.text}\nno architecture and parameter count in:\n{out[:3000]}'
