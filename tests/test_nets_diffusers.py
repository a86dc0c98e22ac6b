"""Tests of the diffusers-layout loaders in nets.py: the VQ-f4 autoencoder, the diffusers DiT and LDM UNet maps,
LDM-BERT, the WordPiece tokenizer and whole pipeline folders (CPU, seconds). The files are written here in the
diffusers / CompVis layouts, key names spelled out from those layouts, with random weights."""
import json
import os

import pytest
import torch

import nets


def randomize(net, std=0.05, seed=0):
    """Overwrite every floating parameter with noise, so that zero-initialised layers stop hiding bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return net


def write_folder(folder, config, state_dict, weights='diffusion_pytorch_model.safetensors'):
    """A diffusers model folder: config.json and the weights (safetensors, or a torch pickle for .bin)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)
    path = os.path.join(folder, weights)
    if weights.endswith('.safetensors'):
        nets.save_safetensors(path, {key: value.contiguous() for key, value in state_dict.items()})
    else:
        torch.save(state_dict, path)


# ----------------------------------------------------------------------------------------------------------------------
# VQ-f4 autoencoder


def tiny_vq(seed=0):
    net = randomize(nets.VQModel(**nets.VQMODEL_TINY), seed=seed).eval()
    with torch.no_grad():
        net.quantize.embedding.weight.normal_(0, 0.3)  # codes spread like the latents, so quantising changes them
    return net


def vq_diffusers_config(widths=(32, 64), layers=1, latent=3, codes=64, scaling_factor=0.5):
    return {'_class_name': 'VQModel', '_diffusers_version': '0.30.0', 'act_fn': 'silu',
            'block_out_channels': list(widths), 'down_block_types': ['DownEncoderBlock2D'] * len(widths),
            'up_block_types': ['UpDecoderBlock2D'] * len(widths), 'in_channels': 3, 'out_channels': 3,
            'latent_channels': latent, 'layers_per_block': layers, 'norm_num_groups': 32, 'norm_type': 'group',
            'num_vq_embeddings': codes, 'sample_size': 32, 'scaling_factor': scaling_factor, 'vq_embed_dim': None}


def to_compvis_vq(state_dict, levels):
    """Our (diffusers) names -> CompVis/taming first-stage names, written out by hand: encoder.down.{i}.block.{j},
    decoder.up.{i} numbered from the highest resolution, mid.block_{1,2}, mid.attn_1.{norm,q,k,v,proj_out} as 1x1
    convs, norm_out, nin_shortcut."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[1] == 'down_blocks':
            kind = {'resnets': 'block', 'downsamplers': 'downsample'}[parts[3]]
            rest = parts[5:] if kind == 'downsample' else [parts[4], *parts[5:]]
            parts = [parts[0], 'down', parts[2], kind, *rest]
        elif parts[1] == 'up_blocks':
            kind = {'resnets': 'block', 'upsamplers': 'upsample'}[parts[3]]
            rest = parts[5:] if kind == 'upsample' else [parts[4], *parts[5:]]
            parts = [parts[0], 'up', str(levels - 1 - int(parts[2])), kind, *rest]
        elif parts[1] == 'mid_block' and parts[2] == 'resnets':
            parts = [parts[0], 'mid', f'block_{int(parts[3]) + 1}', *parts[4:]]
        elif parts[1] == 'mid_block':
            name = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out': 'proj_out'}[parts[4]]
            parts = [parts[0], 'mid', 'attn_1', name, parts[-1]]
            if name != 'norm' and parts[-1] == 'weight':
                value = value[:, :, None, None]
        elif parts[1] == 'conv_norm_out':
            parts = [parts[0], 'norm_out', *parts[2:]]
        key = '.'.join(parts).replace('conv_shortcut', 'nin_shortcut')
        out[key] = value
    return out


def test_default_vqmodel_is_ldm4_vq_f4():
    """LDM-4's first stage: 64x64x3 latents of 256x256 images, 8192 codes; 55,322,782 parameters, the count of
    diffusers' VQModel with the same config (checked outside the suite)."""
    with torch.device('meta'):
        net = nets.VQModel()
    assert sum(p.numel() for p in net.parameters()) == 55_322_782
    assert net.downscale_factor == 4 and net.latent_channels == 3
    assert net.quantize.embedding.weight.shape == (8192, 3)
    assert net.encoder.conv_out.weight.shape == (3, 512, 3, 3)  # one output per latent channel: no log-variance


def test_vq_encode_is_pre_quantisation_and_decode_quantises():
    net = tiny_vq()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        h = net.encode(x)
        assert h.shape == (2, 3, 8, 8)
        assert torch.equal(h, net.quant_conv(net.encoder(x)))
        # Nearest code by brute force, then the decoder of the codes.
        codes = net.quantize.embedding.weight
        nearest = ((h.permute(0, 2, 3, 1)[..., None, :] - codes) ** 2).sum(-1).argmin(-1)   # (B, h, w)
        z_q = codes[nearest].permute(0, 3, 1, 2)
        assert torch.equal(net.quantize(h)[1], nearest)
        assert torch.allclose(net.quantize(h)[0], z_q, atol=1e-6) and not torch.allclose(z_q, h, atol=1e-2)
        assert torch.allclose(net.decode(h), net.decode(z_q, force_not_quantize=True), atol=1e-5)
        assert not torch.allclose(net.decode(h), net.decode(h, force_not_quantize=True), atol=1e-3)
        assert torch.allclose(net(x), net.decode(h))


