"""Tests of DiT, the KL-f8 AutoencoderKL, their checkpoint loaders and the safetensors reader (CPU, seconds)."""
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

import nets

# ----------------------------------------------------------------------------------------------------------------------
# Helpers.


def small_dit(**overrides):
    """A DiT-S-width network (so dit_from_state_dict finds its heads) cut to 2 blocks, on an 8x8x4 latent."""
    return nets.DiT_models['DiT-S/2'](**{'input_size': 8, 'depth': 2, 'num_classes': 10, **overrides})


def randomize(net, std=0.05):
    """Overwrite every floating parameter with noise, so that zero-initialised layers stop hiding bugs."""
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, std)
    return net


def dit_inputs(net, batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.input_size, net.input_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.arange(batch) % net.num_classes
    return x, t, y


def dit_xl2_expected_keys():
    """The 292 (key, shape) pairs of the released DiT-XL-2-256x256.pt, written out from its listing."""
    D, blocks = 1152, 28
    expected = {
        'pos_embed': (1, 256, D),
        'x_embedder.proj.weight': (D, 4, 2, 2), 'x_embedder.proj.bias': (D,),
        't_embedder.mlp.0.weight': (D, 256), 't_embedder.mlp.0.bias': (D,),
        't_embedder.mlp.2.weight': (D, D), 't_embedder.mlp.2.bias': (D,),
        'y_embedder.embedding_table.weight': (1001, D),
        'final_layer.linear.weight': (32, D), 'final_layer.linear.bias': (32,),
        'final_layer.adaLN_modulation.1.weight': (2 * D, D), 'final_layer.adaLN_modulation.1.bias': (2 * D,),
    }
    per_block = {'attn.qkv': (3 * D, D), 'attn.proj': (D, D), 'mlp.fc1': (4 * D, D), 'mlp.fc2': (D, 4 * D),
                 'adaLN_modulation.1': (6 * D, D)}
    for i in range(blocks):
        for name, shape in per_block.items():
            expected[f'blocks.{i}.{name}.weight'] = shape
            expected[f'blocks.{i}.{name}.bias'] = shape[:1]
    return expected


def ldm_vae_keys(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4):
    """(key, shape) of a CompVis LDM KL autoencoder (ldm/modules/diffusionmodules/model.py Encoder/Decoder names),
    built from the LDM architecture description, independently of the code under test."""
    keys = {}

    def conv(name, cout, cin, k):
        keys[f'{name}.weight'], keys[f'{name}.bias'] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[f'{name}.weight'], keys[f'{name}.bias'] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f'{name}.norm1', cin), conv(f'{name}.conv1', cout, cin, 3)
        norm(f'{name}.norm2', cout), conv(f'{name}.conv2', cout, cout, 3)
        if cin != cout:
            conv(f'{name}.nin_shortcut', cout, cin, 1)

    def mid(prefix, c):
        resnet(f'{prefix}.mid.block_1', c, c), resnet(f'{prefix}.mid.block_2', c, c)
        norm(f'{prefix}.mid.attn_1.norm', c)
        for name in ('q', 'k', 'v', 'proj_out'):
            conv(f'{prefix}.mid.attn_1.{name}', c, c, 1)

    widths = [ch * m for m in ch_mult]
    conv('encoder.conv_in', ch, 3, 3)
    for level, width in enumerate(widths):
        for j in range(num_res_blocks):
            resnet(f'encoder.down.{level}.block.{j}', (widths[level - 1] if level else ch) if j == 0 else width, width)
        if level < len(widths) - 1:
            conv(f'encoder.down.{level}.downsample.conv', width, width, 3)
    mid('encoder', widths[-1])
    norm('encoder.norm_out', widths[-1]), conv('encoder.conv_out', 2 * z_channels, widths[-1], 3)
    conv('quant_conv', 2 * z_channels, 2 * z_channels, 1), conv('post_quant_conv', z_channels, z_channels, 1)
    conv('decoder.conv_in', widths[-1], z_channels, 3)
    mid('decoder', widths[-1])
    block_in = widths[-1]
    for level in reversed(range(len(widths))):
        for j in range(num_res_blocks + 1):
            resnet(f'decoder.up.{level}.block.{j}', block_in, widths[level])
            block_in = widths[level]
        if level > 0:
            conv(f'decoder.up.{level}.upsample.conv', block_in, block_in, 3)
    norm('decoder.norm_out', ch), conv('decoder.conv_out', 3, ch, 3)
    return keys


