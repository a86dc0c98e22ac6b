"""nets.DINOv2 against the layout and numbers of facebookresearch/dinov2, load_dinov2 (local file, URL, official
names through a local server), and the preprocessing and feature of ambient-diffusion's find_dataset_neighbors.py.

The pinned outputs below were computed with the official DinoVisionTransformer (without xFormers) on the same random
state dicts that random_state_dict builds here; nets.DINOv2 matched them bitwise in float32 and float64."""

import os

import numpy as np
import pytest
import torch

import nets
from edm_layouts import serve_folder


# ----------------------------------------------------------------------------------------------------------------------
# State dicts in the official layout


def official_layout(dim, depth, grid, registers=0, swiglu_hidden=None, patch=14):
    """(key, shape) pairs of the official DinoVisionTransformer state dict (block_chunks=0, LayerScale on), in its
    order: cls_token, pos_embed, [register_tokens], mask_token, patch_embed.proj, blocks.N.*, norm."""
    keys = [('cls_token', (1, 1, dim)), ('pos_embed', (1, 1 + grid * grid, dim))]
    keys += [('register_tokens', (1, registers, dim))] if registers else []
    keys += [('mask_token', (1, dim)), ('patch_embed.proj.weight', (dim, 3, patch, patch)),
             ('patch_embed.proj.bias', (dim,))]
    if swiglu_hidden:  # SwiGLUFFNFused: w12 packs the two input projections
        ffn = [('mlp.w12.weight', (2 * swiglu_hidden, dim)), ('mlp.w12.bias', (2 * swiglu_hidden,)),
               ('mlp.w3.weight', (dim, swiglu_hidden)), ('mlp.w3.bias', (dim,))]
    else:
        ffn = [('mlp.fc1.weight', (4 * dim, dim)), ('mlp.fc1.bias', (4 * dim,)),
               ('mlp.fc2.weight', (dim, 4 * dim)), ('mlp.fc2.bias', (dim,))]
    block = [('norm1.weight', (dim,)), ('norm1.bias', (dim,)), ('attn.qkv.weight', (3 * dim, dim)),
             ('attn.qkv.bias', (3 * dim,)), ('attn.proj.weight', (dim, dim)), ('attn.proj.bias', (dim,)),
             ('ls1.gamma', (dim,)), ('norm2.weight', (dim,)), ('norm2.bias', (dim,)), *ffn, ('ls2.gamma', (dim,))]
    keys += [(f'blocks.{n}.{name}', shape) for n in range(depth) for name, shape in block]
    return keys + [('norm.weight', (dim,)), ('norm.bias', (dim,))]


# Tiny models: 128 wide (two 64-wide heads, as every released model), 2 blocks, a 4 x 4 grid of position embeddings
# (56 px). The SwiGLU hidden width is the official rounding of 2/3 of 4 x 128: (int(512 * 2 / 3) + 7) // 8 * 8 = 344.
TINY = {
    'mlp': dict(dim=128, depth=2, grid=4),
    'registers': dict(dim=128, depth=2, grid=4, registers=4),
    'swiglu': dict(dim=128, depth=2, grid=4, swiglu_hidden=344),
}