@pytest.mark.parametrize('weights', ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin'])
def test_load_vqmodel_from_a_diffusers_folder(tmp_path, weights):
    net = tiny_vq()
    write_folder(tmp_path / 'vqvae', vq_diffusers_config(), net.state_dict(), weights)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for source in (tmp_path / 'vqvae', tmp_path):  # the model folder, or a pipeline folder holding vqvae/
        loaded = nets.load_vqmodel(source)
        assert loaded.scaling_factor == 0.5 and not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded.decode(loaded.encode(x)), net.decode(net.encode(x)))


def test_load_vqmodel_from_a_compvis_checkpoint(tmp_path):
    net = tiny_vq()
    compvis = to_compvis_vq(net.state_dict(), levels=2)
    assert 'encoder.down.0.block.0.conv1.weight' in compvis and 'decoder.up.1.upsample.conv.weight' in compvis
    assert compvis['encoder.mid.attn_1.q.weight'].shape == (64, 64, 1, 1)
    full = {'state_dict': {**{f'first_stage_model.{k}': v for k, v in compvis.items()},
                           'model.diffusion_model.out.2.weight': torch.zeros(3), 'scale_factor': torch.tensor(0.7)}}
    torch.save(full, tmp_path / 'ldm.ckpt')
    torch.save({'state_dict': {**compvis, 'loss.discriminator.main.0.weight': torch.zeros(1)}}, tmp_path / 'vq.ckpt')
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for name, scale in (('ldm.ckpt', 0.7), ('vq.ckpt', 1.0)):
        loaded = nets.load_vqmodel(tmp_path / name)
        assert loaded.scaling_factor == pytest.approx(scale)
        assert loaded.config['num_vq_embeddings'] == 64 and loaded.config['block_out_channels'] == (32, 64)
        with torch.no_grad():
            assert torch.allclose(loaded(x), net(x), atol=1e-6)


def test_load_vqmodel_refuses_unsupported_variants(tmp_path):
    write_folder(tmp_path, {**vq_diffusers_config(), 'norm_type': 'spatial'}, tiny_vq().state_dict())
    with pytest.raises(ValueError, match='norm_type'):
        nets.load_vqmodel(tmp_path)
    with pytest.raises(nets.WeightsNotFoundError):
        nets.load_vqmodel(tmp_path / 'missing.ckpt')


# ----------------------------------------------------------------------------------------------------------------------
# diffusers DiT -> nets.DiT


def dit_to_diffusers(state_dict, depth):
    """nets.DiT keys -> diffusers DiTTransformer2DModel keys, written out by hand; every block gets the same
    timestep / label embedders, as diffusers' conversion of a facebookresearch checkpoint does."""
    out = {'pos_embed.proj.weight': state_dict['x_embedder.proj.weight'],
           'pos_embed.proj.bias': state_dict['x_embedder.proj.bias'],
           'proj_out_1.weight': state_dict['final_layer.adaLN_modulation.1.weight'],
           'proj_out_1.bias': state_dict['final_layer.adaLN_modulation.1.bias'],
           'proj_out_2.weight': state_dict['final_layer.linear.weight'],
           'proj_out_2.bias': state_dict['final_layer.linear.bias']}
    for i in range(depth):
        b, p = f'transformer_blocks.{i}', f'blocks.{i}'
        for leaf in ('weight', 'bias'):
            out[f'{b}.norm1.emb.timestep_embedder.linear_1.{leaf}'] = state_dict[f't_embedder.mlp.0.{leaf}']
            out[f'{b}.norm1.emb.timestep_embedder.linear_2.{leaf}'] = state_dict[f't_embedder.mlp.2.{leaf}']
            q, k, v = state_dict[f'{p}.attn.qkv.{leaf}'].chunk(3)
            out.update({f'{b}.attn1.to_q.{leaf}': q, f'{b}.attn1.to_k.{leaf}': k, f'{b}.attn1.to_v.{leaf}': v})
            out[f'{b}.attn1.to_out.0.{leaf}'] = state_dict[f'{p}.attn.proj.{leaf}']
            out[f'{b}.ff.net.0.proj.{leaf}'] = state_dict[f'{p}.mlp.fc1.{leaf}']
            out[f'{b}.ff.net.2.{leaf}'] = state_dict[f'{p}.mlp.fc2.{leaf}']
            out[f'{b}.norm1.linear.{leaf}'] = state_dict[f'{p}.adaLN_modulation.1.{leaf}']
        out[f'{b}.norm1.emb.class_embedder.embedding_table.weight'] = state_dict['y_embedder.embedding_table.weight']
    return out


