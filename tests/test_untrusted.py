"""Files from the internet (issue 23): each test makes a hostile or malformed file itself and checks that the readers of
nets.py and fid.py refuse it in one line, run none of its code, and stay within memory and time bounds relative to
its size. Memory bounds are checked in subprocesses under resource.setrlimit(RLIMIT_AS); crashes show as exit codes.
Every download comes from a local server on 127.0.0.1, never the internet."""

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import threading
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import edm_layouts
import fid
import nets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')


def run_python(code, memory_mb=None, timeout=120):
    """Run code in a fresh interpreter (repository and tests importable). memory_mb: an RLIMIT_AS of that many MB
    above what the interpreter uses once torch, numpy, nets and fid are imported."""
    prelude = (f'import sys, resource; sys.path[:0] = [{ROOT!r}, {TESTS!r}]\n'
               'import numpy, torch, nets, fid\n')
    if memory_mb:
        if not os.path.exists('/proc/self/statm'):
            pytest.skip('memory bounds are measured with /proc/self/statm (Linux)')
        prelude += ('import os\n'
                    'used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")\n'
                    f'limit = used + {memory_mb} * 2**20\n'
                    'resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-c', prelude + code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


class Payload:
    """Unpickling it runs exec, which writes the marker file: the code-execution canary."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("ran")',)


def one_line(error):
    message = str(error)
    assert message.strip() and '\n' not in message, message
    return message


# ----------------------------------------------------------------------------------------------------------------------
# Item 1: the CIFAR-10 archive (md5 at every use, batches read without executing anything)


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as the official CIFAR-10 batches were pickled (read back as bytes
    with encoding='bytes'); Python 3's own protocol 2 would go through _codecs.encode instead."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        size = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else
                    pickle.BINSTRING + size.to_bytes(4, 'little')) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def official_batch(count, seed):
    rng = np.random.RandomState(seed)
    batch = {b'batch_label': b'training batch %d of 5' % seed, b'labels': [int(v) for v in rng.randint(0, 10, count)],
             b'data': rng.randint(0, 256, (count, 3072), dtype=np.uint8),
             b'filenames': [b'img_%d.png' % i for i in range(count)]}
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(batch)
    return batch, buffer.getvalue()


def cifar_tarball(path, batch_bytes):
    """A cifar-10-python.tar.gz holding data_batch_1..5 with the given pickles."""
    with tarfile.open(path, 'w:gz') as tar:
        for i, data in enumerate(batch_bytes, 1):
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(open(path, 'rb').read()).hexdigest()


def test_cifar10_official_layout_is_read_downloaded_once_and_md5_checked(tmp_path, monkeypatch):
    batches = [official_batch(6, seed) for seed in range(1, 6)]
    (tmp_path / 'site').mkdir()
    md5 = cifar_tarball(tmp_path / 'site' / 'cifar-10-python.tar.gz', [data for _, data in batches])
    monkeypatch.setattr(fid, 'CIFAR10_MD5', md5)
    cache = tmp_path / 'cache'
    with edm_layouts.serve_folder(tmp_path / 'site') as base_url:
        monkeypatch.setattr(fid, 'CIFAR10_URL', f'{base_url}/cifar-10-python.tar.gz')
        images, labels = fid.read_image_set('cifar10', cache_dir=cache)
        assert len(base_url.server.requests) == 1
    expected = np.concatenate([batch[b'data'] for batch, _ in batches]).reshape(-1, 3, 32, 32)
    assert images.dtype == np.uint8 and np.array_equal(images, expected)
    assert labels.dtype == np.int64 and labels.tolist() == sum((batch[b'labels'] for batch, _ in batches), [])
    # Offline from then on; the class names are CIFAR-10's.
    source = fid.ImageSource('cifar10', cache_dir=cache)
    assert len(source) == 30 and source.class_names[3] == 'cat' and np.array_equal(source[7], expected[7])
    # `fid.py ref --data=cifar10` reads it too; --num takes a seeded subset.
    import test_fid
    monkeypatch.setattr(fid, 'load_inception', lambda weights=None, device='cpu': test_fid.TinyDetector())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fid.main(['ref', '--data=cifar10', f'--cache_dir={cache}', f'--dest={tmp_path / "ref.npz"}', '--num=10',
                  '--protocol=pytorch-fid', '--device=cpu', '--workers=1', '--batch=4'])
    assert int(fid.load_ref(tmp_path / 'ref.npz')['n']) == 10
    # A cached archive that changed is refused at the next use, before anything in it is read.
    with open(cache / 'cifar-10-python.tar.gz', 'ab') as f:
        f.write(b'x')
    with pytest.raises(ValueError, match='md5.*delete it to download again') as error:
        fid.read_image_set('cifar10', cache_dir=cache)
    one_line(error.value)


def test_cifar10_poisoned_cache_is_refused_by_md5_and_never_unpickled(tmp_path, monkeypatch, capsys):
    marker = tmp_path / 'marker'
    poisoned = [_py2({b'data': Payload(marker)})] + [official_batch(2, s)[1] for s in range(2, 6)]
    cache = tmp_path / 'cache'
    cache.mkdir()
    md5 = cifar_tarball(cache / 'cifar-10-python.tar.gz', poisoned)
    # The file is hostile: reading a batch as the scripts used to (pickle.load) runs its payload.
    result = run_python(f'import tarfile, pickle\n'
                        f'tar = tarfile.open({str(cache / "cifar-10-python.tar.gz")!r})\n'
                        f'pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_1"), encoding="bytes")\n')
    assert result.returncode == 0 and marker.exists()
    marker.unlink()

    # Refused by its md5, through the library and through `fid.py ref` (exit 2, one line).
    with pytest.raises(ValueError, match='md5') as error:
        fid.read_image_set('cifar10', cache_dir=cache)
    assert 'delete it' in one_line(error.value)
    with pytest.raises(SystemExit) as exit_info:
        fid.main(['ref', '--data=cifar10', f'--cache_dir={cache}', f'--dest={tmp_path / "ref.npz"}', '--device=cpu'])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    # Even an archive whose md5 matched would not run it: the batch reader builds only data.
    monkeypatch.setattr(fid, 'CIFAR10_MD5', md5)
    with pytest.raises(ValueError, match=r'refers to \w+\.exec') as error:
        fid.read_image_set('cifar10', cache_dir=cache)
    one_line(error.value)
    assert not marker.exists() and not (tmp_path / 'ref.npz').exists()


def test_cifar10_batch_reader_refuses_everything_but_plain_data():
    _, good = official_batch(3, 1)
    images, labels = fid._read_cifar_batch(good, 'good')
    assert images.shape == (3, 32, 32, 3) and labels.dtype == np.int64
    array_state = pickle.dumps((1, (2, 2), np.dtype('f8'), False, b'\0' * 32), protocol=2)
    hostile = {
        'a float64 array': pickle.dumps({b'data': np.zeros((2, 3072)), b'labels': [0, 1]}, protocol=2),
        'an object array': pickle.dumps({b'data': np.array([None, 1], dtype=object)}, protocol=2),
        'a dict subclass': pickle.dumps(__import__('collections').OrderedDict(a=1), protocol=2),
        'a float label': _py2({b'data': np.zeros((1, 3072), np.uint8), b'labels': [1.5]}),
        'a bool label': _py2({b'data': np.zeros((1, 3072), np.uint8), b'labels': [True]}),
        'a short array': _py2({b'data': np.zeros((1, 3000), np.uint8), b'labels': [1]}),
        'a raw tuple': array_state,
    }
    for what, data in hostile.items():
        with pytest.raises(ValueError) as error:
            fid._read_cifar_batch(data, what)
        one_line(error.value)


def _py2(obj):
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Items 2 and 3: the EDM pickle reader (no BUILD on anything but its stand-ins, plain dtypes only, bounded expansion)


def _op_str(text):
    data = text.encode()
    return b'\x8c' + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _dtype_ops(code, state):
    """Opcodes that push numpy.dtype(code, False, True) with BUILD state `state` (a pickled tuple's opcodes)."""
    return b'cnumpy\ndtype\n' + _op_str(code) + b'\x89\x88\x87R' + state + b'b'


def dtype_crash_pickle():
    """331 bytes or so: a void scalar made over a plain dtype, then a BUILD that gives the dtype an object field,
    so that reading the scalar (.item(), which the reader does for recorded kwargs) dereferences 0x4141414141414141."""
    def state(*items):
        return b'(' + b''.join(items) + b't'
    minus_one = b'J\xff\xff\xff\xff'
    plain_v8 = state(b'K\x03', _op_str('|'), b'NNN', b'K\x08', b'K\x01', b'K\x00')
    object_dtype = _dtype_ops('O8', state(b'K\x03', _op_str('|'), b'NNN', minus_one, minus_one, b'K?'))
    evil = state(b'K\x03', _op_str('|'), b'N', _op_str('a') + b'\x85',
                 b'}' + _op_str('a') + object_dtype + b'K\x00\x86s', b'K\x08', b'K\x08', b'K?')
    return (b'\x80\x02' + _dtype_ops('V8', plain_v8) + b'q\x00'
            + b'cnumpy.core.multiarray\nscalar\n' + b'h\x00' + b'C\x08AAAAAAAA' + b'\x86R' + b'q\x01'
            + b'h\x00' + evil + b'b0'
            + b'}' + _op_str('ema')
            + b'ctorch_utils.persistence\n_reconstruct_persistent_obj\n'
            + b'}' + _op_str('type') + _op_str('class') + b's' + _op_str('class_name') + _op_str('EDMPrecond')
            + b's' + _op_str('state') + b'}' + _op_str('_init_kwargs') + b'}' + _op_str('x') + b'h\x01sss'
            + b'\x85R' + b's.')


def test_edm_pickle_dtype_setstate_is_refused_without_a_crash(tmp_path):
    path = tmp_path / 'network-snapshot-000000.pkl'
    path.write_bytes(dtype_crash_pickle())
    result = run_python(f'try:\n    nets.load_edm_pickle({str(path)!r})\nexcept ValueError as error:\n'
                        f'    print("refused:", error)\n', timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])  # -11 (SIGSEGV) before the fix
    assert 'refused:' in result.stdout and 'dtype' in result.stdout


def test_edm_pickle_build_is_allowed_on_its_stand_ins_only(tmp_path):
    # BUILD on a plain dict made by the pickle, on a set, and a dtype that is not a plain number type: all refused.
    cases = {
        'dict': b'\x80\x02}' + _op_str('a') + b'}' + _op_str('b') + b'K\x01sb.',
        'set': b'\x80\x02cbuiltins\nset\n)R}' + _op_str('a') + b'K\x01sb.',
        'void dtype': b'\x80\x02' + _dtype_ops('V8', b'N') + b'.',
        'object dtype': b'\x80\x02cnumpy\ndtype\n' + _op_str('O8') + b'\x89\x88\x87R.',
    }
    for name, data in cases.items():
        path = tmp_path / f'{name}.pkl'
        path.write_bytes(data)
        with pytest.raises(ValueError, match='not loaded as an EDM network pickle') as error:
            nets.load_edm_pickle(path)
        one_line(error.value)
    # numpy's own pickles of plain scalars still load.
    path = tmp_path / 'scalars.pkl'
    path.write_bytes(pickle.dumps({'a': np.float64(0.5), 'b': np.int64(3), 'c': np.float32(2)}, protocol=4))
    assert nets.load_edm_pickle(path) == {'a': 0.5, 'b': 3, 'c': 2.0}


def shared_reference_bomb(levels=40, where='persistent'):
    """L0 = [], L(k+1) = [Lk, Lk]: 9 bytes a level, 2**levels objects once copied out as a tree."""
    ops = b']q\x00'
    for k in range(levels):
        ops += b']h' + bytes([k]) + b'ah' + bytes([k]) + b'aq' + bytes([k + 1])
    if where == 'persistent':
        return (b'\x80\x02' + ops + b'0}' + _op_str('ema')
                + b'ctorch_utils.persistence\n_reconstruct_persistent_obj\n'
                + b'}' + _op_str('type') + _op_str('class') + b's' + _op_str('class_name') + _op_str('EDMPrecond')
                + b's' + _op_str('state') + b'}' + _op_str('_init_kwargs') + b'}' + _op_str('x')
                + b'h' + bytes([levels]) + b'sss' + b'\x85R' + b's.')
    return b'\x80\x02' + ops + b'0}' + _op_str('dataset_kwargs') + b'h' + bytes([levels]) + b's.'


def test_edm_pickle_bomb_is_bounded_in_memory_and_time(tmp_path):
    path = tmp_path / 'bomb.pkl'
    path.write_bytes(shared_reference_bomb())
    assert path.stat().st_size < 600  # the was 419 bytes
    started = time.monotonic()
    result = run_python(f'try:\n    nets.load_edm_pickle({str(path)!r})\nexcept ValueError as error:\n'
                        f'    print("refused:", error)\n', memory_mb=1000, timeout=90)
    assert result.returncode == 0, result.stderr[-500:]  # a MemoryError or the timeout before the fix
    assert 'refused:' in result.stdout and 'bomb' in result.stdout and time.monotonic() - started < 60
    # The same structure outside the persistent objects is not expanded by the reader, but would be by anyone
    # walking the result (json.dumps of dataset_kwargs): refused as well.
    path.write_bytes(shared_reference_bomb(where='top'))
    with pytest.raises(ValueError, match='bomb') as error:
        nets.load_edm_pickle(path)
    one_line(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# Item 4: no memory allocated from sizes written in a file before they are checked


def test_stride_zero_and_config_sized_state_dicts_allocate_nothing(tmp_path):
    # A state dict of the adm layout whose every tensor is a stride-0 view of one float: ~100 kB on disk, many GB as
    # soon as anything copies it.
    config = {**nets.UNET_PRESETS['tiny-adm'], 'model_channels': 1024}
    with torch.device('meta'):
        shapes = {key: value.shape for key, value in nets.UNet(**config).state_dict().items()}
    one = torch.zeros(1)
    torch.save({key: one.expand(shape) if len(shape) else one[0] for key, shape in shapes.items()},
               tmp_path / 'stride0.pt')
    # Honest small tensors whose shapes describe a huge network: only the keys the config is inferred from.
    C = 4096
    torch.save({'time_embed.0.weight': torch.zeros(1, C, dtype=torch.uint8),
                'input_blocks.0.0.weight': torch.zeros(1, 3, 1, 1, dtype=torch.uint8),
                'input_blocks.1.0.out_layers.3.weight': torch.zeros(C, 1, 1, 1, dtype=torch.uint8),
                'input_blocks.1.0.emb_layers.1.weight': torch.zeros(2 * C, 1, dtype=torch.uint8),
                'output_blocks.1.0.in_layers.0.weight': torch.zeros(1, dtype=torch.uint8),
                'out.2.weight': torch.zeros(3, 1, 1, 1, dtype=torch.uint8)}, tmp_path / 'sizes.pt')
    assert (tmp_path / 'stride0.pt').stat().st_size < 300_000 and (tmp_path / 'sizes.pt').stat().st_size < 30_000
    for name, expected in (('stride0.pt', 'overlaps itself'), ('sizes.pt', 'the network needs')):
        result = run_python(f'try:\n    nets.load_network({str(tmp_path / name)!r})\nexcept ValueError as error:\n'
                            f'    print("refused:", error)\n', memory_mb=1500)
        assert result.returncode == 0, (name, result.stderr[-400:])  # MemoryError tracebacks before the fix
        assert 'refused:' in result.stdout and expected in result.stdout, result.stdout


def test_diffusers_dit_position_table_is_sized_before_it_is_built(tmp_path):
    import test_nets_diffusers as reference
    state_dict = reference.dit_to_diffusers(reference.diffusers_dit_reference().state_dict(), depth=2)
    config = {**reference.DIT_CONFIG, 'sample_size': 4096}  # a 2048 x 2048 token grid from a 100 kB network
    path = str(tmp_path / 'dit_state.pt')
    torch.save(state_dict, path)
    result = run_python(f'state = torch.load({path!r})\n'
                        f'try:\n    nets.dit_from_diffusers({config!r}, state)\n'
                        f'except ValueError as error:\n    print("refused:", error)\n', memory_mb=700)
    assert result.returncode == 0, result.stderr[-400:]
    assert 'refused:' in result.stdout and 'position table' in result.stdout


def _zeros_member(archive, name, header, total, chunk=1 << 20):
    """A deflated zip member of an .npy header followed by `total` zero bytes, written without holding them."""
    with archive.open(name, 'w', force_zip64=True) as f:
        f.write(header)
        zeros = bytes(chunk)
        for start in range(0, total, chunk):
            f.write(zeros[:min(chunk, total - start)])


def _npy_header(shape, dtype):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 'fortran_order': False, 'shape': shape})
    return buffer.getvalue()


