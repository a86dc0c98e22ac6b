"""Downloads from the Hugging Face Hub's resolve URLs and plain URLs (against a local server), the restricted reader of
EDM / ambient-diffusion pickles, the SongUNet / DhariwalUNet key maps, and load_edm_network."""

import concurrent.futures
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import edm_layouts
import nets
from edm_layouts import hf_repo_folder, serve_folder


# ----------------------------------------------------------------------------------------------------------------------
# Downloads


def safetensors_bytes(path, size):
    """The bytes of a valid .safetensors file of about `size` random bytes (downloads check the format)."""
    nets.save_safetensors(path, {'w': torch.from_numpy(np.frombuffer(os.urandom(size), np.uint8).copy())})
    return open(path, 'rb').read()


def test_hf_hub_download_resumes_an_interrupted_download_and_caches(tmp_path, monkeypatch):
    data = safetensors_bytes(tmp_path / 'w.safetensors', 300_000)
    repo = hf_repo_folder(tmp_path / 'hub', 'someone/edm-net')
    os.makedirs(repo)
    (tmp_path / 'hub' / 'someone' / 'edm-net' / 'resolve' / 'main' / 'model.safetensors').write_bytes(data)
    cache = str(tmp_path / 'cache')
    with serve_folder(tmp_path / 'hub', interrupt_after=100_000) as base_url:
        monkeypatch.setenv('HF_ENDPOINT', base_url)
        target = os.path.join(cache, 'hf', 'someone', 'edm-net', 'main', 'model.safetensors')
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
    data = pickle.dumps(os.urandom(50_000), protocol=4)  # a .pkl must be a whole pickle
    (tmp_path / 'net.pkl').write_bytes(data)
    cache = tmp_path / 'cache'
    with serve_folder(tmp_path) as base_url:
        url = f'{base_url}/net.pkl'
        path = os.path.join(cache, 'url', __import__('hashlib').sha256(url.encode()).hexdigest()[:16], 'net.pkl')
        # A partial file whose resumed total disagrees with the server's announcement is refused.
        os.makedirs(os.path.dirname(path))
        open(path + '.part', 'wb').write(data[:1000])
        base_url.server.options['range_total_extra'] = 7
        with pytest.raises(nets.WeightsNotFoundError, match=f'got {len(data)} bytes, the server announced '
                                                            f'{len(data) + 7}'):
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


def test_simultaneous_downloads_of_one_file_take_turns(tmp_path):
    # torchrun ranks that all ask for the same checkpoint: one downloads, the others wait and reuse its file.
    data = pickle.dumps(os.urandom(400_000), protocol=4)
    (tmp_path / 'net.pkl').write_bytes(data)
    cache = str(tmp_path / 'cache')
    with serve_folder(tmp_path, pieces=10) as base_url:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            paths = list(pool.map(lambda _: nets.download_cached(f'{base_url}/net.pkl', cache), range(3)))
    assert len(set(paths)) == 1 and open(paths[0], 'rb').read() == data
    assert [name for _, _, names in os.walk(cache) for name in names] == ['net.pkl']