DIT_CONFIG = {'_class_name': 'DiTTransformer2DModel', '_diffusers_version': '0.30.0',
              'activation_fn': 'gelu-approximate',
              'attention_bias': True, 'attention_head_dim': 16, 'dropout': 0.0, 'in_channels': 4,
              'norm_elementwise_affine': False, 'norm_eps': 1e-5, 'norm_num_groups': 32, 'norm_type': 'ada_norm_zero',
              'num_attention_heads': 2, 'num_embeds_ada_norm': 10, 'num_layers': 2, 'out_channels': 8,
              'patch_size': 2, 'sample_size': 8, 'upcast_attention': False}


def diffusers_dit_reference():
    """Our DiT with diffusers' two constants, random weights: the function a diffusers DiT folder must load as."""
    net = randomize(nets.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                             num_classes=10, timestep_freq_shift=1, mlp_norm_eps=1e-5)).eval()
    net.pos_embed.data = nets.dit_pos_embed(32, 4)[None]  # fixed, not a weight: diffusers computes it
    return net


def dit_inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0, 500, 999]), torch.tensor([1, 5, 10])


def test_diffusers_timestep_frequencies_are_shifted_by_one():
    """diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1): [cos | sin] at 10000^(-i/127)."""
    t = torch.tensor([0.0, 1.0, 37.0, 999.0])
    i = torch.arange(128, dtype=torch.float64)
    args = t.double()[:, None] * 10000.0 ** (-i / 127)
    expected = torch.cat([args.cos(), args.sin()], 1).float()
    assert torch.allclose(nets.dit_timestep_embedding(t, 256, freq_shift=1), expected, atol=2e-4)
    assert not torch.allclose(nets.dit_timestep_embedding(t, 256), expected, atol=1e-2)  # DiT's own: i / 128


def test_defaults_keep_facebookresearch_dit():
    net = nets.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    assert net.t_embedder.freq_shift == 0 and net.blocks[0].norm2.eps == 1e-6


def test_dit_from_a_diffusers_folder(tmp_path):
    reference = diffusers_dit_reference()
    write_folder(tmp_path, DIT_CONFIG, dit_to_diffusers(reference.state_dict(), depth=2))
    net = nets.dit_from_diffusers(DIT_CONFIG, nets.read_diffusers_weights(tmp_path))
    assert type(net) is nets.DiT and net.learn_sigma and net.num_classes == 10 and net.class_dropout_prob > 0
    x, t, y = dit_inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, y), reference(x, t, y))
        noise = torch.randn(3, 32)
        assert torch.equal(net(x, t, y, embedding_noise=noise), reference(x, t, y, embedding_noise=noise))


def test_dit_from_diffusers_keeps_per_block_embedders():
    """A DiT trained in diffusers has its own timestep / label embedders in every block; the final layer uses
    block 0's. The loader keeps them (DiTPerBlockConditioning), which changes the output."""
    reference = diffusers_dit_reference()
    state_dict = dit_to_diffusers(reference.state_dict(), depth=2)
    gen = torch.Generator().manual_seed(5)
    for key in [k for k in state_dict if k.startswith('transformer_blocks.1.norm1.emb.')]:
        state_dict[key] = state_dict[key] + 0.05 * torch.randn(state_dict[key].shape, generator=gen)
    net = nets.dit_from_diffusers(DIT_CONFIG, state_dict)
    assert isinstance(net, nets.DiTPerBlockConditioning) and net.config['per_block_conditioning']
    x, t, y = dit_inputs()
    with torch.no_grad():
        out = net(x, t, y)
        assert not torch.allclose(out, reference(x, t, y), atol=1e-4)
        # Block 1 conditioned on its own embedders, everything else as in the reference.
        c0 = reference.t_embedder(t) + reference.y_embedder(y)
        c1 = net.block_t_embedders[0](t) + net.block_y_embedders[0](y)
        h = reference.blocks[1](reference.blocks[0](reference.x_embedder(x) + reference.pos_embed, c0), c1)
        assert torch.allclose(out, reference.unpatchify(reference.final_layer(h, c0)), atol=1e-6)


