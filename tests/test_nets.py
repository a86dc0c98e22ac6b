"""Tests of the UNet in nets.py (CPU, seconds): exact parameter counts and state-dict layouts of the official
networks, outputs equal to the official implementations on fixed weights, initialisation, shapes of every preset,
round trips, determinism, bf16 autocast and released-checkpoint loading."""
import math

import pytest
import torch
import torch.nn.functional as F

import nets


def build_on_meta(**kwargs):
    """The network's structure without allocating or initialising weights (for counting big models)."""
    with torch.device('meta'):
        return nets.UNet(**kwargs)


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def fill_deterministic(net):
    """Weights drawn from a fixed generator in parameter order, independent of how nets.py initialises. The same
    fill was applied to the official implementations to record the reference outputs below."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in net.named_parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            is_norm_gain = p.ndim == 1 and 'norm' in name and name.endswith('weight')
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if is_norm_gain else 0.0))
    return net


def randomize_(net, std=0.05):
    """Perturb every parameter so that zero-initialised output layers no longer hide the network's behaviour."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * std)
    return net


def small(name, **overrides):
    """A preset shrunk for CPU: fewer channels and blocks; arch, channel_mult, attention and flags unchanged."""
    kwargs = {**nets.UNET_PRESETS[name], 'model_channels': 32, 'num_blocks': 1, **overrides}
    if kwargs.get('num_head_channels', -1) > 0:
        kwargs['num_head_channels'] = 16
    return kwargs