def _deflated_zip(path):
    return zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED)


def test_npz_and_reference_sizes_are_checked_before_reading(tmp_path):
    # Images: 315 MB of zeros in a ~0.3 MB file (deflate's ~1000:1), and a header that lies about its member.
    with _deflated_zip(tmp_path / 'images.npz') as archive:
        _zeros_member(archive, 'x.npy', _npy_header((1600, 256, 256, 3), np.uint8), 1600 * 256 * 256 * 3)
    with zipfile.ZipFile(tmp_path / 'forged.npz', 'w') as archive:
        archive.writestr('x.npy', _npy_header((10 ** 6, 1024, 1024, 3), np.uint8) + bytes(100))
    # A reference whose sigma is 9,000 x 9,000 (324 MB) in ~0.3 MB.
    with _deflated_zip(tmp_path / 'ref.npz') as archive:
        archive.writestr('mu.npy', _npy_header((2048,), np.float32) + bytes(8192))
        _zeros_member(archive, 'sigma.npy', _npy_header((9000, 9000), np.float32), 4 * 9000 ** 2)
    assert max((tmp_path / name).stat().st_size for name in ('images.npz', 'forged.npz', 'ref.npz')) < 1_000_000
    code = ('for call in ("fid.ImageSource(%r)[0]", "fid.ImageSource(%r)[0]", "fid.load_ref(%r)"):\n'
            '    try:\n        eval(call)\n        print("read")\n'
            '    except ValueError as error:\n        print("refused:", error)\n') % (
        str(tmp_path / 'images.npz'), str(tmp_path / 'forged.npz'), str(tmp_path / 'ref.npz'))
    result = run_python(code, memory_mb=300)
    assert result.returncode == 0, result.stderr[-400:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith('refused:') for line in lines), lines
    assert 'more than' in lines[0] and 'declares' in lines[1] and 'not Inception statistics' in lines[2], lines