def test_dit_from_diffusers_refuses_other_transformers():
    with pytest.raises(ValueError, match='norm_type'):
        nets.dit_from_diffusers({**DIT_CONFIG, 'norm_type': 'ada_norm_single'}, {})
    with pytest.raises(ValueError, match='unexpected key'):
        nets.dit_state_dict_from_diffusers({'transformer_blocks.0.attn2.to_q.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='interpolation scale of 2'):  # Transformer2DModel at sample_size 128
        nets.dit_from_diffusers({**DIT_CONFIG, '_class_name': 'Transformer2DModel', 'sample_size': 128}, {})


# ----------------------------------------------------------------------------------------------------------------------
# diffusers LDM UNet -> nets.UNet


def unet_to_diffusers(state_dict, levels, num_blocks, attention_levels, arch):
    """nets.UNet keys -> diffusers UNet2DConditionModel (arch 'ldm') / UNet2DModel (arch 'adm') keys, by hand."""
    resnet = {'in_layers.0': 'norm1', 'in_layers.2': 'conv1', 'emb_layers.1': 'time_emb_proj', 'out_layers.0': 'norm2',
              'out_layers.3': 'conv2', 'skip_connection': 'conv_shortcut'}
    modules = {'input_blocks.0.0': 'conv_in', 'time_embed.0': 'time_embedding.linear_1',
               'time_embed.2': 'time_embedding.linear_2', 'label_emb': 'class_embedding', 'out.0': 'conv_norm_out',
               'out.2': 'conv_out', 'middle_block.0': 'mid_block.resnets.0', 'middle_block.1': 'mid_block.attentions.0',
               'middle_block.2': 'mid_block.resnets.1'}
    i = 1
    for level in range(levels):
        for j in range(num_blocks):
            modules[f'input_blocks.{i}.0'] = f'down_blocks.{level}.resnets.{j}'
            modules[f'input_blocks.{i}.1'] = f'down_blocks.{level}.attentions.{j}'
            i += 1
        if level < levels - 1:
            modules[f'input_blocks.{i}.0.op'] = f'down_blocks.{level}.downsamplers.0.conv'
            i += 1
    i = 0
    for up in range(levels):
        level = levels - 1 - up
        for j in range(num_blocks + 1):
            modules[f'output_blocks.{i}.0'] = f'up_blocks.{up}.resnets.{j}'
            modules[f'output_blocks.{i}.1'] = f'up_blocks.{up}.attentions.{j}'
            if level > 0 and j == num_blocks:
                modules[f'output_blocks.{i}.{2 if level in attention_levels else 1}.conv'] = \
                    f'up_blocks.{up}.upsamplers.0.conv'
            i += 1
    out = {}
    for key, value in state_dict.items():
        module = max((m for m in modules if key.startswith(m + '.')), key=len)
        rest = key[len(module) + 1:]
        target = modules[module]
        if '.resnets.' in target:
            name, leaf = rest.rsplit('.', 1)
            rest = f'{resnet[name]}.{leaf}'
        elif '.attentions.' in target and arch == 'adm':
            name, leaf = rest.rsplit('.', 1)
            if name == 'qkv':
                for part, chunk in zip(('to_q', 'to_k', 'to_v'), value.chunk(3)):
                    out[f'{target}.{part}.{leaf}'] = chunk[:, :, 0] if leaf == 'weight' else chunk
                continue
            name = {'norm': 'group_norm', 'proj_out': 'to_out.0'}[name]
            value = value[:, :, 0] if name == 'to_out.0' and leaf == 'weight' else value
            rest = f'{name}.{leaf}'
        out[f'{target}.{rest}'] = value
    return out


def unet_diffusers_config(arch, **overrides):
    if arch == 'ldm':
        config = {'_class_name': 'UNet2DConditionModel', 'act_fn': 'silu', 'attention_head_dim': 2,
                  'block_out_channels': [32, 64, 64], 'center_input_sample': False, 'cross_attention_dim': 24,
                  'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
                  'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 3,
                  'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-05, 'norm_num_groups': 32,
                  'out_channels': 3, 'sample_size': 16,
                  'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']}
    else:
        config = {'_class_name': 'UNet2DModel', 'act_fn': 'silu', 'attention_head_dim': 16,
                  'block_out_channels': [32, 64, 64], 'down_block_types': ['DownBlock2D', 'AttnDownBlock2D',
                                                                           'AttnDownBlock2D'],
                  'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 3,
                  'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-05, 'norm_num_groups': 32,
                  'out_channels': 3, 'sample_size': 16, 'time_embedding_type': 'positional',
                  'up_block_types': ['AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D']}
    return {**config, **overrides}


@pytest.mark.parametrize('arch,overrides,attention_levels', [
    ('ldm', {}, [0, 1]),
    ('ldm', {'num_class_embeds': 7, 'attention_head_dim': [2, 4, 4]}, [0, 1]),
    ('adm', {}, [1, 2]),
])
def test_unet_from_a_diffusers_folder(tmp_path, arch, overrides, attention_levels):
    config = unet_diffusers_config(arch, **overrides)
    heads = dict(num_heads=2) if arch == 'ldm' and 'attention_head_dim' not in overrides else dict(num_head_channels=16)
    reference = randomize(nets.UNet(
        arch=arch, img_resolution=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2),
        num_blocks=2, attn_resolutions=tuple(16 >> level for level in attention_levels),
        label_dim=config.get('num_class_embeds', 0), **heads,
        **(dict(context_dim=24) if arch == 'ldm' else dict(use_new_attention_order=True)))).eval()
    state_dict = unet_to_diffusers(reference.state_dict(), 3, 2, attention_levels, arch)
    if arch == 'ldm':
        assert state_dict['down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight'].shape == (64, 24)
        assert state_dict['up_blocks.1.upsamplers.0.conv.weight'].shape == (64, 64, 3, 3)
    else:
        assert state_dict['mid_block.attentions.0.to_q.weight'].shape == (64, 64)
    write_folder(tmp_path, config, state_dict)
    net = nets.unet_from_diffusers(config, nets.read_diffusers_weights(tmp_path))
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([3, 700])
    kwargs = dict(context=torch.randn(2, 5, 24, generator=gen)) if arch == 'ldm' else {}
    if 'num_class_embeds' in config:
        kwargs['class_labels'] = torch.tensor([1, 6])
    with torch.no_grad():
        assert torch.equal(net(x, t, **kwargs), reference(x, t, **kwargs))


