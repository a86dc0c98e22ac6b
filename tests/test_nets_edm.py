"""Downloads from the Hugging Face Hub's resolve URLs and plain URLs (against a local server), the restricted reader of
EDM / ambient-diffusion pickles, the SongUNet / DhariwalUNet key maps, and load_edm_network."""

import os

import pytest
import torch

import nets
from edm_layouts import hf_repo_folder, serve_folder


# ----------------------------------------------------------------------------------------------------------------------
# Downloads


def test_hf_hub_download_resumes_an_interrupted_download_and_caches(tmp_path, monkeypatch):
    data = os.urandom(300_000)
    repo = hf_repo_folder(tmp_path / 'hub', 'someone/edm-net')
    os.makedirs(repo)
    (tmp_path / 'hub' / 'someone' / 'edm-net' / 'resolve' / 'main' / 'model.safetensors').write_bytes(data)
    cache = str(tmp_path / 'cache')
    target = os.path.join(cache, 'hf', 'someone', 'edm-net', 'main', 'model.safetensors')
    with serve_folder(tmp_path / 'hub', interrupt_after=100_000) as base_url:
        monkeypatch.setenv('HF_ENDPOINT', base_url)
        # The connection drops after 100 kB: no file at the target, the bytes kept for the next call.
        with pytest.raises(nets.WeightsNotFoundError) as info:
            nets.hf_hub_download('someone/edm-net', 'model.safetensors', cache_dir=cache)
        message = str(info.value)
        assert '\n' not in message and message.endswith(f'save it as {target}')
        assert f'{base_url}/someone/edm-net/resolve/main/model.safetensors' in message
        assert not os.path.exists(target) and os.path.getsize(target + '.part') == 100_000

        # The next call asks only for the rest, and the file is whole.
        base_url.server.options.clear()
        assert nets.hf_hub_download('someone/edm-net', 'model.safetensors', cache_dir=cache) == target
        assert base_url.server.requests[-1] == ('/someone/edm-net/resolve/main/model.safetensors', 'bytes=100000-')
        assert open(target, 'rb').read() == data and not os.path.exists(target + '.part')

        # Cached from now on: no request.
        count = len(base_url.server.requests)
        assert nets.hf_hub_download('someone/edm-net', 'model.safetensors', cache_dir=cache) == target
        assert len(base_url.server.requests) == count


def test_download_refuses_a_size_other_than_announced_and_restarts_without_range(tmp_path):
    data = os.urandom(50_000)
    (tmp_path / 'net.pkl').write_bytes(data)
    cache = tmp_path / 'cache'
    with serve_folder(tmp_path) as base_url:
        url = f'{base_url}/net.pkl'
        path = os.path.join(cache, 'net.pkl')
        # A partial file whose resumed total disagrees with the server's announcement is refused.
        os.makedirs(cache)
        open(path + '.part', 'wb').write(data[:1000])
        base_url.server.options['range_total_extra'] = 7
        with pytest.raises(nets.WeightsNotFoundError, match='got 50000 bytes, the server announced 50007'):
            nets.download_cached(url, str(cache))
        assert not os.path.exists(path)

        # A server that ignores Range sends the whole file, which replaces the partial one.
        base_url.server.options.clear()
        base_url.server.options['ignore_range'] = True
        open(path + '.part', 'wb').write(b'x' * 1000)
        assert open(nets.download_cached(url, str(cache)), 'rb').read() == data
        assert base_url.server.requests[-1][1] == 'bytes=1000-'

        # A partial file longer than the remote file (416): downloaded again from the start.
        os.remove(path)
        base_url.server.options.clear()
        open(path + '.part', 'wb').write(b'x' * 60_000)
        assert open(nets.download_cached(url, str(cache)), 'rb').read() == data


def test_resolve_source_kinds(tmp_path, monkeypatch):
    repo = hf_repo_folder(tmp_path / 'hub', 'owner/net', 'v1')
    os.makedirs(os.path.join(repo, 'sub'))
    for name in ('config.json', 'model.safetensors'):
        open(os.path.join(repo, 'sub', name), 'w').write(name)
    cache = str(tmp_path / 'cache')
    with serve_folder(tmp_path / 'hub') as base_url:
        monkeypatch.setenv('HF_ENDPOINT', base_url)
        folder = nets.resolve_source('hf://owner/net@v1/sub', ['config.json', ('pytorch_model.bin', 'model.safetensors')],
                                     cache_dir=cache)
        assert folder == os.path.join(cache, 'hf', 'owner', 'net', 'v1', 'sub')
        assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
        # A required file that the repository lacks: one line naming the URL.
        with pytest.raises(nets.WeightsNotFoundError, match=r'resolve/main/config\.json \(HTTP 404\)'):
            nets.resolve_source('owner/net', ['config.json'], cache_dir=cache)
        # A URL is downloaded; a local path is returned as is.
        (tmp_path / 'hub' / 'x.pkl').write_bytes(b'abc')
        assert open(nets.resolve_source(f'{base_url}/x.pkl', cache_dir=cache), 'rb').read() == b'abc'
    assert nets.resolve_source(str(tmp_path / 'hub' / 'x.pkl')) == str(tmp_path / 'hub' / 'x.pkl')
    with pytest.raises(nets.WeightsNotFoundError, match='no such file'):
        nets.resolve_source('runs/network-snapshot-000100.pkl')
