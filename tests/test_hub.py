"""Hub-native loading through the real huggingface_hub code, without network: a Hub cache built
by hand in huggingface_hub's layout (offline mode), and a local stand-in Hub server (downloads,
allow_patterns, gated / missing repositories)."""
import hashlib
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from factories import save_tiny_text_encoder, save_tiny_vae, tiny_ar, tiny_e
from nitro_ar import NitroAR, NitroARPipeline, NitroE
from nitro_ar.checkpoint import OFFICIAL_FILES
from nitro_ar.encoders import TextEncoder
from nitro_ar.errors import CheckpointError, HubError
from nitro_ar.hub import resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, files: dict, commit: str = COMMIT) -> Path:
    """Lay ``files`` ({name in repo: local file}) out as huggingface_hub caches a download:
    ``models--org--name/{blobs/<sha256>, snapshots/<commit>/<name> -> blob, refs/main}``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny official-layout files and encoder folders, plus what a real repository also holds."""
    root = tmp_path_factory.mktemp("parts")
    gan, joint, e = tiny_ar("gan"), tiny_ar("joint_gan", seed=1), tiny_e()
    gan.save_official(root / OFFICIAL_FILES["gan"])
    joint.save_official(root / OFFICIAL_FILES["joint_gan"])
    e.save_official(root / OFFICIAL_FILES["nitro_e"])
    (root / "README.md").write_text("model card")
    (root / "consolidated.00.pth").write_bytes(b"pickled weights that must never be fetched")
    text, vae = save_tiny_text_encoder(root / "text"), save_tiny_vae(root / "vae")
    return dict(root=root, gan=gan, joint=joint, e=e, text=text, vae=vae)


def repo_files(parts, repo_id: str) -> dict:
    root = parts["root"]
    extra = {"README.md": root / "README.md"}
    if repo_id == "amd/Nitro-AR":
        return {**extra, **{OFFICIAL_FILES[v]: root / OFFICIAL_FILES[v] for v in ("gan", "joint_gan")}}
    if repo_id == "amd/Nitro-E":
        return {**extra, OFFICIAL_FILES["nitro_e"]: root / OFFICIAL_FILES["nitro_e"]}
    if repo_id == "meta-llama/Llama-3.2-1B":
        return {**extra, **folder_files(parts["text"]), "original/consolidated.00.pth": root / "consolidated.00.pth"}
    return {**extra, **folder_files(parts["vae"]), "diffusion_pytorch_model.bin": root / "consolidated.00.pth"}


REPOS = ("amd/Nitro-AR", "amd/Nitro-E", "meta-llama/Llama-3.2-1B", "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers")