def test_unet_linear_projection_is_a_1x1_conv():
    config = unet_diffusers_config('ldm', use_linear_projection=True)
    reference = randomize(nets.UNet(arch='ldm', img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                                    channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16, 8), num_heads=2,
                                    context_dim=24)).eval()
    state_dict = unet_to_diffusers(reference.state_dict(), 3, 2, [0, 1], 'ldm')
    state_dict = {k: v[:, :, 0, 0] if k.endswith(('proj_in.weight', 'proj_out.weight')) and 'attentions' in k else v
                  for k, v in state_dict.items()}
    net = nets.unet_from_diffusers(config, state_dict)
    x, ctx = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 24)
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([9]), context=ctx), reference(x, torch.tensor([9]), context=ctx))


@pytest.mark.parametrize('overrides,match', [({'freq_shift': 1}, 'freq_shift'),
                                             ({'flip_sin_to_cos': False}, 'flip_sin_to_cos'),
                                             ({'down_block_types': ['CrossAttnDownBlock2D', 'DownBlock2D',
                                                                    'CrossAttnDownBlock2D']}, 'blocks'),
                                             ({'addition_embed_type': 'text'}, 'addition_embed_type')])
def test_unet_from_diffusers_refuses_what_nets_unet_does_not_express(overrides, match):
    with pytest.raises(ValueError, match=match):
        nets.unet_from_diffusers(unet_diffusers_config('ldm', **overrides), {})


# ----------------------------------------------------------------------------------------------------------------------
# LDM-BERT and the WordPiece tokenizer


def ldmbert_reference(sd, ids, layers, heads, head_dim):
    """LDM-BERT written out from its state dict keys (diffusers LDMBertModel): explicit softmax attention."""
    ln = torch.nn.functional.layer_norm
    x = sd['model.embed_tokens.weight'][ids] + sd['model.embed_positions.weight'][:ids.shape[1]]
    for i in range(layers):
        p = f'model.layers.{i}.'
        h = ln(x, x.shape[-1:], sd[p + 'self_attn_layer_norm.weight'], sd[p + 'self_attn_layer_norm.bias'])
        q, k, v = (h @ sd[p + f'self_attn.{n}_proj.weight'].T for n in 'qkv')
        q, k, v = (z.reshape(*z.shape[:2], heads, head_dim).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) * head_dim ** -0.5, -1) @ v
        x = x + a.transpose(1, 2).flatten(2) @ sd[p + 'self_attn.out_proj.weight'].T + sd[p + 'self_attn.out_proj.bias']
        h = ln(x, x.shape[-1:], sd[p + 'final_layer_norm.weight'], sd[p + 'final_layer_norm.bias'])
        h = torch.nn.functional.gelu(h @ sd[p + 'fc1.weight'].T + sd[p + 'fc1.bias'])
        x = x + h @ sd[p + 'fc2.weight'].T + sd[p + 'fc2.bias']
    return ln(x, x.shape[-1:], sd['model.layer_norm.weight'], sd['model.layer_norm.bias'])


def test_ldmbert_matches_its_written_out_function():
    config = {'architectures': ['LDMBertModel'], 'model_type': 'ldmbert', 'activation_function': 'gelu',
              'vocab_size': 50, 'max_position_embeddings': 77, 'd_model': 32, 'encoder_layers': 2,
              'encoder_attention_heads': 3, 'head_dim': 8, 'encoder_ffn_dim': 64}  # 3 x 8 heads != width 32
    gen = torch.Generator().manual_seed(4)
    shapes = {'model.embed_tokens.weight': (50, 32), 'model.embed_positions.weight': (77, 32),
              'model.layer_norm.weight': (32,), 'model.layer_norm.bias': (32,), 'to_logits.weight': (50, 32),
              'to_logits.bias': (50,)}
    for i in range(2):
        p = f'model.layers.{i}.'
        shapes.update({p + 'self_attn.k_proj.weight': (24, 32), p + 'self_attn.v_proj.weight': (24, 32),
                       p + 'self_attn.q_proj.weight': (24, 32), p + 'self_attn.out_proj.weight': (32, 24),
                       p + 'self_attn.out_proj.bias': (32,), p + 'self_attn_layer_norm.weight': (32,),
                       p + 'self_attn_layer_norm.bias': (32,), p + 'fc1.weight': (64, 32), p + 'fc1.bias': (64,),
                       p + 'fc2.weight': (32, 64), p + 'fc2.bias': (32,), p + 'final_layer_norm.weight': (32,),
                       p + 'final_layer_norm.bias': (32,)})
    sd = {key: torch.randn(shape, generator=gen) * 0.2 for key, shape in shapes.items()}
    net = nets.ldmbert_from_config(config, sd)
    ids = torch.randint(0, 50, (2, 77), generator=gen)
    with torch.no_grad():
        assert torch.allclose(net(ids), ldmbert_reference(sd, ids, 2, 3, 8), atol=1e-5)
    with torch.device('meta'):
        default = nets.LDMBert()
    assert sum(p.numel() for p in default.parameters()) == 581_994_042  # diffusers' LDMBertModel(LDMBertConfig())
    assert len(default.model.layers) == 32 and default.model.embed_tokens.weight.shape == (30522, 1280)