def test_resolve_source_kinds(tmp_path, monkeypatch):
    repo = hf_repo_folder(tmp_path / 'hub', 'owner/net', 'v1')
    os.makedirs(os.path.join(repo, 'sub'))
    open(os.path.join(repo, 'sub', 'config.json'), 'w').write('{}')
    safetensors_bytes(os.path.join(repo, 'sub', 'model.safetensors'), 100)
    cache = str(tmp_path / 'cache')
    with serve_folder(tmp_path / 'hub') as base_url:
        monkeypatch.setenv('HF_ENDPOINT', base_url)
        wanted = ['config.json', ('pytorch_model.bin', 'model.safetensors')]  # the first of a tuple that exists
        folder = nets.resolve_source('hf://owner/net@v1/sub', wanted, cache_dir=cache)
        assert folder == os.path.join(cache, 'hf', 'owner', 'net', 'v1', 'sub')
        assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
        # A required file that the repository lacks: one line naming the URL.
        with pytest.raises(nets.WeightsNotFoundError, match=r'resolve/main/config\.json \(HTTP 404\)'):
            nets.resolve_source('owner/net', ['config.json'], cache_dir=cache)
        # A URL is downloaded; a local path is returned as is.
        (tmp_path / 'hub' / 'x.pkl').write_bytes(pickle.dumps('abc'))
        assert open(nets.resolve_source(f'{base_url}/x.pkl', cache_dir=cache), 'rb').read() == pickle.dumps('abc')
    assert nets.resolve_source(str(tmp_path / 'hub' / 'x.pkl')) == str(tmp_path / 'hub' / 'x.pkl')
    with pytest.raises(nets.WeightsNotFoundError, match='no such file'):
        nets.resolve_source('runs/network-snapshot-000100.pkl')


# ----------------------------------------------------------------------------------------------------------------------
# EDM / ambient-diffusion pickles and ambient-laws Hugging Face folders


def random_unet(**overrides):
    """A small UNet with every parameter random (the official inits zero some layers, which would hide mistakes)."""
    config = dict(arch='ddpmpp', img_resolution=16, in_channels=3, out_channels=3, model_channels=16,
                  channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), label_dim=0, augment_dim=0)
    net = nets.UNet(**{**config, **overrides}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * (0.4 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.2))
    return net


def assert_same_function(net, loaded, labels=True):
    config = net.config
    x = torch.randn(2, config['in_channels'], config['img_resolution'], config['img_resolution'])
    t = torch.tensor([-1.2, 0.7])
    kwargs = {}
    if config['label_dim']:
        kwargs['class_labels'] = torch.eye(config['label_dim'])[[0, config['label_dim'] - 1]]
    if config['augment_dim']:
        kwargs['augment_labels'] = torch.randn(2, config['augment_dim'])
    with torch.no_grad():
        expected = net(x, t, **kwargs)
        assert torch.equal(loaded(x, t, **kwargs), expected)
        assert expected.abs().max() > 0.05  # a network that outputs ~0 would hide a wrong map


GATED_SONGUNET = dict(in_channels=6, out_channels=6, gated=True, augment_dim=9)  # ambient-diffusion's CelebA setting
DHARIWAL = dict(arch='adm', out_channels=6, model_channels=64, label_dim=4, augment_dim=9, num_head_channels=64,
                use_scale_shift_norm=True, resblock_updown=True, norm_min_group_size=4, attn_resolutions=(16, 8))