def random_state_dict(layout, seed=0):
    """Random values for every tensor, so that no LayerScale, norm or bias is at its (identity) initial value."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in layout:
        noise = torch.randn(shape, generator=generator)
        if key.endswith(('gamma', 'norm1.weight', 'norm2.weight')) or key == 'norm.weight':
            state_dict[key] = 1 + 0.3 * noise
        elif len(shape) == 1:
            state_dict[key] = 0.1 * noise
        elif key.startswith(('blocks.', 'patch_embed.')):
            state_dict[key] = noise / np.prod(shape[1:]) ** 0.5  # unit-variance activations
        else:
            state_dict[key] = noise
    return state_dict


def tiny(kind, seed=0):
    state_dict = random_state_dict(official_layout(**TINY[kind]), seed)
    net = nets.DINOv2(**nets.dinov2_config_from_state_dict(state_dict)).eval()
    net.load_state_dict(state_dict, strict=True)
    return net, state_dict


def tiny_input(height, width, seed=1):
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# Layout and parameter counts


def test_vits14_has_the_official_keys_shapes_and_parameter_count():
    with torch.device('meta'):
        net = nets.DINOv2(**nets.DINOV2_CONFIGS['dinov2_vits14'])
    got = [(key, tuple(value.shape)) for key, value in net.state_dict().items()]
    assert got == official_layout(dim=384, depth=12, grid=37)  # 518 px / 14 = 37
    assert len(got) == 175 and sum(p.numel() for p in net.parameters()) == 22_056_576
    norms = [module for module in net.modules() if isinstance(module, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(norm.eps == 1e-6 for norm in norms)  # official: LayerNorm(eps=1e-6)


def test_parameter_counts_of_the_eight_released_models():
    # Counted on the official models (torch.hub entry points with pretrained=False), registers included.
    official = {'dinov2_vits14': 22_056_576, 'dinov2_vitb14': 86_580_480, 'dinov2_vitl14': 304_368_640,
                'dinov2_vitg14': 1_136_480_768, 'dinov2_vits14_reg4': 22_058_112, 'dinov2_vitb14_reg4': 86_583_552,
                'dinov2_vitl14_reg4': 304_372_736, 'dinov2_vitg14_reg4': 1_136_486_912}
    assert set(nets.DINOV2_CONFIGS) == set(official)
    for name, count in official.items():
        with torch.device('meta'):
            net = nets.DINOv2(**nets.DINOV2_CONFIGS[name])
        assert sum(p.numel() for p in net.parameters()) == count, name
    # g/14: SwiGLU with hidden (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096, 40 blocks, 4 registers in the _reg4 model.
    state_dict = net.state_dict()
    assert state_dict['blocks.39.mlp.w12.weight'].shape == (8192, 1536)
    assert state_dict['blocks.39.mlp.w3.weight'].shape == (1536, 4096)
    assert state_dict['register_tokens'].shape == (1, 4, 1536) and 'blocks.40.norm1.weight' not in state_dict


def test_config_from_state_dict_gives_the_hub_settings():
    for name, config in nets.DINOV2_CONFIGS.items():
        with torch.device('meta'):
            state_dict = nets.DINOv2(**config).state_dict()
        defaults = dict(mlp_ratio=4.0, ffn_layer='mlp', patch_size=14, img_size=518, num_register_tokens=0,
                        interpolate_antialias=False, interpolate_offset=0.1)
        assert nets.dinov2_config_from_state_dict(state_dict) == {**defaults, **config}, name
    with pytest.raises(ValueError, match='does not look like a DINOv2'):
        nets.dinov2_config_from_state_dict({'cls_token': torch.zeros(1, 1, 128)})


def test_strict_load_refuses_a_missing_or_extra_key():
    net, state_dict = tiny('registers')
    for broken in ({k: v for k, v in state_dict.items() if k != 'mask_token'}, {**state_dict, 'head.weight': 0}):
        with pytest.raises(RuntimeError):
            net.load_state_dict(broken, strict=True)


# ----------------------------------------------------------------------------------------------------------------------
# Forward pass: pinned official values

# out[:, :4] of the CLS feature (x_norm_clstoken), from the official code on random_state_dict(official_layout(...)).
# 56 x 56 is the stored 4 x 4 grid (no interpolation); 42 x 70 and 28 x 112 resample the position embeddings (the
# latter has the stored patch count, 2 x 8, but is not square, which the official rule also interpolates).
REFERENCE = {
    ('mlp', 56, 56): [[-2.235082, -1.254644, -2.052665, -0.879895], [-2.264, -1.227386, -2.036534, -0.785975]],
    ('mlp', 42, 70): [[-2.552358, -1.083242, -2.064133, -0.99773], [-2.694266, -1.434128, -2.023727, -1.08413]],
    ('mlp', 28, 112): [[-2.611307, -1.499026, -2.087293, -1.043201], [-2.527115, -1.634485, -2.183187, -0.9097]],
    ('registers', 56, 56): [[-1.000311, -2.101549, -0.298741, 0.262135], [-1.11332, -1.626365, -0.411884, 0.266886]],
    ('registers', 42, 70): [[-0.939353, -2.19738, -0.387947, 0.198912], [-0.931563, -2.030148, -0.473229, 0.22288]],
    ('swiglu', 56, 56): [[-1.324621, -1.184763, -0.849667, 0.935485], [-1.310683, -1.010045, -0.564257, 1.085168]],
    ('swiglu', 42, 70): [[-1.52522, -1.513457, -1.071032, 0.580953], [-1.486105, -1.660444, -0.6561, 0.849592]],
}


@pytest.mark.parametrize('kind, height, width', list(REFERENCE))
def test_forward_matches_the_official_values(kind, height, width):
    net, _ = tiny(kind)
    with torch.no_grad():
        out = net(tiny_input(height, width))
    assert out.shape == (2, 128)
    torch.testing.assert_close(out[:, :4], torch.tensor(REFERENCE[kind, height, width]), atol=2e-5, rtol=0)


def test_forward_features_token_layout_with_registers():
    net, _ = tiny('registers')
    with torch.no_grad():
        features = net.forward_features(tiny_input(42, 70))
    assert features['x_prenorm'].shape == (2, 1 + 4 + 3 * 5, 128)  # CLS, then the 4 registers, then 3 x 5 patches
    assert features['x_norm_regtokens'].shape == (2, 4, 128)
    assert features['x_norm_patchtokens'].shape == (2, 15, 128)
    # Channel 0 of the registers and of the first patches, from the official code (attention ignores token order, so
    # only these tell where the registers sit).
    official_registers = torch.tensor([0.582085, -0.27329, 0.50721, 1.088812])
    official_patches = torch.tensor([0.768041, 0.242553, 0.044239, 0.334791])
    torch.testing.assert_close(features['x_norm_regtokens'][0, :, 0], official_registers, atol=2e-5, rtol=0)
    torch.testing.assert_close(features['x_norm_patchtokens'][0, :4, 0], official_patches, atol=2e-5, rtol=0)
    torch.testing.assert_close(features['x_norm_clstoken'], net.norm(features['x_prenorm'])[:, 0])
    torch.testing.assert_close(features['x_norm_regtokens'], net.norm(features['x_prenorm'])[:, 1:5])


def test_position_embeddings_are_kept_for_the_native_grid_and_resampled_otherwise():
    net, state_dict = tiny('mlp')
    tokens = torch.zeros(1, 17, 128)
    assert net.interpolate_pos_encoding(tokens, 56, 56) is net.pos_embed
    resampled = net.interpolate_pos_encoding(tokens, 42, 70)
    assert resampled.shape == (1, 1 + 3 * 5, 128)
    torch.testing.assert_close(resampled[:, 0], state_dict['pos_embed'][:, 0])  # the CLS embedding is not resampled
    with pytest.raises(ValueError, match='multiples of 14'):
        net(torch.zeros(1, 3, 50, 56))


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing and features of find_dataset_neighbors.py


def official_preprocess(images_uint8):
    """The official lines in numpy: Dataset.__getitem__'s `image.astype(np.float32) / 127.5 - 1`, dnnlib.util's
    pad_image (reflect, floor(pad / 2) before, the rest after), then `(x + 1) / 2.`."""
    x = images_uint8.astype(np.float32) / 127.5 - 1
    pad_h, pad_w = (14 - x.shape[2] % 14) % 14, (14 - x.shape[3] % 14) % 14
    x = np.pad(x, ((0, 0), (0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)), mode='reflect')
    return (x + 1) / 2.


@pytest.mark.parametrize('height, width', [(32, 32), (45, 50), (28, 28)])
def test_preprocess_equals_the_official_lines(height, width):
    images = np.random.default_rng(0).integers(0, 256, (3, 3, height, width), dtype=np.uint8)
    x = nets.dinov2_preprocess(torch.from_numpy(images))
    assert x.dtype == torch.float32 and x.shape[2] % 14 == 0 and x.shape[3] % 14 == 0
    assert torch.equal(x, torch.from_numpy(official_preprocess(images)))


def test_preprocess_pads_cifar_to_42_by_reflection_without_resizing_or_imagenet_normalisation():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = nets.dinov2_preprocess(images)
    assert x.shape == (2, 3, 42, 42)
    torch.testing.assert_close(x[:, :, 5:37, 5:37], images.float() / 255, atol=1e-6, rtol=0)  # [0, 1], centred
    assert torch.equal(x[:, :, 5:37, 4], x[:, :, 5:37, 6])  # reflection without repeating the edge pixel
    assert torch.equal(x[:, :, 0, 5:37], x[:, :, 10, 5:37])
    # 45 rows -> 56: 5 rows above, the odd 6th below.
    tall = nets.dinov2_preprocess(torch.randint(0, 256, (1, 3, 45, 14), dtype=torch.uint8))
    assert torch.equal(tall[:, :, 4], tall[:, :, 6]) and torch.equal(tall[:, :, 55], tall[:, :, 43])
    gray = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(nets.dinov2_preprocess(gray), nets.dinov2_preprocess(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match='uint8'):
        nets.dinov2_preprocess(images.float())


def test_features_are_the_unit_cls_token_of_the_preprocessed_images():
    net, _ = tiny('mlp')
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    features = nets.dinov2_features(net, images)
    with torch.no_grad():
        cls = net.forward_features(nets.dinov2_preprocess(images))['x_norm_clstoken']
    torch.testing.assert_close(features, cls / cls.norm(dim=1, keepdim=True))
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(nets.dinov2_features(net, images, normalize=False), cls)


# ----------------------------------------------------------------------------------------------------------------------
# load_dinov2


def check_loaded(net, state_dict):
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert list(net.state_dict()) == list(state_dict)
    reference, _ = tiny('registers' if 'register_tokens' in state_dict else 'mlp')
    x = tiny_input(42, 70)
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))


def test_load_dinov2_from_a_local_file_plain_and_chunked(tmp_path):
    _, state_dict = tiny('mlp')
    torch.save(state_dict, tmp_path / 'dinov2.pth')
    check_loaded(nets.load_dinov2(tmp_path / 'dinov2.pth'), state_dict)

    # The official training checkpoints chunk the blocks (block_chunks > 0): blocks.<chunk>.<block>.*, here 1 chunk.
    chunked = {key.replace('blocks.', 'blocks.0.', 1): value for key, value in state_dict.items()}
    torch.save(chunked, tmp_path / 'chunked.pth')
    check_loaded(nets.load_dinov2(tmp_path / 'chunked.pth'), state_dict)

    with pytest.raises(nets.WeightsNotFoundError, match='dinov2_vitg14_reg4'):
        nets.load_dinov2(tmp_path / 'missing.pth')
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='DINOv2'):
        nets.load_dinov2(tmp_path / 'other.pth')


def test_load_dinov2_by_url_and_by_official_name_through_a_local_server(tmp_path, monkeypatch):
    assert nets.DINOV2_URL.format(base='dinov2_vitg14', name='dinov2_vitg14') == \
        'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth'
    _, plain = tiny('mlp')
    _, registers = tiny('registers')
    os.makedirs(tmp_path / 'site' / 'dinov2_vits14')
    torch.save(plain, tmp_path / 'site' / 'dinov2_vits14' / 'dinov2_vits14_pretrain.pth')
    torch.save(registers, tmp_path / 'site' / 'dinov2_vits14' / 'dinov2_vits14_reg4_pretrain.pth')
    cache = tmp_path / 'cache'
    with serve_folder(tmp_path / 'site') as base_url:
        url = f'{base_url}/dinov2_vits14/dinov2_vits14_pretrain.pth'
        check_loaded(nets.load_dinov2(url, cache_dir=cache), plain)
        # An official name: the official URL pattern (the _reg4 file lives in the folder of the plain model).
        monkeypatch.setattr(nets, 'DINOV2_URL', base_url + '/{base}/{name}_pretrain.pth')
        check_loaded(nets.load_dinov2('dinov2_vits14_reg4', cache_dir=cache), registers)
        assert [path for path, _ in base_url.server.requests] == [
            '/dinov2_vits14/dinov2_vits14_pretrain.pth', '/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth']
    # Cached: loads with the server gone (also under torch.hub's entry-point name, '_reg'); a name not yet downloaded
    # fails with one line naming the URL.
    check_loaded(nets.load_dinov2('dinov2_vits14_reg', cache_dir=cache), registers)
    with pytest.raises(nets.WeightsNotFoundError) as info:
        nets.load_dinov2('dinov2_vitg14', cache_dir=cache)
    assert '\n' not in str(info.value) and f'{base_url}/dinov2_vitg14/dinov2_vitg14_pretrain.pth' in str(info.value)