VOCAB = ['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '!', ',', '.', '?', '’', '-', 'a', 'the', 'cat',
         'photo', 'of', 'un', '##aff', '##able', 'play', '##ing', 'cafe', 'naive', '我', '爱', 'x', '##x', 'abc',
         'ab', '##c', 'over']  # ids 0 .. 31


@pytest.fixture
def tokenizer(tmp_path):
    (tmp_path / 'vocab.txt').write_text('\n'.join(VOCAB) + '\n', encoding='utf-8')
    return nets.WordPieceTokenizer(tmp_path / 'vocab.txt', max_length=8)


@pytest.mark.parametrize('text,ids', [  # the ids of transformers' BertTokenizer (fast and slow) on VOCAB
    ('A photo of the cat.', [3, 12, 15, 16, 13, 14, 8, 4]),            # lower case, punctuation split
    ('Unaffable PLAYING', [3, 17, 18, 19, 20, 21, 4, 0]),              # greedy longest-match-first, '##' pieces
    ('Café  naïve!', [3, 22, 23, 6, 4, 0, 0, 0]),                      # accents stripped, whitespace runs
    ('我爱x', [3, 24, 25, 26, 4, 0, 0, 0]),                               # spaces around CJK ideographs
    ('abcd xx', [3, 2, 26, 27, 4, 0, 0, 0]),                            # an uncoverable word is one [UNK]
    ('a\x00b\ufffd\u200dc ab\u00a0c', [3, 28, 29, 2, 4, 0, 0, 0]),     # controls dropped, NBSP is a space
    ('cat [MASK] over[SEP]', [3, 14, 5, 31, 4, 4, 0, 0]),              # special tokens in the text kept whole
    ('x' * 101, [3, 2, 4, 0, 0, 0, 0, 0]),                              # > 100 characters: [UNK]
    ('cat cat cat cat cat cat cat cat', [3, 14, 14, 14, 14, 14, 14, 4]),  # truncated to max_length
    ('', [3, 4, 0, 0, 0, 0, 0, 0]),
])
def test_wordpiece_ids(tokenizer, text, ids):
    assert tokenizer(text).tolist() == [ids]


def test_wordpiece_batch_and_folder_options(tmp_path, tokenizer):
    assert tokenizer(['cat', 'a cat']).shape == (2, 8)
    assert tokenizer.tokenize("don’t-play") == ['[UNK]', '’', '[UNK]', '-', 'play']
    (tmp_path / 'tok').mkdir()
    (tmp_path / 'tok' / 'vocab.txt').write_text('\n'.join(VOCAB) + '\nCat\n', encoding='utf-8')
    (tmp_path / 'tok' / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': False}))
    cased = nets.WordPieceTokenizer.from_folder(tmp_path / 'tok')
    assert cased('Cat cat').tolist()[0][:4] == [3, 32, 14, 4] and cased.max_length == 77


# ----------------------------------------------------------------------------------------------------------------------
# Whole pipeline folders (model_index.json + one folder per component), local and from a stand-in Hub


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)


def tiny_kl():
    return randomize(nets.AutoencoderKL(**nets.AUTOENCODER_TINY, scaling_factor=0.3), seed=7).eval()


KL_CONFIG = {'_class_name': 'AutoencoderKL', 'act_fn': 'silu', 'block_out_channels': [32, 64],
             'down_block_types': ['DownEncoderBlock2D'] * 2, 'up_block_types': ['UpDecoderBlock2D'] * 2,
             'in_channels': 3, 'out_channels': 3, 'latent_channels': 4, 'layers_per_block': 1, 'norm_num_groups': 32,
             'sample_size': 32, 'scaling_factor': 0.3}


def write_dit_pipeline(folder):
    """A DiTPipeline folder as DiT-XL-2-256 is laid out: transformer/, vae/, scheduler/, id2label in model_index."""
    dit, kl = diffusers_dit_reference(), tiny_kl()
    write_json(os.path.join(folder, 'model_index.json'), {
        '_class_name': 'DiTPipeline', '_diffusers_version': '0.12.0.dev0',
        'scheduler': ['diffusers', 'DDIMScheduler'], 'transformer': ['diffusers', 'Transformer2DModel'],
        'vae': ['diffusers', 'AutoencoderKL'], 'id2label': {str(i): f'class {i}, alias {i}' for i in range(10)}})
    write_folder(os.path.join(folder, 'transformer'), {**DIT_CONFIG, '_class_name': 'Transformer2DModel'},
                 dit_to_diffusers(dit.state_dict(), depth=2))
    write_folder(os.path.join(folder, 'vae'), KL_CONFIG, kl.state_dict())
    write_json(os.path.join(folder, 'scheduler', 'scheduler_config.json'), {
        '_class_name': 'DDIMScheduler', 'beta_end': 0.02, 'beta_schedule': 'linear', 'beta_start': 0.0001,
        'clip_sample': False, 'num_train_timesteps': 1000})
    return dit, kl