def call(net, x, t, **kwargs):
    """Forward with a context for LDM networks (one token, like the class embedding of LDM cin256)."""
    if net.arch == 'ldm' and 'context' not in kwargs:
        kwargs['context'] = torch.randn(x.shape[0], 1, net.config['context_dim'] or 1)
    return net(x, t, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Parameter counts and state-dict layouts of the published configurations


@pytest.mark.parametrize('kwargs, expected', [
    # NVlabs/edm SongUNet counts (specs: EDM networks.py instantiated on CPU).
    (nets.UNET_PRESETS['ddpmpp-cifar10'], 55_733_891),
    ({**nets.UNET_PRESETS['ddpmpp-cifar10'], 'augment_dim': 0}, 55_732_739),
    ({**nets.UNET_PRESETS['ddpmpp-cifar10'], 'label_dim': 10}, 55_735_299),
    (nets.UNET_PRESETS['ddpmpp-64'], 61_805_571),
    # ambient-diffusion networks.py: 6 channels (image + mask), with and without its gated convolutions.
    ({**nets.UNET_PRESETS['ddpmpp-cifar10'], 'in_channels': 6, 'out_channels': 6}, 55_744_262),
    ({**nets.UNET_PRESETS['ddpmpp-cifar10'], 'in_channels': 6, 'out_channels': 6, 'gated': True}, 106_752_006),
    # guided-diffusion UNetModel with the DDPM-IP README configs.
    (nets.UNET_PRESETS['adm-cifar10'], 57_094_662),
    (nets.UNET_PRESETS['adm-lsun64'], 295_136_454),
    (nets.UNET_PRESETS['adm-ffhq128'], 542_811_398),
    # latent-diffusion UNetModel with cin256-v2.yaml's unet_config (counted by instantiating it).
    (nets.UNET_PRESETS['ldm-cin256'], 400_920_579),
])
def test_parameter_counts_match_official(kwargs, expected):
    assert num_params(build_on_meta(**kwargs)) == expected


def test_state_dict_sizes_match_official():
    # EDM's DDPM++ has 425 entries: these 417 parameters plus 8 resample-filter buffers we do not need.
    assert len(build_on_meta(**nets.UNET_PRESETS['ddpmpp-cifar10']).state_dict()) == 417
    for name, expected in [('adm-cifar10', 494), ('adm-lsun64', 540), ('adm-ffhq128', 638)]:
        assert len(build_on_meta(**nets.UNET_PRESETS[name]).state_dict()) == expected, name


def test_adm_state_dict_layout_is_guided_diffusions():
    """Key names and shapes of the DDPM-IP CIFAR-10 model, written out from guided-diffusion's UNetModel."""
    shapes = {k: tuple(v.shape) for k, v in build_on_meta(**nets.UNET_PRESETS['adm-cifar10']).state_dict().items()}
    expected = {
        'time_embed.0.weight': (512, 128), 'time_embed.0.bias': (512,), 'time_embed.2.weight': (512, 512),
        'input_blocks.0.0.weight': (128, 3, 3, 3), 'input_blocks.0.0.bias': (128,),
        # A plain ResBlock at 32x32 with scale-shift norm (emb_layers give 2 x 128).
        'input_blocks.1.0.in_layers.0.weight': (128,), 'input_blocks.1.0.in_layers.2.weight': (128, 128, 3, 3),
        'input_blocks.1.0.emb_layers.1.weight': (256, 512), 'input_blocks.1.0.emb_layers.1.bias': (256,),
        'input_blocks.1.0.out_layers.0.weight': (128,), 'input_blocks.1.0.out_layers.3.weight': (128, 128, 3, 3),
        # The down ResBlock (resblock_updown), then a widening ResBlock with a 1x1 skip and 8-head attention.
        'input_blocks.4.0.in_layers.2.weight': (128, 128, 3, 3),
        'input_blocks.5.0.skip_connection.weight': (256, 128, 1, 1), 'input_blocks.5.1.norm.weight': (256,),
        'input_blocks.5.1.qkv.weight': (768, 256, 1), 'input_blocks.5.1.qkv.bias': (768,),
        'input_blocks.5.1.proj_out.weight': (256, 256, 1), 'input_blocks.11.1.qkv.weight': (768, 256, 1),
        'input_blocks.15.0.out_layers.3.weight': (256, 256, 3, 3),
        'middle_block.0.in_layers.0.weight': (256,), 'middle_block.1.qkv.weight': (768, 256, 1),
        'middle_block.2.out_layers.3.bias': (256,),
        'output_blocks.0.0.in_layers.0.weight': (512,), 'output_blocks.0.0.skip_connection.weight': (256, 512, 1, 1),
        'output_blocks.3.1.in_layers.2.weight': (256, 256, 3, 3),      # up ResBlock right after the 4x4 level
        'output_blocks.7.1.qkv.weight': (768, 256, 1), 'output_blocks.7.2.emb_layers.1.weight': (512, 512),
        'output_blocks.11.0.in_layers.0.weight': (384,), 'output_blocks.11.2.out_layers.3.weight': (256, 256, 3, 3),
        'output_blocks.12.0.skip_connection.weight': (128, 384, 1, 1),
        'output_blocks.15.0.in_layers.0.weight': (256,), 'output_blocks.15.0.out_layers.3.weight': (128, 128, 3, 3),
        'out.0.weight': (128,), 'out.0.bias': (128,), 'out.2.weight': (6, 128, 3, 3), 'out.2.bias': (6,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    absent = ['label_emb.weight', 'input_blocks.4.0.skip_connection.weight', 'input_blocks.1.1.qkv.weight',
              'input_blocks.13.1.qkv.weight', 'output_blocks.16.0.in_layers.0.weight', 'output_blocks.15.1.qkv.weight']
    assert not set(absent) & set(shapes)
    assert 1 + max(int(k.split('.')[1]) for k in shapes if k.startswith('input_blocks')) == 16
    assert 1 + max(int(k.split('.')[1]) for k in shapes if k.startswith('output_blocks')) == 16
    conditional = build_on_meta(**{**nets.UNET_PRESETS['adm-cifar10'], 'label_dim': 10}).state_dict()
    assert tuple(conditional['label_emb.weight'].shape) == (10, 512)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs equal the official implementations (reference values recorded by running NVlabs/edm training/networks.py,
# giannisdaras/ambient-diffusion training/networks.py, openai/guided-diffusion unet.py and CompVis/latent-diffusion
# openaimodel.py with the weights of fill_deterministic; official and ours agreed to 3e-7 there).


def reference_inputs(in_channels, context_dim=None):
    g = torch.Generator().manual_seed(99)
    x = torch.randn(2, in_channels, 16, 16, generator=g)
    context = torch.randn(2, 3, context_dim, generator=g) if context_dim else None
    return x, context


OFFICIAL_CASES = {
    'edm-ddpmpp': dict(
        kwargs=dict(arch='ddpmpp', img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), label_dim=10, augment_dim=9),
        values=[-0.00151, -0.023097, 0.037975, -0.15023, -0.094841, -0.128932], mean_abs=0.06055),
    'ambient-gated-ddpmpp': dict(
        kwargs=dict(arch='ddpmpp', img_resolution=16, in_channels=6, out_channels=6, model_channels=32,
                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), label_dim=10, augment_dim=9, gated=True),
        values=[0.107298, 0.133345, 0.112745, 0.15544, 0.231875, 0.169664], mean_abs=0.123411),
    'adm-new-order': dict(
        kwargs=dict(arch='adm', img_resolution=16, in_channels=3, out_channels=6, model_channels=32,
                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), num_head_channels=16,
                    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True),
        values=[-0.115814, -0.079211, -0.175474, -0.048508, -0.148517, -0.17069], mean_abs=0.126839),
    'adm-legacy-order': dict(
        kwargs=dict(arch='adm', img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16, 8), label_dim=5, num_heads=4),
        values=[-0.03182, -0.106889, -0.038944, 0.014209, 0.05483, 0.022922], mean_abs=0.053602),
    'ldm': dict(
        kwargs=dict(arch='ldm', img_resolution=16, in_channels=4, out_channels=4, model_channels=32,
                    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16, 8), num_heads=2, context_dim=24),
        values=[0.102709, 0.048291, 0.038355, -0.117254, -0.130093, -0.130939], mean_abs=0.091531),
}