def diffusers_to_ldm(state_dict):
    """The inverse key mapping, written by hand for the tests: diffusers layout -> CompVis LDM layout."""
    levels = 1 + max(int(k.split('.')[2]) for k in state_dict if k.startswith('decoder.up_blocks.'))
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if key.startswith('encoder.down_blocks.'):
            kind = {'resnets': 'block', 'downsamplers': 'downsample'}[parts[3]]
            key = '.'.join(['encoder.down', parts[2], kind] + ([parts[4]] if kind == 'block' else []) + parts[5:])
        elif key.startswith('decoder.up_blocks.'):
            kind = {'resnets': 'block', 'upsamplers': 'upsample'}[parts[3]]
            key = '.'.join(['decoder.up', str(levels - 1 - int(parts[2])), kind]
                           + ([parts[4]] if kind == 'block' else []) + parts[5:])
        elif '.mid_block.resnets.' in key:
            key = f'{parts[0]}.mid.block_{int(parts[3]) + 1}.' + '.'.join(parts[4:])
        elif '.mid_block.attentions.0.' in key:
            name = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out': 'proj_out'}[parts[4]]
            key = f'{parts[0]}.mid.attn_1.{name}.{parts[-1]}'
            if value.ndim == 2:
                value = value[:, :, None, None]
        key = key.replace('conv_shortcut', 'nin_shortcut').replace('conv_norm_out', 'norm_out')
        out[key] = value
    return out


def tiny_vae():
    return randomize(nets.AutoencoderKL(**nets.AUTOENCODER_TINY), std=0.1).eval()


