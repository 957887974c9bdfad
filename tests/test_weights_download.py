"""`autocontour weights download` against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from autocontour.cli import main
from autocontour.errors import WeightsError
from autocontour.model import UniverSeg
from autocontour.model.weights import OFFICIAL_V1, download, load_model


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/truncated/"):
            body = (Path(self.directory) / OFFICIAL_V1.file_name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return
        super().do_GET()


@pytest.fixture()
def server(tmp_path):
    """Serves a v1-shaped checkpoint under the official file name."""
    root = tmp_path / "www"
    root.mkdir()
    torch.manual_seed(3)
    torch.save(UniverSeg().state_dict(), root / OFFICIAL_V1.file_name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    digest = hashlib.sha256((root / OFFICIAL_V1.file_name).read_bytes()).hexdigest()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", digest
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_caches(server, tmp_path):
    url, digest = server
    cache = tmp_path / "cache"
    path, got = download(OFFICIAL_V1, cache, sha256=digest, url=f"{url}/{OFFICIAL_V1.file_name}", progress=False)
    assert got == digest and path == cache / OFFICIAL_V1.file_name
    model, card = load_model(path)
    assert card.research_only and card.sha256 == digest
    # a second call finds the verified file and does not fetch again
    assert download(OFFICIAL_V1, cache, sha256=digest, url=f"{url}/missing.pt", progress=False)[0] == path


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        download(OFFICIAL_V1, cache, sha256="0" * 64, url=f"{url}/{OFFICIAL_V1.file_name}", progress=False)
    assert list(cache.iterdir()) == []


def test_truncated_download_is_refused(server, tmp_path):
    url, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError):
        download(OFFICIAL_V1, cache, url=f"{url}/truncated/{OFFICIAL_V1.file_name}", progress=False)
    assert list(cache.iterdir()) == []


def test_http_error_is_one_clear_error(server, tmp_path):
    url, _ = server
    with pytest.raises(WeightsError, match="could not download universeg-v1"):
        download(OFFICIAL_V1, tmp_path, url=f"{url}/nothing-here.pt", progress=False)


def test_cli_download(server, tmp_path, capsys):
    url, digest = server
    code = main(["weights", "download", "universeg-v1", "--url", f"{url}/{OFFICIAL_V1.file_name}",
                 "--sha256", digest, "--cache-dir", str(tmp_path), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0
    assert digest in out and "research use only" in err
    code = main(["weights", "download", "universeg-v1", "--url", f"{url}/{OFFICIAL_V1.file_name}",
                 "--sha256", "f" * 64, "--cache-dir", str(tmp_path / "other"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "SHA-256 mismatch" in err