@pytest.mark.parametrize('case', list(OFFICIAL_CASES))
def test_output_equals_official_implementation(case):
    kwargs, values, mean_abs = OFFICIAL_CASES[case].values()
    net = fill_deterministic(nets.UNet(**kwargs)).eval()
    x, context = reference_inputs(kwargs['in_channels'], kwargs.get('context_dim'))
    with torch.no_grad():
        if kwargs['arch'] == 'ddpmpp':  # EDM: c_noise, one-hot labels, augmentation labels
            augment = torch.randn(2, 9, generator=torch.Generator().manual_seed(7))
            out = net(x, torch.tensor([-0.9, 0.7]), F.one_hot(torch.tensor([3, 8]), 10).float(), augment)
        else:  # guided-diffusion / LDM: integer timesteps, class ids, context
            labels = torch.tensor([1, 4]) if kwargs.get('label_dim') else None
            out = net(x, torch.tensor([5, 811]), class_labels=labels, context=context)
    torch.testing.assert_close(out.flatten()[::97][:6], torch.tensor(values), atol=2e-5, rtol=1e-4)
    assert out.abs().mean().item() == pytest.approx(mean_abs, abs=2e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks against closed forms


def test_timestep_embeddings_closed_form():
    t = torch.tensor([0.0, 2.5, 999.0])
    # guided-diffusion / LDM: [cos, sin] with frequencies 10000^(-i/half).
    emb = nets.timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
    # EDM DDPM++: endpoint frequencies running from 1 down to exactly 1/10000, then [sin, cos].
    emb = nets.timestep_embedding(t, 8, endpoint=True, sin_first=True)
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(4)])
    torch.testing.assert_close(emb, torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1))