def test_image_bombs_in_a_zip_are_refused_per_image(tmp_path):
    # 16 PNGs of 6000 x 6000 zeros: ~40 kB each, 108 MB each once decoded as RGB.
    buffer = io.BytesIO()
    Image.new('L', (6000, 6000)).save(buffer, format='png', optimize=True)
    with _deflated_zip(tmp_path / 'bomb.zip') as archive:
        for i in range(16):
            archive.writestr(f'{i:02d}.png', buffer.getvalue())
    assert (tmp_path / 'bomb.zip').stat().st_size < 2_000_000
    result = run_python(f'try:\n    fid.read_image_set({str(tmp_path / "bomb.zip")!r}, workers=1)\n'
                        f'except ValueError as error:\n    print("refused:", error)\n', memory_mb=800)
    assert result.returncode == 0, result.stderr[-400:]
    assert 'refused:' in result.stdout and 'pixels' in result.stdout
    # A member that declares more than deflate can produce from its bytes is refused before it is read.
    with zipfile.ZipFile(tmp_path / 'liar.zip', 'w') as archive:
        archive.writestr('a.png', buffer.getvalue())
    data = bytearray((tmp_path / 'liar.zip').read_bytes())
    for signature, offset in ((b'PK\x03\x04', 22), (b'PK\x01\x02', 24)):  # uncompressed size: local, central
        at = data.index(signature)
        data[at + offset:at + offset + 4] = (2 ** 31).to_bytes(4, 'little')
    (tmp_path / 'liar.zip').write_bytes(bytes(data))
    with pytest.raises(ValueError, match='zip bomb') as error:
        fid.ImageSource(tmp_path / 'liar.zip')[0]
    one_line(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# Item 7: downloads


def test_download_cache_is_keyed_on_the_whole_url(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    (tmp_path / 'a' / 'net.pkl').write_bytes(pickle.dumps('from host a'))
    (tmp_path / 'b' / 'net.pkl').write_bytes(pickle.dumps('from host b'))
    cache = str(tmp_path / 'cache')
    with edm_layouts.serve_folder(tmp_path / 'a') as url_a, edm_layouts.serve_folder(tmp_path / 'b') as url_b:
        path_a = nets.download_cached(f'{url_a}/net.pkl', cache)
        path_b = nets.download_cached(f'{url_b}/net.pkl', cache)
        path_q = nets.download_cached(f'{url_b}/net.pkl?v=2', cache)
    assert pickle.loads(open(path_a, 'rb').read()) == 'from host a'
    assert pickle.loads(open(path_b, 'rb').read()) == 'from host b'
    assert len({path_a, path_b, path_q}) == 3


def test_a_body_without_length_counts_only_when_it_parses(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    whole = pickle.dumps({'weights': os.urandom(20_000)}, protocol=4)
    (tmp_path / 'half.pkl').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'login.pkl').write_bytes(b'<!DOCTYPE html><html><body>Please sign in</body></html>')
    (tmp_path / 'whole.pkl').write_bytes(whole)
    (tmp_path / 'refs.npz').write_bytes(b'<html>not found</html>')
    cache = str(tmp_path / 'cache')
    with edm_layouts.serve_folder(tmp_path, no_length=True) as base_url:
        for name in ('half.pkl', 'login.pkl'):
            with pytest.raises(nets.WeightsNotFoundError, match='not a valid .pkl') as error:
                nets.download_cached(f'{base_url}/{name}', cache)
            one_line(error.value)
        assert open(nets.download_cached(f'{base_url}/whole.pkl', cache), 'rb').read() == whole
        # With a Content-Encoding the announced length is not the file's: the same rule.
        base_url.server.options.update(no_length=False, content_encoding='identity')
        with pytest.raises(nets.WeightsNotFoundError, match='not a valid .pkl'):
            nets.download_cached(f'{base_url}/half.pkl', cache)
        # An HTML page with a proper length is not a pickle either; nor an .npz for fid's references.
        base_url.server.options.clear()
        with pytest.raises(nets.WeightsNotFoundError, match='not a valid .pkl'):
            nets.download_cached(f'{base_url}/login.pkl', cache)
        with pytest.raises(FileNotFoundError, match='not a valid .npz') as error:
            fid.load_ref(f'{base_url}/refs.npz')
        one_line(error.value)
    cached = [name for _, _, names in os.walk(cache) for name in names]
    assert cached == ['whole.pkl']  # nothing partial or wrong is kept


def test_a_dripping_server_times_out(tmp_path, monkeypatch):
    (tmp_path / 'slow.pkl').write_bytes(pickle.dumps(bytes(60)))
    monkeypatch.setattr(nets, 'DOWNLOAD_STALL_WINDOW_S', 1.0, raising=False)
    monkeypatch.setattr(nets, 'DOWNLOAD_STALL_MIN_BYTES', 50, raising=False)
    outcome = []
    with edm_layouts.serve_folder(tmp_path, drip=0.25) as base_url:  # one byte every 0.25 s: 20 s for the file
        def download():
            try:
                nets.download_cached(f'{base_url}/slow.pkl', str(tmp_path / 'cache'))
                outcome.append('downloaded')
            except nets.WeightsNotFoundError as error:
                outcome.append(str(error))
        thread = threading.Thread(target=download, daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive() and time.monotonic() - started < 10
    assert len(outcome) == 1 and 'stalled' in outcome[0] and 'save it as' in outcome[0]


def test_an_unreadable_cached_download_is_named_with_how_to_retry(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    (tmp_path / 'site').mkdir()
    (tmp_path / 'site' / 'net.pkl').write_bytes(pickle.dumps({'ema': None}))
    np.savez(tmp_path / 'site' / 'stats.npz', mu=np.zeros(3), sigma=np.zeros((3, 3)), preprocess='tf')
    cache = str(tmp_path / 'cache')
    with edm_layouts.serve_folder(tmp_path / 'site') as base_url:
        with pytest.raises(ValueError, match='no network under "ema"') as error:
            nets.load_edm_network(f'{base_url}/net.pkl', cache_dir=cache)
        message = one_line(error.value)
        assert 'delete it to download it again' in message and os.path.join(cache, 'url') in message
        # fid's references: a cached file that went bad later.
        path = nets.download_cached(f'{base_url}/stats.npz', os.path.join(torch.hub.get_dir(), 'fid-refs'))
        with open(path, 'r+b') as f:
            f.truncate(40)
        with pytest.raises(ValueError, match='delete it to download again') as error:
            fid.load_ref(f'{base_url}/stats.npz')
        assert path in one_line(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# Item 8: diffusers component names stay inside the pipeline folder


def test_model_index_components_cannot_leave_the_folder(tmp_path):
    (tmp_path / 'outside').mkdir()
    (tmp_path / 'outside' / 'scheduler_config.json').write_text(json.dumps({'num_train_timesteps': 7}))
    pipeline = tmp_path / 'pipeline'
    pipeline.mkdir()
    for name in ('../outside', str(tmp_path / 'outside'), 'sub/../../outside'):
        (pipeline / 'model_index.json').write_text(json.dumps({'_class_name': 'DDPMPipeline',
                                                                name: ['diffusers', 'DDPMScheduler']}))
        with pytest.raises(ValueError, match='leaves the folder') as error:
            nets.load_diffusers_pipeline(str(pipeline))
        one_line(error.value)


# ----------------------------------------------------------------------------------------------------------------------
# Item 9: malformed metadata gives one line with a reason


@pytest.mark.parametrize('table', [
    '{"labels": [["a.png", 0], ["b.png",', '[["a.png", 0], ["b.png", 1]]', '{"labels": 5}',
    '{"labels": [["a.png", "cat"], ["b.png", 1]]}', '{"labels": [["a.png", null], ["b.png", 1]]}',
    '{"labels": [["a.png", 1000000000000000000000000000000], ["b.png", 1]]}',
    '{"labels": [["a.png", [1, 2]], ["b.png", 1]]}', '{"labels": [["a.png", 1.5], ["b.png", 1]]}',
    '{"labels": [["a.png", true], ["b.png", 1]]}', '{"labels": [["a.png"], ["b.png", 1]]}',
    '{"labels": [["a.png", 0]]}', '[' * 100_000],
    ids=['invalid JSON', 'a list', 'labels 5', 'label "cat"', 'label null', 'label 10^30', 'label [1, 2]',
         'label 1.5', 'label true', 'entry without id', 'a missing label', 'nested 100,000 deep'])
def test_malformed_dataset_json_is_one_line(tmp_path, table):
    for name in ('a.png', 'b.png'):
        Image.new('RGB', (4, 4)).save(tmp_path / name)
    (tmp_path / 'dataset.json').write_text(table)
    with pytest.raises(ValueError, match='dataset.json') as error:
        fid.ImageSource(tmp_path)
    one_line(error.value)
    with zipfile.ZipFile(tmp_path / 'data.zip', 'w') as archive:
        for name in ('a.png', 'b.png', 'dataset.json'):
            archive.write(tmp_path / name, name)
    with pytest.raises(ValueError, match='dataset.json'):
        fid.read_image_set(tmp_path / 'data.zip')


def test_labels_are_integers_only_wherever_they_come_from(tmp_path):
    images = np.zeros((3, 4, 4, 3), np.uint8)
    for y in (np.array([0, 1.5, 2]), np.array([True, False, True]), np.array([0, -1, 2]), np.array([[0], [1], [2]])):
        np.savez(tmp_path / 'data.npz', x=images, y=y)
        with pytest.raises(ValueError, match='y') as error:
            fid.read_image_set(tmp_path / 'data.npz')
        one_line(error.value)
    np.savez(tmp_path / 'data.npz', x=images, y=np.array([0, 1, 2], np.int32))
    assert fid.read_image_set(tmp_path / 'data.npz')[1].dtype == np.int64


def test_malformed_network_metadata_is_one_line(tmp_path):
    net_folder = tmp_path / 'hf'
    net = nets.UNet(arch='ddpmpp', img_resolution=16, in_channels=3, out_channels=3, model_channels=16,
                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), label_dim=0, augment_dim=0)
    edm_layouts.write_hf_folder(net_folder, net, edm_layouts.edm_precond_kwargs(net))
    config = json.loads((net_folder / 'config.json').read_text())
    problems = {'sigma_data': ({**config, 'sigma_data': 'x'}, 'sigma_data'), 'list': ([config], 'JSON object'),
                'nested': (None, 'JSON')}
    for name, (content, expected) in problems.items():
        (net_folder / 'config.json').write_text(json.dumps(content) if content is not None else '[' * 100_000)
        with pytest.raises(ValueError, match=expected) as error:
            nets.load_edm_network(str(net_folder))
        one_line(error.value)
    # A safetensors shape of [Infinity] (Python's json reads it as a float).
    header = json.dumps({'w': {'dtype': 'F32', 'shape': [float('inf')], 'data_offsets': [0, 4]}}).encode()
    (tmp_path / 'inf.safetensors').write_bytes(len(header).to_bytes(8, 'little') + header + bytes(4))
    with pytest.raises(ValueError, match='not a valid safetensors file') as error:
        nets.load_safetensors(tmp_path / 'inf.safetensors')
    one_line(error.value)
    # A deeply nested model_index.json, and a state dict that is no EDM network: reasons, not empty brackets.
    (tmp_path / 'pipe').mkdir()
    (tmp_path / 'pipe' / 'model_index.json').write_text('{"a": ' * 100_000)
    with pytest.raises(ValueError, match='model_index.json') as error:
        nets.load_diffusers_pipeline(str(tmp_path / 'pipe'))
    one_line(error.value)
    with pytest.raises(ValueError) as error:
        nets.edm_unet_config({'map_layer0.weight': torch.zeros(4, 1)})
    assert '(no )' not in one_line(error.value) and re.search(r'\(no \S', str(error.value))


def test_an_image_error_always_has_a_reason(tmp_path, monkeypatch):
    Image.new('RGB', (4, 4)).save(tmp_path / 'a6.png')

    def fails_without_words(*args, **kwargs):
        raise OSError('')

    monkeypatch.setattr(fid.Image, 'open', fails_without_words)
    with pytest.raises(ValueError) as error:
        fid.ImageSource(tmp_path)[0]
    assert re.search(r'cannot read image \S*a6\.png: \S', one_line(error.value))


# ----------------------------------------------------------------------------------------------------------------------
# Item 13: fid.py exits 2 on bad input, also when it is found during the pass


def test_fid_exits_2_on_a_corrupt_png_found_during_the_pass(tmp_path, monkeypatch, capsys):
    import test_fid
    monkeypatch.setattr(fid, 'load_inception', lambda weights=None, device='cpu': test_fid.TinyDetector())
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(5):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f'{i}.png')
    (images / '5.png').write_bytes((images / '4.png').read_bytes()[:60])  # cut short: found only when decoded
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(16), sigma=np.eye(16), preprocess='tf')
    with pytest.raises(SystemExit) as exit_info:
        fid.main(['calc', f'--images={images}', f'--ref={tmp_path / "ref.npz"}', '--num=6', '--device=cpu',
                  '--workers=1', '--batch=2'])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and '5.png' in err, err
