"""Test helper: files in the layouts of released EDM / ambient-diffusion / ambient-laws checkpoints, written without
the official code, and a local HTTP server to download them from.

- serve_folder(folder): a context manager serving a folder on 127.0.0.1 (GET with Range requests, so resumed
  downloads are tested), yielding its base URL; point HF_ENDPOINT at it to stand in for the Hugging Face Hub, whose
  resolve URLs are `{base}/{repo_id}/resolve/{revision}/{filename}` (hf_repo_folder gives that folder).
- write_edm_pickle(path, unet_or_state_dict, precond_kwargs, ...): a `network-snapshot-*.pkl` in the structure of
  NVlabs/edm torch_utils/persistence.py, as its training_loop.py writes it.
- write_hf_folder(folder, unet, precond_kwargs, ...): config.json + model.safetensors as huggingface_hub's
  PyTorchModelHubMixin writes them for ambient-laws' EDMPrecond.
"""

import collections
import contextlib
import http.server
import json
import os
import pickle
import re
import sys
import threading
import time
import types
import urllib.parse

import numpy as np
import torch

import nets


class _FolderHandler(http.server.BaseHTTPRequestHandler):
    """GET of files under server.folder; honours 'Range: bytes=a-' with 206 + Content-Range. server.options:
    interrupt_after (int: announce the full size, send that many bytes, then drop the connection),
    ignore_range (bool: answer every request with the whole file, as servers without Range support do),
    range_total_extra (int: announce a Content-Range total that many bytes larger than the file),
    pieces (int: send the body in that many pieces, 20 ms apart), no_length (bool: send no Content-Length, the body
    ends when the connection closes), content_encoding (str: a Content-Encoding header; the body is sent as is),
    drip (float: send the body one byte at a time, this many seconds apart, with no Content-Length)."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get('Range')))
        relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip('/')
        path = os.path.realpath(os.path.join(server.folder, relative))
        if not path.startswith(os.path.realpath(server.folder) + os.sep) or not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, 'rb') as f:
            data = f.read()
        start = 0
        range_header = self.headers.get('Range')
        if range_header and not server.options.get('ignore_range'):
            start = int(range_header.removeprefix('bytes=').split('-')[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            self.send_response(206)
            total = len(data) + server.options.get('range_total_extra', 0)
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{total}')
        else:
            self.send_response(200)
        body = data[start:]
        if server.options.get('content_encoding'):
            self.send_header('Content-Encoding', server.options['content_encoding'])
        if not (server.options.get('no_length') or server.options.get('drip')):
            self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if server.options.get('drip'):
            for i in range(len(body)):
                try:
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
                time.sleep(server.options['drip'])
            return
        cut = server.options.get('interrupt_after')
        body = body if cut is None else body[:cut]
        pieces = server.options.get('pieces', 1)
        for i in range(pieces):  # several pieces with a pause between them: a slow download
            self.wfile.write(body[i * len(body) // pieces:(i + 1) * len(body) // pieces])
            if pieces > 1:
                self.wfile.flush()
                time.sleep(0.02)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):  # keep the test output quiet
        pass


@contextlib.contextmanager
def serve_folder(folder, **options):
    """Serve `folder` over HTTP on 127.0.0.1 (a free port) while the block runs; yields the base URL, with
    `.requests` (a list of (path, Range header) pairs, in order) and `.options` (the handler options above, which the
    test may change between downloads) attached to the server object as `base_url.server`."""
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _FolderHandler)
    server.folder = os.fspath(folder)
    server.options = options
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield BaseURL(f'http://127.0.0.1:{server.server_address[1]}', server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class BaseURL(str):
    """The server's base URL (a str), carrying the server for its request log and options."""

    def __new__(cls, url, server):
        self = super().__new__(cls, url)
        self.server = server
        return self


def hf_repo_folder(root, repo_id, revision='main'):
    """The folder under a served root that answers the Hub's resolve URLs of repo_id at revision."""
    return os.path.join(root, *repo_id.split('/'), 'resolve', revision)


# ----------------------------------------------------------------------------------------------------------------------
# EDM network pickles (NVlabs/edm torch_utils/persistence.py), written without the official code

