"""torch.compile sees each network as one graph: no graph break and no recompilation across the calls a training
loop makes. A graph break splits the fused kernels and puts the Python interpreter back between them on the GPU, so
this is a speed property that can be checked on a CPU. The networks run as the scripts run them on CUDA: bf16
autocast, channels_last convolutions, the conditioning each paper uses."""
import pytest
import torch

import fid
import nets


def explain(module, *args, **kwargs):
    torch._dynamo.reset()
    return torch._dynamo.explain(module)(*args, **kwargs)


def assert_one_graph(report):
    reasons = [str(reason.reason).splitlines()[0] for reason in report.break_reasons]
    assert report.graph_break_count == 0 and report.graph_count == 1, reasons


def unet(preset, **overrides):
    torch.manual_seed(0)
    return nets.UNet(**dict(nets.UNET_PRESETS[preset], **overrides)).eval().to(memory_format=torch.channels_last)


@pytest.mark.parametrize('case', ['ambient gated', 'edm augment+class', 'adm', 'ldm class context'])
def test_unet_forward_is_one_graph(case):
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    t = torch.rand(2)
    if case == 'ambient gated':  # ambient.py: noisy masked image and its mask, 6 channels in and out
        net = unet('tiny', in_channels=6, out_channels=6, gated=True, augment_dim=9)
        args = (torch.cat([x, (torch.rand_like(x) < 0.5).float()], 1).contiguous(memory_format=torch.channels_last), t)
        kwargs = dict(augment_labels=torch.randn(2, 9))
    elif case == 'edm augment+class':  # ambient_laws.py
        net = unet('tiny', label_dim=10, augment_dim=9)
        args, kwargs = (x, t), dict(class_labels=torch.tensor([1, 2]), augment_labels=torch.randn(2, 9))
    elif case == 'adm':  # ddpm_ip.py: integer timesteps
        net = unet('tiny-adm')
        args, kwargs = (x, torch.tensor([3, 999])), {}
    else:  # ldm_labelnoise.py: (B, 1, context_dim) class embedding as cross-attention context
        net = unet('tiny-ldm')
        args, kwargs = (x, torch.tensor([3, 999])), dict(context=torch.randn(2, 1, 32))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert_one_graph(explain(net, *args, **kwargs))


def test_dit_forward_is_one_graph_with_and_without_embedding_noise():
    torch.manual_seed(0)
    net = nets.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                   num_classes=10, class_dropout_prob=0.1, learn_sigma=True).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([1, 10])  # 10: the null class
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert_one_graph(explain(net, x, t, y))
        assert_one_graph(explain(net, x, t, y, embedding_noise=torch.randn(2, 64)))  # CEP-U/G perturbs y's embedding


def test_no_recompilation_across_training_steps():
    """The loop's calls differ only in values (timesteps, labels, noise, lr ramp), never in what dynamo guards on."""
    torch.manual_seed(0)
    net = unet('tiny', label_dim=10)
    counts = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counts.clear()
    compiled = torch.compile(net, backend='eager')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        for step in range(3):
            x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            compiled(x, torch.rand(2) * (step + 1), class_labels=torch.randint(10, (2,)))
    assert sum(counts['stats'].get(k, 0) for k in ('unique_graphs',)) == 1, dict(counts['stats'])
    assert not counts['recompiles'], dict(counts['recompiles'])


def test_fid_inception_is_one_graph():
    detector = fid.InceptionV3().eval()
    with torch.no_grad():
        assert_one_graph(explain(detector, torch.rand(1, 3, 299, 299) * 2 - 1))  # preprocessed input


def test_autoencoder_encode_decode_are_one_graph_each():
    torch.manual_seed(0)
    vae = nets.AutoencoderKL(**nets.AUTOENCODER_TINY).eval()
    with torch.no_grad():
        assert_one_graph(explain(vae.encode_moments, torch.randn(1, 3, 16, 16)))
        assert_one_graph(explain(vae.decode, torch.randn(1, 4, 8, 8)))