def test_edm_pickle_loads_the_same_network_without_running_its_code(tmp_path, monkeypatch):
    marker = tmp_path / 'module_src_was_executed'
    monkeypatch.setenv('EDM_LAYOUTS_EXEC_MARKER', str(marker))
    with pytest.raises(RuntimeError, match='was executed'):  # the placeholder source does what the test watches for
        exec(edm_layouts.PLACEHOLDER_MODULE_SRC, {})
    assert marker.exists()
    marker.unlink()

    net = random_unet(label_dim=3, **GATED_SONGUNET)
    path = tmp_path / 'network-snapshot-000100.pkl'
    dataset_kwargs = dict(resolution=16, corruption_probability=0.4, delta_probability=0.1, mask_full_rgb=False)
    edm_layouts.write_edm_pickle(path, net, edm_layouts.edm_precond_kwargs(net, gated=True),
                                 loss=('AmbientLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, norm=2)),
                                 dataset_kwargs=dataset_kwargs, with_training_options=dict(batch_size=8))

    data = nets.load_edm_pickle(path)
    ema = data['ema']
    assert isinstance(ema, nets.PersistentObject) and (ema.module_name, ema.class_name) == ('training.networks',
                                                                                          'EDMPrecond')
    assert ema.modules['model'].class_name == 'SongUNet' and ema.init_kwargs['model_channels'] == 16
    assert ema.modules['model'].modules['map_noise'].class_name == 'PositionalEmbedding'
    assert 'model.enc.16x16_block0.conv0.gate_weight' in ema.state_dict and not marker.exists()

    loaded, info = nets.load_edm_network(str(path))
    assert_same_function(net, loaded)
    assert not marker.exists()
    assert loaded.config == nets.UNet(**info['unet_config']).config and info['unet_config']['gated']
    assert (info['precond'], info['model_type'], info['gated'], info['format']) == \
        ('EDMPrecond', 'SongUNet', True, 'edm-pickle')
    assert {key: info['precond_kwargs'][key] for key in ('img_channels', 'label_dim', 'sigma_data', 'sigma_max')} == \
        dict(img_channels=6, label_dim=3, sigma_data=0.5, sigma_max=80.0)
    assert info['loss_fn'] == dict(class_name='AmbientLoss', P_mean=-1.2, P_std=1.2, sigma_data=0.5, norm=2)
    assert info['dataset_kwargs'] == dataset_kwargs and info['training_options'] == dict(batch_size=8)


def test_ambient_diffusion_state_dict_pickle_and_training_options(tmp_path):
    # ambient-diffusion's training loop pickles ema.state_dict(); its eval.py rebuilds EDMPrecond from
    # training_options.json (network_kwargs + dataset_kwargs.resolution).
    net = random_unet(**GATED_SONGUNET)
    options = dict(network_kwargs=dict(class_name='training.networks.EDMPrecond', **edm_layouts.edm_precond_kwargs(
        net, precond='ambient', gated=True, dropout=0.1)), dataset_kwargs=dict(resolution=16, use_labels=False))
    for key in ('img_resolution', 'img_channels', 'label_dim'):
        options['network_kwargs'].pop(key)
    path = tmp_path / 'network-snapshot-000200.pkl'
    edm_layouts.write_edm_pickle(path, net, edm_layouts.edm_precond_kwargs(net), ema_as_state_dict=True,
                                 with_training_options=options)
    assert isinstance(nets.load_edm_pickle(path)['ema'], dict)
    loaded, info = nets.load_edm_network(path)
    assert_same_function(net, loaded)
    assert info['precond'] == 'EDMPrecond' and info['precond_kwargs']['gated'] is True
    assert info['precond_kwargs']['sigma_max'] == float('inf') and info['unet_config']['dropout'] == 0.1


def test_dhariwal_pickle_over_http_loads_the_same_network(tmp_path):
    net = random_unet(**DHARIWAL)
    edm_layouts.write_edm_pickle(tmp_path / 'edm-imagenet.pkl', net, edm_layouts.edm_precond_kwargs(net))
    with serve_folder(tmp_path) as base_url:
        loaded, info = nets.load_edm_network(f'{base_url}/edm-imagenet.pkl', cache_dir=str(tmp_path / 'cache'))
    assert_same_function(net, loaded)
    assert info['model_type'] == 'DhariwalUNet' and info['unet_config']['norm_min_group_size'] == 4
    assert loaded.out[0].num_groups == 64 // 4  # EDM's GroupNorm: at least 4 channels per group
    x, t, y = torch.randn(1, 3, 16, 16), torch.zeros(1), torch.tensor([1])
    assert (loaded(x, t, y, 10 * torch.randn(1, 9)) - loaded(x, t, y)).abs().max() > 1e-4  # augment labels count
    assert 'gated' not in info['precond_kwargs'] and info['training_options'] is None


def test_hf_folder_from_the_hub_loads_the_same_network(tmp_path, monkeypatch):
    net = random_unet(augment_dim=9, dropout=0.13)
    repo_id = 'giannisdaras/ambient_laws_test_sigma_0.05'
    kwargs = edm_layouts.edm_precond_kwargs(net)
    for key in ('sigma_min', 'sigma_max', 'sigma_data'):  # the mixin records the arguments given, not defaults
        kwargs.pop(key)
    edm_layouts.write_hf_folder(edm_layouts.hf_repo_folder(tmp_path / 'hub', repo_id), net, kwargs)
    cache = str(tmp_path / 'cache')
    with serve_folder(tmp_path / 'hub') as base_url:
        monkeypatch.setenv('HF_ENDPOINT', base_url)
        loaded, info = nets.load_edm_network(repo_id, cache_dir=cache)
        with pytest.raises(nets.WeightsNotFoundError, match=r'resolve/main/config\.json \(HTTP 404\)'):
            nets.load_edm_network('giannisdaras/no_such_model', cache_dir=cache)
    assert_same_function(net, loaded)
    assert info['format'] == 'huggingface' and info['precond'] == 'EDMPrecond'
    assert (info['precond_kwargs']['sigma_data'], info['precond_kwargs']['sigma_max']) == (0.5, float('inf'))
    assert info['unet_config']['dropout'] == 0.13
    # Offline from then on: the cached folder is enough (HF_ENDPOINT points at a closed port).
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')
    assert_same_function(net, nets.load_edm_network(f'hf://{repo_id}', cache_dir=cache)[0])


# ----------------------------------------------------------------------------------------------------------------------
# Key maps


@pytest.mark.parametrize('overrides', [GATED_SONGUNET, dict(label_dim=3, num_blocks=2, channel_mult=(1, 2, 2)),
                                       DHARIWAL, dict(DHARIWAL, gated=True, label_dim=0)])
def test_key_maps_round_trip(overrides):
    net = random_unet(**overrides)
    to_edm, from_edm = (nets.unet_to_songunet_state_dict, nets.songunet_to_unet_state_dict) if \
        net.config['arch'] == 'ddpmpp' else (nets.unet_to_dhariwal_state_dict, nets.dhariwal_to_unet_state_dict)
    edm = to_edm(net)
    assert all(key.startswith(('map_', 'enc.', 'dec.', 'out_')) for key in edm)
    config = nets.edm_unet_config(edm)
    assert nets.UNet(**config).config == {**net.config, 'dropout': 0.0}
    back = from_edm({f'model.{key}': value for key, value in edm.items()})  # the precond's prefix is accepted
    assert list(back) == list(net.state_dict()) and all(torch.equal(back[k], v) for k, v in net.state_dict().items())


def test_key_maps_follow_edm_layout():
    """The layout EDM's UNetBlock uses (training/networks.py): qkv rows reshaped to (heads, C / heads, 3), so row
    h * 3d + c * 3 + j is q/k/v number j of channel c of head h; DhariwalUNet's label map is Linear(classes -> emb)."""
    net = random_unet(**DHARIWAL)   # 128 channels at 8x8: 2 heads of 64
    edm = nets.unet_to_dhariwal_state_dict(net)
    edm['dec.8x8_in0.qkv.weight'] = torch.arange(384.0)[:, None, None, None].expand(384, 128, 1, 1).clone()
    ours = nets.dhariwal_to_unet_state_dict(edm)['middle_block.1.qkv.weight'][:, 0, 0]
    d = 64
    for h, j, c in [(0, 0, 0), (0, 1, 5), (1, 2, 63), (1, 0, 17)]:
        assert ours[h * 3 * d + j * d + c] == h * 3 * d + c * 3 + j
    assert torch.equal(nets.dhariwal_to_unet_state_dict(edm)['label_emb.weight'], edm['map_label.weight'].t())
    names = nets.unet_to_songunet_state_dict(random_unet())
    assert {'enc.16x16_conv.weight', 'enc.8x8_down.conv0.resample_filter', 'dec.8x8_in0.qkv.weight',
            'dec.16x16_up.skip.weight', 'dec.16x16_aux_conv.weight'} <= set(names)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_refuses_unknown_globals_and_runs_nothing(tmp_path):
    marker = tmp_path / 'command_ran'
    net = random_unet()
    path = tmp_path / 'network-snapshot-000000.pkl'
    edm_layouts.write_edm_pickle(path, net, edm_layouts.edm_precond_kwargs(net), extra=dict(x=RunsACommand(marker)))
    with pytest.raises(ValueError) as info:
        nets.load_edm_pickle(path)
    message = str(info.value)
    assert '\n' not in message and 'system' in message and str(path) in message and not marker.exists()

    # A torch.save zip file is not a pickle; a pickled torch module (not a persistent EDM object) would be built by
    # its class, so it is refused.
    torch.save({'ema': net.state_dict()}, tmp_path / 'snapshot.pkl')
    with pytest.raises(ValueError, match='not loaded as an EDM network pickle'):
        nets.load_edm_pickle(tmp_path / 'snapshot.pkl')
    with open(tmp_path / 'torch_module.pkl', 'wb') as f:
        pickle.dump({'ema': torch.nn.Linear(2, 2)}, f)
    with pytest.raises(ValueError, match=r'torch\.nn\.modules\.linear\.Linear'):
        nets.load_edm_pickle(tmp_path / 'torch_module.pkl')

    # An allowed global must not be changed by the pickle: BUILD on a class or function (here the tensor rebuild
    # function's defaults, set through the slot-state form of BUILD) would alter the reader for the whole process.
    defaults = nets._rebuild_parameter.__defaults__
    crafted = (pickle.PROTO + bytes([2]) + pickle.GLOBAL + b'torch._utils\n_rebuild_parameter\n'
               + pickle.NONE + pickle.EMPTY_DICT + pickle.BINUNICODE + struct.pack('<I', 12) + b'__defaults__'
               + pickle.EMPTY_TUPLE + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.STOP)
    (tmp_path / 'crafted.pkl').write_bytes(crafted)
    with pytest.raises(ValueError, match='sets attributes of _rebuild_parameter'):
        nets.load_edm_pickle(tmp_path / 'crafted.pkl')
    assert nets._rebuild_parameter.__defaults__ == defaults


def test_unreadable_training_options_are_one_line_naming_the_file(tmp_path):
    net = random_unet()
    path = tmp_path / 'network-snapshot-000000.pkl'
    edm_layouts.write_edm_pickle(path, net, edm_layouts.edm_precond_kwargs(net))
    (tmp_path / 'training_options.json').write_text('{"network_kwargs": ')  # cut short
    with pytest.raises(ValueError) as info:
        nets.load_edm_network(path)
    assert 'training_options.json' in str(info.value) and '\n' not in str(info.value)


def test_ncsnpp_is_refused_in_one_line(tmp_path):
    net = random_unet()
    kwargs = edm_layouts.edm_precond_kwargs(net, embedding_type='fourier', encoder_type='residual')
    edm_layouts.write_edm_pickle(tmp_path / 'ncsnpp.pkl', net, kwargs)
    with pytest.raises(ValueError, match=r"embedding_type='fourier' \(ncsnpp-style\) is not supported"):
        nets.load_edm_network(tmp_path / 'ncsnpp.pkl')
    edm = {**nets.unet_to_songunet_state_dict(net), 'map_noise.freqs': torch.randn(8)}  # no kwargs: the keys tell
    with pytest.raises(ValueError, match='ncsnpp'):
        nets.songunet_to_unet_state_dict(edm)
    edm = nets.unet_to_songunet_state_dict(net)
    fir = torch.tensor([1., 3, 3, 1])
    edm['enc.8x8_down.conv0.resample_filter'] = fir.outer(fir)[None, None] / 64
    with pytest.raises(ValueError, match=r'\[1, 3, 3, 1\]'):
        nets.songunet_to_unet_state_dict(edm)