def check_dit_pipeline(parts, dit, kl):
    assert parts['pipeline'] == 'DiTPipeline' and parts['network_kind'] == 'dit' and parts['autoencoder_kind'] == 'kl'
    x, t, y = dit_inputs()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(parts['network'](x, t, y), dit(x, t, y))
        assert torch.equal(parts['autoencoder'].decode(z), kl.decode(z)) and parts['autoencoder'].scaling_factor == 0.3
    assert parts['scheduler']['beta_schedule'] == 'linear' and parts['scheduler']['prediction_type'] == 'epsilon'
    assert parts['id2label'][3] == 'class 3, alias 3' and parts['text_encoder'] is None


def test_dit_pipeline_folder(tmp_path):
    dit, kl = write_dit_pipeline(tmp_path)
    check_dit_pipeline(nets.load_diffusers_pipeline(tmp_path), dit, kl)


def test_dit_pipeline_from_a_local_hub(tmp_path, monkeypatch):
    from edm_layouts import hf_repo_folder, serve_folder
    dit, kl = write_dit_pipeline(hf_repo_folder(tmp_path / 'hub', 'DiffusionNoise/dit-tiny'))
    with serve_folder(tmp_path / 'hub') as base_url:
        monkeypatch.setenv('HF_ENDPOINT', base_url)
        parts = nets.load_diffusers_pipeline('DiffusionNoise/dit-tiny', cache_dir=tmp_path / 'cache')
        check_dit_pipeline(parts, dit, kl)
        fetched = {path.split('/resolve/main/')[1] for path, _ in base_url.server.requests if ' ' not in path}
        assert {'model_index.json', 'transformer/config.json', 'transformer/diffusion_pytorch_model.safetensors',
                'vae/diffusion_pytorch_model.safetensors', 'scheduler/scheduler_config.json'} <= fetched
        count = len(base_url.server.requests)
        nets.load_diffusers_pipeline('hf://DiffusionNoise/dit-tiny', cache_dir=tmp_path / 'cache')
        assert len(base_url.server.requests) == count  # everything from the cache
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens: offline
    with pytest.raises(nets.WeightsNotFoundError, match=r'DiffusionNoise/other/resolve/main/model_index\.json'):
        nets.load_diffusers_pipeline('DiffusionNoise/other', cache_dir=tmp_path / 'cache')


def write_text_pipeline(folder, tokenizer_json=False):
    """An LDMTextToImagePipeline folder: vqvae/ (VQModel), bert/ (LDMBertModel), tokenizer/, unet/, scheduler/."""
    vq = tiny_vq()
    unet = randomize(nets.UNet(arch='ldm', img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                               channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16, 8), num_heads=2,
                               context_dim=24)).eval()
    bert = randomize(nets.LDMBert(vocab_size=len(VOCAB), d_model=24, encoder_layers=1, encoder_attention_heads=2,
                                  head_dim=12, encoder_ffn_dim=48), std=0.2).eval()
    write_json(os.path.join(folder, 'model_index.json'), {
        '_class_name': 'LDMTextToImagePipeline', 'bert': ['latent_diffusion', 'LDMBertModel'],
        'scheduler': ['diffusers', 'DDIMScheduler'], 'tokenizer': ['transformers', 'BertTokenizer'],
        'unet': ['diffusers', 'UNet2DConditionModel'], 'vqvae': ['diffusers', 'VQModel']})
    write_folder(os.path.join(folder, 'vqvae'), vq_diffusers_config(), vq.state_dict(), 'diffusion_pytorch_model.bin')
    write_folder(os.path.join(folder, 'unet'), unet_diffusers_config('ldm'),
                 unet_to_diffusers(unet.state_dict(), 3, 2, [0, 1], 'ldm'))
    write_folder(os.path.join(folder, 'bert'), {
        'architectures': ['LDMBertModel'], 'model_type': 'ldmbert', 'activation_function': 'gelu',
        'vocab_size': len(VOCAB), 'd_model': 24, 'encoder_layers': 1, 'encoder_attention_heads': 2, 'head_dim': 12,
        'encoder_ffn_dim': 48, 'max_position_embeddings': 77}, bert.state_dict(), 'model.safetensors')
    os.makedirs(os.path.join(folder, 'tokenizer'))
    if tokenizer_json:  # transformers 5 writes only tokenizer.json
        write_json(os.path.join(folder, 'tokenizer', 'tokenizer.json'), {
            'normalizer': {'type': 'BertNormalizer', 'clean_text': True, 'handle_chinese_chars': True,
                           'strip_accents': None, 'lowercase': True}, 'pre_tokenizer': {'type': 'BertPreTokenizer'},
            'model': {'type': 'WordPiece', 'unk_token': '[UNK]', 'continuing_subword_prefix': '##',
                      'max_input_chars_per_word': 100, 'vocab': {token: i for i, token in enumerate(VOCAB)}}})
    else:  # transformers 4: vocab.txt and tokenizer_config.json
        with open(os.path.join(folder, 'tokenizer', 'vocab.txt'), 'w', encoding='utf-8') as f:
            f.write('\n'.join(VOCAB) + '\n')
        write_json(os.path.join(folder, 'tokenizer', 'tokenizer_config.json'), {'do_lower_case': True,
                                                                                 'model_max_length': 77})
    write_json(os.path.join(folder, 'scheduler', 'scheduler_config.json'), {
        '_class_name': 'DDIMScheduler', 'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'beta_start': 0.00085,
        'num_train_timesteps': 1000, 'prediction_type': 'epsilon'})
    return vq, unet, bert