def assert_same_network(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------------------------------------------------
# DiT: sizes and the released key layout.


def test_dit_xl2_parameter_count_matches_the_paper():
    with torch.device('meta'):
        net = nets.DiT_models['DiT-XL/2']()
    assert sum(p.numel() for p in net.parameters()) == 675_129_632
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 675_129_632 - 256 * 1152  # frozen pos_embed
    assert net.hidden_size == 1152


def test_dit_xl2_state_dict_matches_the_released_checkpoint():
    with torch.device('meta'):
        state = nets.DiT_models['DiT-XL/2']().state_dict()
    expected = dit_xl2_expected_keys()
    assert len(expected) == 292
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # A few keys copied by hand from the released file's listing.
    assert tuple(state['blocks.27.attn.qkv.weight'].shape) == (3456, 1152)
    assert tuple(state['blocks.13.adaLN_modulation.1.bias'].shape) == (6912,)
    assert tuple(state['y_embedder.embedding_table.weight'].shape) == (1001, 1152)


@pytest.mark.parametrize('name', sorted(nets.DiT_models))
def test_every_dit_preset_builds_and_runs_on_meta(name):
    depth, width, heads = nets.DIT_SIZES[name[4:-2]]
    patch = int(name[-1])
    with torch.device('meta'):
        net = nets.DiT_models[name](input_size=16, num_classes=10)
        x = torch.randn(2, 4, 16, 16)
        out = net(x, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert (len(net.blocks), net.hidden_size, net.num_heads, net.patch_size) == (depth, width, heads, patch)
    assert out.shape == (2, 8, 16, 16)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad) + 990 * width  # at 1000 classes
    low, high = {'S': (32.9, 33.1), 'B': (130.3, 130.9), 'L': (457.8, 458.6), 'XL': (674.8, 675.7)}[name[4:-2]]
    assert low - 0.05 <= trainable / 1e6 <= high + 0.05  # 33M / 130M / 458M / 675M as quoted for DiT


@pytest.mark.parametrize('patch', [2, 4, 8])
def test_small_dit_forward_shapes(patch):
    net = nets.DiT_models[f'DiT-S/{patch}'](input_size=16, depth=1, num_classes=10, learn_sigma=False)
    x, t, y = dit_inputs(net, batch=2)
    assert net(x, t, y).shape == (2, 4, 16, 16)
    assert net.x_embedder(x).shape == (2, (16 // patch) ** 2, 384)


# ----------------------------------------------------------------------------------------------------------------------
# DiT: the maths of each part.


def test_dit_output_is_zero_at_init_and_blocks_start_as_identity():
    net = small_dit()
    x, t, y = dit_inputs(net)
    assert torch.equal(net(x, t, y), torch.zeros(3, 8, 8, 8))  # zero final layer (adaLN-Zero)
    # With a random output layer the output is non-zero, but the zero-gated blocks still do nothing.
    randomize(net.final_layer)
    out = net(x, t, y)
    assert out.abs().mean() > 1e-3
    net.blocks = nn.ModuleList()
    torch.testing.assert_close(net(x, t, y), out)


def test_dit_init_statistics_follow_dit():
    net = small_dit(depth=1)
    assert net.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert net.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    fc1 = net.blocks[0].mlp.fc1.weight  # Xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert fc1.abs().max().item() <= math.sqrt(6 / sum(fc1.shape)) and fc1.std().item() > 0
    patch = net.x_embedder.proj.weight  # Xavier over the (D, C*p*p) view
    assert patch.abs().max().item() <= math.sqrt(6 / (384 + 4 * 2 * 2))
    assert not net.pos_embed.requires_grad and 'pos_embed' in net.state_dict()


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    emb = nets.dit_timestep_embedding(t, dim=8, max_period=10000).double().numpy()
    freqs = np.array([10000 ** (-i / 4) for i in range(4)])
    expected = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb, expected, atol=1e-4)
    assert np.array_equal(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])  # cos first


def test_pos_embed_closed_form():
    D, grid = 16, 4
    pos = nets.dit_pos_embed(D, grid).double().numpy()
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    for row in range(grid):
        for col in range(grid):
            token = pos[row * grid + col]  # tokens are row-major
            expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),   # first half: the column (w)
                                       np.sin(row * omega), np.cos(row * omega)])  # second half: the row (h)
            np.testing.assert_allclose(token, expected, atol=1e-6)


def test_dit_attention_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    attn = randomize(nets.DiTAttention(dim=12, num_heads=3))
    x = torch.randn(2, 5, 12, generator=gen)
    qkv = attn.qkv(x)                                   # (B, T, 3D): [q | k | v], each with heads contiguous
    q, k, v = qkv[..., :12], qkv[..., 12:24], qkv[..., 24:]
    heads = []
    for h in range(3):
        sl = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)  # sqrt(head dim 4) = 2
        heads.append(weights @ v[..., sl])
    torch.testing.assert_close(attn(x), attn.proj(torch.cat(heads, dim=-1)), atol=1e-5, rtol=1e-5)


def test_unpatchify_inverts_the_patch_order():
    net = small_dit(learn_sigma=False, patch_size=2)
    B, C, p, h = 2, 4, 2, 4
    image = torch.randn(B, C, h * p, h * p)
    tokens = torch.zeros(B, h * h, p * p * C)
    for i in range(h):
        for j in range(h):
            for a in range(p):
                for b in range(p):
                    tokens[:, i * h + j, (a * p + b) * C:(a * p + b + 1) * C] = image[:, :, i * p + a, j * p + b]
    assert torch.equal(net.unpatchify(tokens), image)


def test_embedding_noise_acts_only_through_the_label_embedding():
    net = randomize(small_dit())
    x, t, y = dit_inputs(net)  # distinct labels 0, 1, 2
    out = net(x, t, y)
    assert torch.equal(net(x, t, y, embedding_noise=torch.zeros(3, 384)), out)
    noise = torch.randn(3, 384)
    noisy = net(x, t, y, embedding_noise=noise)
    assert (noisy - out).abs().mean() > 1e-3
    with torch.no_grad():  # the same as moving each label's table row by its noise
        net.y_embedder.embedding_table.weight[y] += noise
    torch.testing.assert_close(net(x, t, y), noisy)


