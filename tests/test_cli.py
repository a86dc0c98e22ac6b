"""The four paper scripts speak one command-line language (docs/overview.md "What every script offers"): the same
top-level help layout, help pages of the same width and metavar style, flags grouped under the same titles in the same
order, every default shown, one-line errors with the same exit code, and no prefix matching of flag names. CPU only;
each script runs in a child process."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    'ambient.py': ('train', 'generate', 'eval', 'neighbors'),
    'ambient_laws.py': ('train', 'generate', 'eval'),
    'ddpm_ip.py': ('train', 'sample', 'generate', 'eval', 'exposure'),
    'ldm_labelnoise.py': ('train', 'generate', 'eval', 'walk'),
}
GROUPS = ('data and corruption', 'network', 'optimisation', 'run', 'sampling', 'evaluation')


def run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


def flag_entries(text):
    """(group title, flag line, help text) for every option of an argparse help page."""
    entries, group, current = [], None, None
    for line in text.splitlines():
        # A group title is an unindented line ending in ':'; a flag line starts with two spaces and a dash, its help
        # either follows on the same line after two spaces or continues on deeper-indented lines.
        if line and not line.startswith(' ') and line.endswith(':'):
            group, current = line[:-1], None
        elif line.startswith('  -') and group is not None:
            current = [group, line.strip(), '']
            entries.append(current)
            head, _, rest = line.strip().partition('  ')
            current[1], current[2] = head, rest.strip()
        elif current is not None and line.startswith('    '):
            current[2] += ' ' + line.strip()
    return entries


@pytest.mark.parametrize('script', SCRIPTS)
def test_top_level_help_lists_the_commands(script):
    result = run(script, '--help')
    assert result.returncode == 0, result.stderr
    # usage line, the paper, the commands one per line, then the pointer to the per-command help.
    lines = result.stdout.splitlines()
    assert lines[0] == f'usage: {script} [COMMAND] [--flag=value ...]'
    assert 'commands:' in lines
    listed = [line.split()[0] for line in lines[lines.index('commands:') + 1:] if line.startswith('  ')]
    assert tuple(listed) == SCRIPTS[script]
    assert lines[-1] == f"Run 'python {script} COMMAND --help' for the flags of a command."


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_command_groups_its_flags_and_shows_every_default(script):
    for command in SCRIPTS[script]:
        result = run(script, command, '--help')
        assert result.returncode == 0, (command, result.stderr)
        # The shared parser's page: its usage line, 78 columns, and `--flag VALUE` metavars (INT, FLOAT, BOOL, STR).
        lines = result.stdout.splitlines()
        assert lines[0] == f'usage: {script} {command} [--flag=value ...]', (command, lines[0])
        wide = [line for line in lines if len(line) > 78]
        assert not wide, (command, 'help wider than 78 columns', wide)
        entries = flag_entries(result.stdout)
        for _, flag, _ in entries:
            assert not re.search(r'--\w+=[A-Z]', flag), (command, flag, 'metavar written as --flag=VALUE')
        # Only the common group titles, in the common order (argparse's own 'options' holds just -h).
        titles = [title for title in dict.fromkeys(group for group, _, _ in entries) if title != 'options']
        assert set(titles) <= set(GROUPS), (command, titles)
        assert titles == sorted(titles, key=GROUPS.index), (command, titles)
        # Every flag has a help text that ends by stating its default (or that it is required).
        for group, flag, text in entries:
            if flag.startswith('-h'):
                continue
            assert group in GROUPS, (command, flag, group)
            assert text, (command, flag, 'has no help')
            assert re.search(r'\((default|required)\b', text), (command, flag, text)


@pytest.mark.parametrize('script', SCRIPTS)
def test_no_prefix_matching_and_one_line_errors(script, tmp_path):
    # A prefix of a real flag (--outdi for --outdir) must not be taken for it, in any script.
    result = run(script, 'train', '--outdi', str(tmp_path / 'x'))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'{script}: error: '), result.stderr
    assert '--outdi ' in lines[0], lines[0]
    assert not os.listdir(tmp_path)