def reference_gd_attention(qkv, heads, new_order):
    """guided-diffusion's QKVAttention / QKVAttentionLegacy on (B, 3C, L), written from its einsums."""
    B, width, L = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = [z.reshape(B * heads, ch, L) for z in qkv.chunk(3, dim=1)]
    else:
        q, k, v = qkv.reshape(B * heads, 3 * ch, L).split(ch, dim=1)
    weight = torch.softmax(torch.einsum('bct,bcs->bts', q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum('bts,bcs->bct', weight, v).reshape(B, -1, L)


@pytest.mark.parametrize('new_order', [True, False])
def test_attention_block_matches_guided_diffusion_math(new_order):
    block = randomize_(nets.AttentionBlock(64, num_heads=4, use_new_attention_order=new_order))
    x = torch.randn(2, 64, 4, 5)
    h = block.norm(x).flatten(2)                                             # (B, C, L)
    qkv = F.conv1d(h, block.qkv.weight, block.qkv.bias)
    expected = x + F.conv1d(reference_gd_attention(qkv, 4, new_order), block.proj_out.weight,
                            block.proj_out.bias).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_orders_differ():
    """Same parameters, other qkv order: a different function (why a wrong flag silently breaks checkpoints)."""
    new = randomize_(nets.AttentionBlock(64, num_heads=4, use_new_attention_order=True))
    legacy = nets.AttentionBlock(64, num_heads=4, use_new_attention_order=False)
    legacy.load_state_dict(new.state_dict())
    x = torch.randn(1, 64, 4, 4)
    assert (new(x) - legacy(x)).abs().max() > 1e-3


def test_cross_attention_to_one_token_is_its_value():
    """With a single context token the softmax is 1, so every query receives to_out(to_v(context))."""
    attn = nets.CrossAttention(16, num_heads=2, context_dim=8)
    x, context = torch.randn(3, 10, 16), torch.randn(3, 1, 8)
    expected = attn.to_out(attn.to_v(context)).expand(3, 10, 16)
    torch.testing.assert_close(attn(x, context), expected, atol=1e-6, rtol=1e-6)


def test_gated_conv_is_ambients_double_sigmoid():
    conv = nets.Conv2d(4, 5, 3, gated=True)
    x = torch.randn(2, 4, 6, 6)
    plain = F.conv2d(x, conv.weight, padding=1)
    gate = torch.sigmoid(torch.sigmoid(F.conv2d(x, conv.gate_weight, padding=1)))
    torch.testing.assert_close(conv(x), plain * gate + conv.bias[:, None, None])
    with torch.no_grad():
        conv.gate_weight.zero_()  # a zero gate weight gives sigmoid(sigmoid(0)) = sigmoid(0.5)
    torch.testing.assert_close(conv(x), plain / (1 + math.exp(-0.5)) + conv.bias[:, None, None])


def test_resample_is_edms_11_filter():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(nets.resample(x, 'down'), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    torch.testing.assert_close(nets.resample(x, 'up')[0, 0, :2, :2], torch.zeros(2, 2))
    torch.testing.assert_close(nets.resample(x, 'up')[0, 0, 2:4, 6:8], torch.full((2, 2), 7.0))


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation


@pytest.fixture(scope='module')
def ddpmpp_cifar10():
    torch.manual_seed(0)
    return nets.UNet(**nets.UNET_PRESETS['ddpmpp-cifar10'])


def test_ddpmpp_init_is_edms(ddpmpp_cifar10):
    """Measured on EDM's SongUNet: branch-output convs std ~2e-7 (1e-5 x Xavier), qkv std 0.0198 (sqrt(0.2) x
    Xavier), Xavier elsewhere, zero biases."""
    net = ddpmpp_cifar10
    block, attention = net.input_blocks[6]                                   # 16x16, 256 channels, attention
    xavier = math.sqrt(2 / (256 * 9 + 256 * 9))                              # std of Xavier-uniform for a 3x3 conv
    assert block.in_layers[2].weight.std().item() == pytest.approx(xavier, rel=0.01)
    assert block.out_layers[3].weight.std().item() == pytest.approx(1e-5 * xavier, rel=0.01)
    assert attention.qkv.weight.std().item() == pytest.approx(0.0198, rel=0.01)
    assert attention.proj_out.weight.std().item() == pytest.approx(1e-5 * math.sqrt(2 / 512), rel=0.02)
    assert net.time_embed[0].weight.std().item() == pytest.approx(math.sqrt(2 / (128 + 512)), rel=0.01)
    assert all(m.bias.abs().max() == 0 for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def test_ddpmpp_output_is_tiny_but_nonzero_at_init():
    """EDM scales the output conv by 1e-5 instead of zeroing it."""
    net = nets.UNet(**nets.UNET_PRESETS['tiny'])
    out = net(torch.randn(2, 3, 32, 32), torch.randn(2))
    assert 0 < out.abs().max().item() < 1e-3


@pytest.mark.parametrize('name', ['tiny-adm', 'tiny-ldm'])
def test_adm_and_ldm_output_is_zero_at_init(name):
    """guided-diffusion and LDM zero-initialise the output conv (zero_module), and so every residual branch's last
    layer; the network still learns because gradients reach those layers."""
    net = nets.UNet(**nets.UNET_PRESETS[name])
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    out = call(net, x, t)
    assert out.abs().max().item() == 0
    assert all(m.out_layers[3].weight.abs().max() == 0 for m in net.modules() if isinstance(m, nets.ResBlock))
    out.sum().backward()
    assert net.out[2].weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Every preset builds and runs


@pytest.mark.parametrize('name', list(nets.UNET_PRESETS))
def test_every_preset_runs_with_the_right_shape(name):
    kwargs = small(name)
    net = randomize_(nets.UNet(**kwargs)).eval()
    res = kwargs['img_resolution']
    x = torch.randn(1, kwargs['in_channels'], res, res)
    with torch.no_grad():
        out = call(net, x, torch.tensor([3.0]))
    assert out.shape == (1, kwargs['out_channels'], res, res)
    assert torch.isfinite(out).all()


def test_presets_share_keyword_names_and_overrides_apply():
    net = nets.UNet(**{**nets.UNET_PRESETS['tiny'], 'img_resolution': 16, 'in_channels': 6, 'out_channels': 6,
                       'dropout': 0.13, 'label_dim': 10})
    assert net(torch.randn(2, 6, 16, 16), torch.randn(2), torch.tensor([1, 2])).shape == (2, 6, 16, 16)
    assert net.config['dropout'] == 0.13 and nets.UNet(**net.config).config == net.config
    with pytest.raises(ValueError, match='arch'):
        nets.UNet(**{**nets.UNET_PRESETS['tiny'], 'arch': 'vit'})
    with pytest.raises(ValueError, match='context_dim'):
        nets.UNet(**{**nets.UNET_PRESETS['tiny'], 'context_dim': 8})
    with pytest.raises(ValueError, match='gated'):
        nets.UNet(**{**nets.UNET_PRESETS['tiny-ldm'], 'gated': True})  # ddpmpp and adm (EDM) may be gated
    assert all(num_params(build_on_meta(**nets.UNET_PRESETS[n])) < 2_000_000 for n in ('tiny', 'tiny-adm', 'tiny-ldm'))


def test_conditioning_inputs_are_used():
    # DDPM++: ids equal one-hot rows (EDM's convention); no label equals the zero row; augment labels matter.
    net = randomize_(nets.UNet(**small('tiny', label_dim=10, augment_dim=9))).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.5, -1.0])
    ids = torch.tensor([2, 7])
    torch.testing.assert_close(net(x, t, ids), net(x, t, F.one_hot(ids, 10).float()))
    torch.testing.assert_close(net(x, t), net(x, t, torch.zeros(2, 10)))
    assert (net(x, t, ids) - net(x, t, torch.tensor([3, 7]))).abs()[0].max() > 1e-4
    assert (net(x, t, ids, torch.randn(2, 9)) - net(x, t, ids)).abs().max() > 1e-4
    torch.testing.assert_close(net(x, t, ids), net(x, t, ids, torch.zeros(2, 9)))   # EDM's "not augmented" label
    # EDM label dropout replaces label rows by zeros, in training only.
    net.label_dropout = 1.0
    assert (net(x, t, ids) - net(x, t)).abs().max() > 1e-4
    net.train()
    torch.testing.assert_close(net(x, t, ids), net(x, t))
    net.eval()
    # ADM: class ids through label_emb (soft rows allowed); labels are required when label_dim > 0.
    adm = randomize_(nets.UNet(**small('tiny-adm', label_dim=10))).eval()
    t_adm = torch.tensor([5, 6])
    torch.testing.assert_close(adm(x, t_adm, ids), adm(x, t_adm, F.one_hot(ids, 10).float()))
    assert (adm(x, t_adm, ids) - adm(x, t_adm, ids.flip(0))).abs().max() > 1e-4
    with pytest.raises(ValueError, match='class_labels'):
        adm(x, torch.tensor([5, 6]))
    # LDM: the context drives the cross-attention; a scalar timestep broadcasts over the batch.
    ldm = randomize_(nets.UNet(**nets.UNET_PRESETS['tiny-ldm'])).eval()
    c = torch.randn(2, 1, 32)
    assert (ldm(x, torch.tensor(7), context=c) - ldm(x, torch.tensor(7), context=c.flip(0))).abs().max() > 1e-4
    torch.testing.assert_close(ldm(x, torch.tensor(7), context=c), ldm(x, torch.tensor([7, 7]), context=c))


# ----------------------------------------------------------------------------------------------------------------------
# Round trips, determinism, precision


@pytest.mark.parametrize('name, extra', [('tiny', {'gated': True, 'label_dim': 10}), ('tiny-adm', {}),
                                         ('tiny-ldm', {})])
def test_state_dict_round_trip(tmp_path, name, extra):
    kwargs = {**nets.UNET_PRESETS[name], **extra}
    net = randomize_(nets.UNet(**kwargs)).eval()
    torch.save(net.state_dict(), tmp_path / 'net.pt')
    torch.manual_seed(123)
    copy = nets.UNet(**net.config).eval()
    copy.load_state_dict(torch.load(tmp_path / 'net.pt', weights_only=True), strict=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1.0, 20.0])
    labels = torch.tensor([0, 9]) if kwargs.get('label_dim') else None
    with torch.no_grad():
        context = torch.randn(2, 1, 32) if kwargs['arch'] == 'ldm' else None
        assert torch.equal(net(x, t, labels, context=context), copy(x, t, labels, context=context))
    if extra.get('gated'):
        assert any(k.endswith('gate_weight') for k in net.state_dict())


@pytest.mark.parametrize('name', ['tiny', 'tiny-adm', 'tiny-ldm'])
def test_same_seed_same_network(name):
    def build(seed):
        torch.manual_seed(seed)
        return nets.UNet(**nets.UNET_PRESETS[name]).train()  # dropout off in the presets, so train() is deterministic
    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    randomize_(a)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([4.0, 400.0])
    torch.manual_seed(5)
    out_a = call(a, x, t, context=torch.randn(2, 1, 32))
    torch.manual_seed(5)
    out_b = call(b, x, t, context=torch.randn(2, 1, 32))
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize('name, extra', [('tiny', {'augment_dim': 9, 'label_dim': 10}), ('tiny-adm', {}),
                                         ('tiny-ldm', {})])
def test_every_parameter_gets_a_gradient(name, extra):
    """DDP without find_unused_parameters needs every parameter in the graph, even when the caller passes no
    augmentation labels."""
    net = randomize_(nets.UNet(**{**nets.UNET_PRESETS[name], **extra}))
    call(net, torch.randn(2, 3, 32, 32), torch.tensor([0.5, 9.0])).square().mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_dropout_is_active_in_training_only():
    net = randomize_(nets.UNet(**{**nets.UNET_PRESETS['tiny-adm'], 'dropout': 0.3}))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([100])
    net.train()
    assert (net(x, t) - net(x, t)).abs().max() > 1e-4
    net.eval()
    assert torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize('name', ['tiny', 'tiny-adm', 'tiny-ldm'])
def test_bf16_autocast_channels_last_is_close_to_fp32(name):
    kwargs = {**nets.UNET_PRESETS[name], 'gated': True} if name == 'tiny' else nets.UNET_PRESETS[name]
    net = randomize_(nets.UNet(**kwargs)).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 2.0])
    context = torch.randn(2, 1, 32)
    with torch.no_grad():
        reference = call(net, x, t, context=context)
        net = net.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(call(net, x_cl, t, context=context), reference, atol=1e-4, rtol=1e-4)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = call(net, x_cl, t, context=context)
    assert low.dtype == torch.bfloat16
    error = (low.float() - reference).norm() / reference.norm()
    assert error < 0.05, f'relative error {error:.3f}'