def test_null_label_row_exists_iff_label_dropout():
    assert small_dit(class_dropout_prob=0.1).y_embedder.embedding_table.num_embeddings == 11
    assert small_dit(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10
    net = randomize(small_dit())
    x, t, _ = dit_inputs(net, batch=2)
    null, label = net(x, t, torch.tensor([10, 10])), net(x, t, torch.tensor([3, 3]))
    assert null.isfinite().all() and not torch.allclose(null, label)


def test_network_never_drops_labels_itself():
    net = randomize(small_dit())
    x, t, y = dit_inputs(net)
    out_eval = net.eval()(x, t, y)
    for _ in range(5):
        assert torch.equal(net.train()(x, t, y), out_eval)


def test_gradients_reach_every_trainable_parameter_but_not_pos_embed():
    net = randomize(small_dit())
    x, t, y = dit_inputs(net)
    net(x, t, y).square().mean().backward()
    assert net.pos_embed.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if p.requires_grad)


def test_dit_is_deterministic():
    torch.manual_seed(3)
    a = randomize(small_dit())
    torch.manual_seed(3)
    b = randomize(small_dit())
    assert_same_network(a, b)
    x, t, y = dit_inputs(a)
    assert torch.equal(a(x, t, y), b(x, t, y)) and torch.equal(a(x, t, y), a(x, t, y))


def test_dit_bf16_autocast_forward():
    net = randomize(small_dit())
    x, t, y = dit_inputs(net)
    reference = net(x, t, y)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x, t, y)
    assert out.isfinite().all()
    assert (out.float() - reference).norm() / reference.norm() < 0.05


# ----------------------------------------------------------------------------------------------------------------------
# DiT: checkpoints.


def test_dit_state_dict_round_trip_and_loader(tmp_path):
    net = randomize(small_dit())
    x, t, y = dit_inputs(net)
    path = tmp_path / 'dit.pt'
    torch.save(net.state_dict(), path)
    loaded = nets.dit_from_state_dict(nets.load_weights_file(str(path)))
    assert_same_network(net, loaded)
    assert (loaded.input_size, loaded.patch_size, loaded.num_classes, loaded.learn_sigma) == (8, 2, 10, True)
    assert not loaded.pos_embed.requires_grad
    torch.testing.assert_close(loaded(x, t, y), net.eval()(x, t, y))


def test_dit_loader_prefers_ema_of_a_training_checkpoint(tmp_path):
    import argparse
    model, ema = randomize(small_dit(learn_sigma=False)), randomize(small_dit(learn_sigma=False))
    path = tmp_path / 'train.pt'
    torch.save({'model': model.state_dict(), 'ema': ema.state_dict(), 'opt': {},
                'args': argparse.Namespace(model='DiT-S/2')}, path)  # DiT train.py's checkpoint layout
    loaded = nets.dit_from_state_dict(nets.load_weights_file(str(path)))
    assert_same_network(ema, loaded)
    assert not loaded.learn_sigma and loaded.out_channels == 4


def test_dit_loader_infers_the_released_xl2_config():
    with torch.device('meta'):
        state = nets.DiT_models['DiT-XL/2']().state_dict()
        net = nets.dit_from_state_dict(state)
    assert (len(net.blocks), net.hidden_size, net.num_heads, net.patch_size, net.input_size) == (28, 1152, 16, 2, 32)
    assert (net.num_classes, net.class_dropout_prob > 0, net.learn_sigma) == (1000, True, True)


def test_dit_loader_needs_heads_for_an_unknown_width():
    state = nets.DiT(input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=10).state_dict()
    with pytest.raises(ValueError, match='num_heads'):
        nets.dit_from_state_dict(state)
    assert nets.dit_from_state_dict(state, num_heads=4).num_heads == 4