@pytest.fixture(scope="module")
def hub_cache(parts, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub-cache")
    for repo_id in REPOS:
        add_to_hub_cache(cache, repo_id, repo_files(parts, repo_id))
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_models_load_from_the_hub_cache_offline(parts, hub_cache, offline):
    gan = NitroAR.from_pretrained("amd/Nitro-AR", cache_dir=hub_cache)  # the Hub default variant: gan
    assert gan.config.variant == "gan" and same_weights(gan, parts["gan"])
    joint = NitroAR.from_pretrained("amd/Nitro-AR", variant="joint_gan", revision=COMMIT, cache_dir=hub_cache, dtype=torch.bfloat16)
    assert joint.config.variant == "joint_gan" and joint.dtype == torch.bfloat16
    assert torch.equal(joint.x_proj.weight, parts["joint"].x_proj.weight.bfloat16())
    e = NitroE.from_pretrained("amd/Nitro-E", cache_dir=hub_cache, local_files_only=True)
    assert same_weights(e, parts["e"])


def test_offline_errors_are_one_line_saying_what_to_do(parts, hub_cache, tmp_path, offline):
    with pytest.raises(HubError, match="not in the Hub cache and downloads are off") as err:
        NitroAR.from_pretrained("amd/Nitro-AR-missing", cache_dir=hub_cache)
    assert "\n" not in str(err.value) and "local folder" in str(err.value)
    with pytest.raises(HubError, match="revision"):
        NitroAR.from_pretrained("amd/Nitro-AR", revision="v9", cache_dir=hub_cache)
    # A cached snapshot without the wanted file is reported, not half-loaded.
    partial = tmp_path / "partial"
    add_to_hub_cache(partial, "amd/Nitro-AR", {OFFICIAL_FILES["gan"]: parts["root"] / OFFICIAL_FILES["gan"]})
    with pytest.raises(HubError, match="lacks Nitro-AR-512px-Joint-GAN.safetensors"):
        NitroAR.from_pretrained("amd/Nitro-AR", variant="joint_gan", cache_dir=partial)
    with pytest.raises(CheckpointError, match="nor a Hub repository id"):
        TextEncoder.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(CheckpointError, match="text encoder folder .* lacks config.json"):
        TextEncoder.from_pretrained(tmp_path)


def test_pipeline_defaults_resolve_from_the_hub_cache(hub_cache, offline):
    pipe = NitroARPipeline.from_pretrained(cache_dir=hub_cache)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red fox", seed=0, ar_steps=1, output_type="latent")
    assert pipe.model.config.variant == "gan" and out.latents.shape == (1, 32, 16, 16)
    assert type(pipe.codec.vae).__name__ == "AutoencoderDC"


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The three endpoints snapshot_download uses: repo info, and HEAD / GET of a file."""

    repos: dict = {}
    gated: set = set()
    fetched: list = []

    def log_message(self, *args):
        pass

    def _reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def _route(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "api":  # /api/models/org/name/revision/rev
            repo_id, revision = "/".join(parts[2:4]), parts[5]
        else:  # /org/name/resolve/rev/file...
            repo_id, revision = "/".join(parts[:2]), parts[3]
        if repo_id in self.gated:
            return self._reply(403, b"gated", [("X-Error-Code", "GatedRepo"), ("X-Error-Message", "Access to model is restricted")])
        if repo_id not in self.repos:
            return self._reply(404, b"missing", [("X-Error-Code", "RepoNotFound"), ("X-Error-Message", "Repository not found")])
        if revision not in ("main", COMMIT):
            return self._reply(404, b"no rev", [("X-Error-Code", "RevisionNotFound"), ("X-Error-Message", "Invalid rev id")])
        files = self.repos[repo_id]
        if parts[0] == "api":
            info = {"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
            return self._reply(200, json.dumps(info).encode(), [("Content-Type", "application/json")])
        name = "/".join(parts[4:])
        data = Path(files[name]).read_bytes()
        if self.command == "GET":
            self.fetched.append(f"{repo_id}/{name}")
        etag = hashlib.sha256(data).hexdigest()
        return self._reply(200, data, [("X-Repo-Commit", COMMIT), ("ETag", f'"{etag}"')])

    do_GET = do_HEAD = _route


@pytest.fixture
def fake_hub(parts, monkeypatch):
    import huggingface_hub.constants
    import huggingface_hub.file_download

    _FakeHub.repos = {repo_id: repo_files(parts, repo_id) for repo_id in REPOS}
    _FakeHub.gated, _FakeHub.fetched = {"meta-llama/Gated-1B"}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    yield _FakeHub
    server.shutdown()
    server.server_close()


def test_downloads_fetch_only_the_files_needed(parts, fake_hub, tmp_path):
    model = NitroAR.from_pretrained("amd/Nitro-AR", variant="gan", cache_dir=tmp_path)
    assert same_weights(model, parts["gan"])
    assert fake_hub.fetched == ["amd/Nitro-AR/Nitro-AR-512px-GAN.safetensors"]
    fake_hub.fetched.clear()
    TextEncoder.from_pretrained(cache_dir=tmp_path)  # meta-llama/Llama-3.2-1B
    fetched = sorted(name.split("/", 2)[2] for name in fake_hub.fetched)
    assert "original/consolidated.00.pth" not in fetched and "README.md" not in fetched
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(fetched)
    snapshot = resolve("mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers", files=["config.json", "*.safetensors"], cache_dir=tmp_path)
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_gated_missing_and_unreachable_repos(fake_hub, tmp_path, monkeypatch):
    with pytest.raises(HubError, match="is gated: accept its licence at https://huggingface.co/meta-llama/Gated-1B") as err:
        TextEncoder.from_pretrained("meta-llama/Gated-1B", cache_dir=tmp_path)
    assert "\n" not in str(err.value) and "log in" in str(err.value)
    with pytest.raises(HubError, match="neither a local path nor a Hub repository you can access"):
        NitroAR.from_pretrained("ckpts/Nitro-AR", cache_dir=tmp_path)  # a mistyped local folder
    with pytest.raises(HubError, match="has no revision 'v9'"):
        NitroE.from_pretrained("amd/Nitro-E", revision="v9", cache_dir=tmp_path)
    import huggingface_hub.constants

    closed = http.server.HTTPServer(("127.0.0.1", 0), _FakeHub)  # a port nobody answers on
    port = closed.server_address[1]
    closed.server_close()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubError, match="could not reach the Hugging Face Hub"):
        NitroE.from_pretrained("amd/Nitro-E", cache_dir=tmp_path / "empty")


def test_local_paths_win_and_are_not_contacted(parts, tmp_path):
    folder = tmp_path / "amd" / "Nitro-E"
    folder.mkdir(parents=True)
    shutil.copy(parts["root"] / OFFICIAL_FILES["nitro_e"], folder)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert resolve("amd/Nitro-E") == Path("amd/Nitro-E")
        assert same_weights(NitroE.from_pretrained("amd/Nitro-E"), parts["e"])
    finally:
        os.chdir(cwd)