@pytest.mark.parametrize('tokenizer_json', [False, True])
def test_text_to_image_pipeline_folder(tmp_path, tokenizer_json):
    vq, unet, bert = write_text_pipeline(tmp_path, tokenizer_json)
    parts = nets.load_diffusers_pipeline(tmp_path)
    assert parts['network_kind'] == 'unet' and parts['autoencoder_kind'] == 'vq' and parts['class_embedder'] is None
    ids = parts['tokenizer'](['A photo of the cat.', ''])
    assert ids.shape == (2, 77) and ids[0, :8].tolist() == [3, 12, 15, 16, 13, 14, 8, 4]
    x, t, h = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        context = parts['text_encoder'](ids)
        assert torch.equal(context, bert(ids)) and context.shape == (2, 77, 24)
        assert torch.equal(parts['network'](x, t, context=context), unet(x, t, context=context))
        assert torch.equal(parts['autoencoder'].decode(h), vq.decode(h))
    betas = nets.diffusers_betas(parts['scheduler'])
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)
    assert betas[500].item() == pytest.approx(((0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * 500 / 999)) ** 2)


def test_custom_class_to_image_pipeline(tmp_path):
    """The authors' LDMClassToImagePipeline is not in diffusers: its own components load when their weights are one
    embedding table (the class embedder); anything else is one clear error, or recorded with skip_unknown."""
    vq, unet, bert = write_text_pipeline(tmp_path)
    table = torch.randn(11, 24)
    index = {'_class_name': 'LDMClassToImagePipeline', 'unet': ['diffusers', 'UNet2DConditionModel'],
             'vqvae': ['diffusers', 'VQModel'], 'scheduler': ['diffusers', 'DDIMScheduler'],
             'class_embedder': ['pipeline_latent_diffusion', 'ClassEmbedder']}
    write_json(tmp_path / 'model_index.json', index)
    write_folder(tmp_path / 'class_embedder', {'n_classes': 11, 'embed_dim': 24, 'id2label': {'0': 'tench'}},
                 {'embedding.weight': table})
    parts = nets.load_diffusers_pipeline(tmp_path)
    assert torch.equal(parts['class_embedder'](torch.tensor([10])), table[10:])
    assert parts['id2label'] == {0: 'tench'}  # from a component's config when model_index.json has none
    assert parts['tokenizer'] is None and parts['unsupported'] == {}
    write_json(tmp_path / 'model_index.json', {**index, 'extra': ['custom_module', 'Mystery']})
    with pytest.raises(ValueError, match=r"component 'extra' \(custom_module\.Mystery\) is not supported"):
        nets.load_diffusers_pipeline(tmp_path)
    parts = nets.load_diffusers_pipeline(tmp_path, skip_unknown=True)
    assert list(parts['unsupported']) == ['extra'] and parts['network'] is not None


def test_load_vqmodel_from_a_hub_pipeline_repo(tmp_path, monkeypatch):
    """A bare repo id of a pipeline (no config.json at its root) falls back to its vqvae/ folder."""
    from edm_layouts import hf_repo_folder, serve_folder
    vq, _, _ = write_text_pipeline(hf_repo_folder(tmp_path / 'hub', 'DiffusionNoise/ldm-tiny'))
    h = torch.randn(1, 3, 8, 8)
    with serve_folder(tmp_path / 'hub') as base_url:
        monkeypatch.setenv('HF_ENDPOINT', base_url)
        for source in ('DiffusionNoise/ldm-tiny', 'hf://DiffusionNoise/ldm-tiny/vqvae'):
            loaded = nets.load_vqmodel(source, cache_dir=tmp_path / 'cache')
            with torch.no_grad():
                assert torch.equal(loaded.decode(h), vq.decode(h))
        # A URL is not a repo: its 404 is reported as it is, with no vqvae/ fallback.
        with pytest.raises(nets.WeightsNotFoundError, match=r'missing\.ckpt \(HTTP 404\)'):
            nets.load_vqmodel(f'{base_url}/missing.ckpt', cache_dir=tmp_path / 'cache')


def test_unet2dmodel_with_pre_refactor_attention_names():
    """diffusers files written before its attention refactor name the self-attention query / key / value /
    proj_attn (UNet2DModel of the early LDM pipelines)."""
    reference = randomize(nets.UNet(arch='adm', img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                                    channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8, 4),
                                    num_head_channels=16, use_new_attention_order=True)).eval()
    old = {'.to_q.': '.query.', '.to_k.': '.key.', '.to_v.': '.value.', '.to_out.0.': '.proj_attn.'}
    state_dict = {}
    for key, value in unet_to_diffusers(reference.state_dict(), 3, 2, [1, 2], 'adm').items():
        for new_name, old_name in old.items():
            key = key.replace(new_name, old_name)
        state_dict[key] = value
    assert 'mid_block.attentions.0.proj_attn.weight' in state_dict
    net = nets.unet_from_diffusers(unet_diffusers_config('adm'), state_dict)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([5])), reference(x, torch.tensor([5])))