# ----------------------------------------------------------------------------------------------------------------------
# AutoencoderKL.


def test_default_autoencoder_is_kl_f8_with_diffusers_keys():
    with torch.device('meta'):
        vae = nets.AutoencoderKL()
    state = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # stabilityai/sd-vae-ft-ema
    assert sum(p.numel() for p in vae.encoder.parameters()) == 34_163_592
    assert len(state) == 248 and vae.scaling_factor == 0.18215 and vae.downscale_factor == 8
    expected = {  # keys and shapes of stabilityai/sd-vae-ft-ema's diffusers file (attention renamed)
        'encoder.conv_in.weight': (128, 3, 3, 3),
        'encoder.down_blocks.1.resnets.0.conv_shortcut.weight': (256, 128, 1, 1),
        'encoder.down_blocks.2.resnets.0.conv_shortcut.weight': (512, 256, 1, 1),
        'encoder.down_blocks.2.downsamplers.0.conv.weight': (512, 512, 3, 3),
        'encoder.mid_block.attentions.0.to_q.weight': (512, 512),
        'encoder.mid_block.attentions.0.to_out.0.bias': (512,),
        'encoder.mid_block.attentions.0.group_norm.weight': (512,),
        'encoder.conv_out.weight': (8, 512, 3, 3),
        'quant_conv.weight': (8, 8, 1, 1), 'post_quant_conv.weight': (4, 4, 1, 1),
        'decoder.conv_in.weight': (512, 4, 3, 3),
        'decoder.up_blocks.0.resnets.2.conv2.weight': (512, 512, 3, 3),
        'decoder.up_blocks.2.resnets.0.conv_shortcut.weight': (256, 512, 1, 1),
        'decoder.up_blocks.3.resnets.0.conv_shortcut.weight': (128, 256, 1, 1),
        'decoder.up_blocks.2.upsamplers.0.conv.weight': (256, 256, 3, 3),
        'decoder.conv_norm_out.weight': (128,), 'decoder.conv_out.weight': (3, 128, 3, 3),
    }
    assert {k: state[k] for k in expected} == expected
    assert 'decoder.up_blocks.3.upsamplers.0.conv.weight' not in state
    assert 'encoder.down_blocks.3.downsamplers.0.conv.weight' not in state


def test_ldm_checkpoint_keys_map_onto_the_kl_f8_layout():
    with torch.device('meta'):
        ldm = {k: torch.empty(shape) for k, shape in ldm_vae_keys().items()}
        ours = {k: tuple(v.shape) for k, v in nets.AutoencoderKL().state_dict().items()}
        checkpoint = {'state_dict': {'first_stage_model.' + key: value for key, value in ldm.items()}}
        converted = nets.vae_state_dict_to_diffusers(checkpoint)
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    config = nets.vae_config_from_state_dict(converted)
    assert config == dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                          latent_channels=4)


def test_tiny_autoencoder_shapes_and_scaling():
    vae = tiny_vae()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = vae.encode_moments(x)
    assert mean.shape == logvar.shape == (2, 4, 16, 16) and mean.dtype == torch.float32
    z = vae.encode(x, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, (mean + (0.5 * logvar).exp() * noise) * 0.18215)
    image = vae.decode(z)
    assert image.shape == (2, 3, 32, 32)
    torch.testing.assert_close(image, vae.decoder(vae.post_quant_conv(z / 0.18215)))
    with torch.no_grad():
        vae.quant_conv.bias[4:].fill_(100.0)  # logvar channels pushed far out: clamped at 20
    assert vae.encode_moments(x)[1].max() == 20.0