# Stands in for the source code that torch_utils.persistence pickles with each object (EDM execs it on load). If it
# were ever executed it would create the file named by $EDM_LAYOUTS_EXEC_MARKER and raise, so a test can prove that
# nothing runs it.
PLACEHOLDER_MODULE_SRC = ("import os, pathlib\n"
                          "pathlib.Path(os.environ.get('EDM_LAYOUTS_EXEC_MARKER', 'module_src_was_executed')).touch()\n"
                          "raise RuntimeError('module_src was executed')\n")


def _persistence_module():
    """A stand-in `torch_utils.persistence` module with `_reconstruct_persistent_obj`, so that pickle writes the
    same global the official code writes (pickle checks that a global can be imported by its name)."""
    package = types.ModuleType('torch_utils')
    module = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError('test stand-in: never called')
    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    return {'torch_utils': package, 'torch_utils.persistence': module}


class FakePersistent(torch.nn.Module):
    """An nn.Module that pickles like an object of an EDM persistent class: `__reduce__` gives
    (_reconstruct_persistent_obj, (meta,), None) with meta = {type, version, module_src, class_name, state}, state
    being the module's __dict__ with _init_args / _init_kwargs, as in persistence.py's Decorator.__reduce__."""

    def __init__(self, class_name, init_kwargs=None, module_src=PLACEHOLDER_MODULE_SRC, **attributes):
        super().__init__()
        self._class_name = class_name
        self._module_src = module_src
        self._init_args = ()
        self._init_kwargs = dict(init_kwargs or {})
        for name, value in attributes.items():
            setattr(self, name, value)

    def __reduce__(self):
        state = {key: value for key, value in self.__dict__.items() if key not in ('_class_name', '_module_src')}
        meta = dict(type='class', version=6, module_src=self._module_src, class_name=self._class_name, state=state)
        return sys.modules['torch_utils.persistence']._reconstruct_persistent_obj, (meta,), None


def _edm_class_of(name, model_type):
    """The EDM class of a module, from its name in an EDM state dict path."""
    if name == 'model':
        return model_type
    if name in ('enc', 'dec'):
        return 'ModuleDict'
    if re.fullmatch(r'\d+x\d+_(block\d+|down|up|in0|in1)', name):
        return 'UNetBlock'
    if name.startswith('norm') or name.endswith(('aux_norm', 'out_norm')):
        return 'GroupNorm'
    if name.startswith('map_layer') or name in ('map_label', 'map_augment', 'affine'):
        return 'Linear'
    return 'Conv2d'


def edm_module_tree(state_dict, model_type, model_kwargs, precond, precond_kwargs, module_src=PLACEHOLDER_MODULE_SRC):
    """The EDM precond -> model -> enc/dec ModuleDicts -> UNetBlock -> Conv2d/Linear/GroupNorm tree holding an EDM
    state dict (keys without 'model.'), as FakePersistent modules that pickle like the official ones."""
    root = FakePersistent(precond, precond_kwargs, module_src, **{
        key: value for key, value in precond_kwargs.items() if key in (
            'img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max', 'sigma_data')})
    model = FakePersistent(model_type, model_kwargs, module_src, label_dropout=model_kwargs.get('label_dropout', 0))
    root.model = model
    model.map_noise = FakePersistent('PositionalEmbedding', dict(num_channels=model_kwargs.get('model_channels')),
                                     module_src, endpoint=model_type == 'SongUNet')
    for key, tensor in state_dict.items():
        *path, leaf = key.split('.')
        module = model
        for name in path:
            if name not in module._modules:
                class_name = _edm_class_of(name, model_type)
                if class_name == 'ModuleDict':
                    child = torch.nn.ModuleDict()
                elif class_name == 'UNetBlock':  # EDM keeps skip_scale as a numpy float (np.sqrt(0.5))
                    child = FakePersistent(class_name, dict(dropout=model_kwargs.get('dropout', 0)), module_src,
                                           skip_scale=np.sqrt(0.5) if model_type == 'SongUNet' else 1)
                else:
                    child = FakePersistent(class_name, {}, module_src)
                module.add_module(name, child)
            module = module._modules[name]
        if leaf == 'resample_filter':
            module.register_buffer(leaf, tensor.clone())
        else:
            module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    return root


