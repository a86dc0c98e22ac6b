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