# ----------------------------------------------------------------------------------------------------------------------
# Released checkpoints


def test_load_network_rebuilds_a_ddpm_ip_cifar10_layout(tmp_path):
    """A DDPM-IP CIFAR-10-shaped checkpoint (narrower) loads with the default guesses: 32x32 from channel_mult
    (1, 2, 2, 2), 32 channels per head, new attention order."""
    kwargs = {**nets.UNET_PRESETS['adm-cifar10'], 'model_channels': 64, 'num_blocks': 2, 'dropout': 0.0}
    net = randomize_(nets.UNet(**kwargs)).eval()
    torch.save(net.state_dict(), tmp_path / 'ema_0.9999_460000.pt')
    loaded = nets.load_network(tmp_path / 'ema_0.9999_460000.pt')
    assert loaded.config == net.config and not loaded.training
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 999])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), net(x, t))


def test_load_network_infers_other_adm_layouts(tmp_path):
    """Class-conditional, no scale-shift, conv resampling, legacy 4-head attention (guided-diffusion 128x128 style):
    shapes give everything but the attention settings, which are passed as overrides."""
    kwargs = dict(arch='adm', img_resolution=128, in_channels=3, out_channels=6, model_channels=32,
                  channel_mult=(1, 1, 2, 3, 4), num_blocks=1, attn_resolutions=(32, 16, 8), label_dim=7, num_heads=4,
                  use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False)
    net = randomize_(nets.UNet(**kwargs)).eval()
    torch.save(net.state_dict(), tmp_path / 'gd.pt')
    loaded = nets.load_network(tmp_path / 'gd.pt', num_heads=4, num_head_channels=-1, use_new_attention_order=False)
    assert loaded.config == net.config
    x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([10]), torch.tensor([6])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), net(x, t, y))


def test_load_network_rejects_unknown_checkpoints(tmp_path):
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='not a guided-diffusion'):
        nets.load_network(tmp_path / 'other.pt')