def edm_precond_kwargs(unet, precond='EDMPrecond', **overrides):
    """EDM precond init kwargs (model kwargs included) for a nets.UNet config, as EDM's train.py passes them."""
    config = unet.config
    model_kwargs = dict(model_channels=config['model_channels'], channel_mult=list(config['channel_mult']),
                        num_blocks=config['num_blocks'], attn_resolutions=list(config['attn_resolutions']),
                        dropout=config['dropout'], augment_dim=config['augment_dim'])
    if config['arch'] == 'ddpmpp':
        model_kwargs.update(embedding_type='positional', encoder_type='standard', decoder_type='standard',
                            channel_mult_noise=1, resample_filter=[1, 1])
    kwargs = dict(img_resolution=config['img_resolution'], img_channels=config['in_channels'],
                  label_dim=config['label_dim'], use_fp16=False,
                  model_type='SongUNet' if config['arch'] == 'ddpmpp' else 'DhariwalUNet', **model_kwargs)
    if precond == 'EDMPrecond':
        kwargs.update(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    return {**kwargs, **overrides}


def edm_state_dict(unet):
    """The EDM (SongUNet / DhariwalUNet) state dict of a nets.UNet, keys without 'model.'."""
    if unet.config['arch'] == 'ddpmpp':
        return nets.unet_to_songunet_state_dict(unet)
    return nets.unet_to_dhariwal_state_dict(unet)


def write_edm_pickle(path, unet_or_state_dict, precond_kwargs, precond='EDMPrecond', ema_as_state_dict=False,
                     loss=('EDMLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)), dataset_kwargs=None,
                     with_training_options=None, module_src=PLACEHOLDER_MODULE_SRC, extra=None):
    """Write a network-snapshot-*.pkl as NVlabs/edm training_loop.py does: {'ema': the precond object, 'loss_fn',
    'augment_pipe', 'dataset_kwargs'}, each persistent object pickled through torch_utils.persistence's structure.

    unet_or_state_dict: a nets.UNet (mapped to EDM keys) or an EDM model state dict (keys without 'model.').
    ema_as_state_dict: write 'ema' as ambient-diffusion's training_loop.py does, ema.state_dict() (keys 'model.*').
    with_training_options: a dict written as training_options.json beside the pickle (EDM's train.py writes one; for
    ambient-diffusion it is how eval.py learns the network kwargs). extra: more top-level entries (e.g. a refused
    object, to test refusals).
    """
    state_dict = edm_state_dict(unet_or_state_dict) if isinstance(unet_or_state_dict, torch.nn.Module) \
        else unet_or_state_dict
    precond_only = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max', 'sigma_data',
                    'beta_d', 'beta_min', 'M', 'epsilon_t', 'C_1', 'C_2', 'model_type')
    model_kwargs = {key: value for key, value in precond_kwargs.items() if key not in precond_only}
    model_kwargs.update(img_resolution=precond_kwargs['img_resolution'], in_channels=precond_kwargs['img_channels'],
                        out_channels=precond_kwargs['img_channels'], label_dim=precond_kwargs.get('label_dim', 0))
    root = edm_module_tree(state_dict, precond_kwargs['model_type'], model_kwargs, precond, precond_kwargs,
                           module_src)
    ema = collections.OrderedDict(root.state_dict()) if ema_as_state_dict else root.eval().requires_grad_(False)
    data = dict(ema=ema, loss_fn=FakePersistent(loss[0], loss[1], module_src, **loss[1]) if loss else None,
                augment_pipe=None, dataset_kwargs=dict(dataset_kwargs or {}), **(extra or {}))
    stand_ins = _persistence_module()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        with open(path, 'wb') as f:
            pickle.dump(data, f)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    if with_training_options is not None:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), 'training_options.json'), 'w') as f:
            json.dump(with_training_options, f, indent=2)
    return path


def write_hf_folder(folder, unet, precond_kwargs, safetensors=True):
    """A Hugging Face checkpoint folder as huggingface_hub's PyTorchModelHubMixin saves ambient-laws' EDMPrecond:
    config.json = its init kwargs (model kwargs flattened in), model.safetensors = its state dict (UNet under
    'model.', EDM key names, resample_filter buffers included); with safetensors=False, pytorch_model.bin as older
    hub versions wrote."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(precond_kwargs, f, indent=2)  # float('inf') is written as Infinity, as json.dump does in the mixin
    tensors = {f'model.{key}': value.contiguous() for key, value in edm_state_dict(unet).items()}
    if safetensors:
        nets.save_safetensors(os.path.join(folder, 'model.safetensors'), tensors)
    else:
        torch.save(tensors, os.path.join(folder, 'pytorch_model.bin'))
    return folder
