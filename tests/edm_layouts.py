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

import contextlib
import http.server
import os
import threading
import urllib.parse


class _FolderHandler(http.server.BaseHTTPRequestHandler):
    """GET of files under server.folder; honours 'Range: bytes=a-' with 206 + Content-Range. server.options:
    interrupt_after (int: announce the full size, send that many bytes, then drop the connection),
    ignore_range (bool: answer every request with the whole file, as servers without Range support do),
    range_total_extra (int: announce a Content-Range total that many bytes larger than the file)."""

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
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        cut = server.options.get('interrupt_after')
        self.wfile.write(body if cut is None else body[:cut])
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