def test_vae_attention_matches_explicit_softmax():
    attn = randomize(nets.VAEAttention(channels=32, groups=8))
    x = torch.randn(2, 32, 3, 5)
    h = attn.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    weights = torch.softmax(attn.to_q(h) @ attn.to_k(h).transpose(1, 2) / math.sqrt(32), dim=-1)
    expected = x + attn.to_out[0](weights @ attn.to_v(h)).transpose(1, 2).reshape(2, 32, 3, 5)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_downsample_pads_bottom_right_only():
    down = nets.VAEDownsample(1)
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # top-left tap: output (i, j) = x[2i, 2j]
    assert torch.equal(down(x)[0, 0], x[0, 0, ::2, ::2])
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap: x[2i+2, 2j+2], zero past the edge
    expected = torch.zeros(3, 3)
    expected[:2, :2] = x[0, 0, 2::2, 2::2]
    assert torch.equal(down(x)[0, 0], expected)


def test_vae_bf16_autocast_forward():
    vae = tiny_vae()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.autocast('cpu', dtype=torch.bfloat16):
        z = vae.encode(x, generator=torch.Generator().manual_seed(0))
        image = vae.decode(z)
    assert z.dtype == torch.float32 and image.shape == (1, 3, 16, 16) and image.isfinite().all()


# ----------------------------------------------------------------------------------------------------------------------
# Weight files.


def test_safetensors_reader_on_a_hand_written_file(tmp_path):
    blobs = {  # name: (dtype, shape, raw little-endian bytes)
        'weight': ('F32', [2, 3], struct.pack('<6f', 1, 2, 3, 4, 5, -6.5)),
        'steps': ('I64', [2], struct.pack('<2q', 7, -(2 ** 40))),
        'half': ('F16', [2], np.array([0.5, -2.0], dtype='<f2').tobytes()),
        'brain': ('BF16', [2], struct.pack('<2H', 0x3F80, 0xC040)),  # 1.0, -3.0: the top half of the float32 bits
        'flag': ('BOOL', [3], bytes([1, 0, 1])),
        'scalar': ('F64', [], struct.pack('<d', math.pi)),
        'empty': ('F32', [0, 4], b''),
    }
    header, data = {'__metadata__': {'format': 'pt'}}, b''
    for name, (dtype, shape, raw) in blobs.items():
        header[name] = {'dtype': dtype, 'shape': shape, 'data_offsets': [len(data), len(data) + len(raw)]}
        data += raw
    header_bytes = json.dumps(header).encode()  # unpadded: the data is not 8-byte aligned
    path = tmp_path / 'hand.safetensors'
    path.write_bytes(struct.pack('<Q', len(header_bytes)) + header_bytes + data)

    tensors = nets.load_safetensors(str(path))
    assert sorted(tensors) == sorted(blobs)
    assert torch.equal(tensors['weight'], torch.tensor([[1, 2, 3], [4, 5, -6.5]]))
    assert torch.equal(tensors['steps'], torch.tensor([7, -(2 ** 40)]))
    assert torch.equal(tensors['half'], torch.tensor([0.5, -2.0], dtype=torch.float16))
    assert torch.equal(tensors['brain'], torch.tensor([1.0, -3.0], dtype=torch.bfloat16))
    assert torch.equal(tensors['flag'], torch.tensor([True, False, True]))
    assert tensors['scalar'].shape == () and tensors['scalar'].item() == math.pi
    assert tensors['empty'].shape == (0, 4)


def test_safetensors_writer_layout_and_round_trip(tmp_path):
    tensors = {'a': torch.randn(3, 5), 'b': torch.arange(7), 'c': torch.randn(4).bfloat16(), 'd': torch.tensor(True),
               'e': torch.randn(2, 3).t()}  # non-contiguous
    path = tmp_path / 'out.safetensors'
    nets.save_safetensors(str(path), tensors, metadata={'step': 3})
    raw = path.read_bytes()
    header_len = struct.unpack('<Q', raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    assert header_len % 8 == 0 and header['__metadata__'] == {'step': '3'}
    assert header['a'] == {'dtype': 'F32', 'shape': [3, 5], 'data_offsets': [0, 60]}
    data_end = max(entry['data_offsets'][1] for key, entry in header.items() if key != '__metadata__')
    assert len(raw) == 8 + header_len + data_end
    loaded = nets.load_safetensors(str(path))
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ['out.safetensors']  # no temp file left


@pytest.mark.parametrize('corrupt', ['short', 'header_too_long', 'not_json', 'truncated_data', 'bad_dtype'])
def test_safetensors_reader_rejects_corrupt_files(tmp_path, corrupt):
    path = tmp_path / 'x.safetensors'
    nets.save_safetensors(str(path), {'w': torch.ones(4, 4)})
    raw = path.read_bytes()
    header_len = struct.unpack('<Q', raw[:8])[0]
    raw = {'short': raw[:5],
           'header_too_long': struct.pack('<Q', 10 ** 9) + raw[8:],
           'not_json': raw[:8] + b'{' * header_len + raw[8 + header_len:],
           'truncated_data': raw[:-4],
           'bad_dtype': raw.replace(b'"F32"', b'"Q99"')}[corrupt]
    path.write_bytes(raw)
    with pytest.raises(ValueError, match='not a valid safetensors file'):
        nets.load_safetensors(str(path))


def test_load_autoencoder_reads_every_released_layout(tmp_path):
    vae = tiny_vae()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    state = vae.state_dict()
    # sd-vae-ft-ema's layout on the Hub: diffusers keys with the old mid-block attention names.
    old_names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    old = {}
    for key, value in state.items():
        for new, name in old_names.items():
            key = key.replace(f'attentions.0.{new}.', f'attentions.0.{name}.')
        old[key] = value
    assert 'encoder.mid_block.attentions.0.proj_attn.weight' in old
    nets.save_safetensors(str(tmp_path / 'old.safetensors'), old)
    torch.save(state, tmp_path / 'new.bin')  # current diffusers layout
    ldm = {'first_stage_model.' + k: v for k, v in diffusers_to_ldm(state).items()}
    ldm['model.diffusion_model.out.0.weight'] = torch.ones(3)  # the rest of a full SD checkpoint: ignored
    assert 'first_stage_model.decoder.up.0.block.0.nin_shortcut.weight' in ldm
    assert ldm['first_stage_model.encoder.mid.attn_1.q.weight'].shape == (64, 64, 1, 1)
    torch.save({'state_dict': {**ldm, 'loss.logvar': torch.zeros(())}, 'global_step': 5}, tmp_path / 'ldm.ckpt')

    for name in ('old.safetensors', 'new.bin', 'ldm.ckpt'):
        loaded = nets.load_autoencoder(str(tmp_path / name))
        assert_same_network(vae, loaded)
        assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
        torch.testing.assert_close(loaded.decode(loaded.encode_moments(x)[0]), vae.decode(vae.encode_moments(x)[0]))


def test_load_autoencoder_offline_error_names_the_file_and_place(tmp_path):
    url = 'http://127.0.0.1:9/x.safetensors'  # discard port: nothing listens
    cache = tmp_path / 'cache'
    with pytest.raises(RuntimeError) as info:
        nets.load_autoencoder(url, cache_dir=str(cache))
    message = str(info.value)
    assert isinstance(info.value, nets.WeightsNotFoundError) and '\n' not in message
    assert url in message and str(cache) in message
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written
    # Saving the file where the message says makes the same call work offline.
    target = message.rsplit('save it as ', 1)[1]
    nets.save_safetensors(target, tiny_vae().state_dict())
    assert nets.load_autoencoder(url, cache_dir=str(cache)).latent_channels == 4
    with pytest.raises(nets.WeightsNotFoundError, match='not found'):
        nets.load_autoencoder(str(tmp_path / 'missing.safetensors'))


class NotATensor:
    pass


def test_load_weights_file_refuses_pickled_objects_and_garbage(tmp_path):
    torch.save({'weight': torch.ones(2), 'callback': NotATensor()}, tmp_path / 'objects.ckpt')
    with pytest.raises(ValueError, match='pickles a .*NotATensor object'):
        nets.load_weights_file(str(tmp_path / 'objects.ckpt'))
    (tmp_path / 'garbage.pt').write_bytes(b'not a torch file')
    with pytest.raises(ValueError, match='not a readable torch file'):
        nets.load_weights_file(str(tmp_path / 'garbage.pt'))
