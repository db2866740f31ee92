"""The real huggingface_hub client against local servers: pushes to `HubTestServer`, loads through an `olah`
mirror of a local git repository, and offline loads from a prefilled HF cache.

huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE when imported, so loads run `hub_client.py` in a
subprocess with those set. Pushes run in-process: `HfApi` reads `constants.ENDPOINT` when it is created.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hub_client import adapter_checksum
from hub_helpers import lora_model
from hub_server import HubTestServer

from sam2_peft.hub import push_adapter, save_adapter

HERE = Path(__file__).parent
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "sam2_peft.json"]


@pytest.fixture
def adapter(tmp_path):
    """An adapter folder as a training run leaves it: the adapter plus `checkpoints/` with optimiser state."""
    folder = tmp_path / "final"
    save_adapter(lora_model(), folder, base_model_name_or_path="me/base", strategy="lora", metrics={"dice": 0.5})
    (folder / "checkpoints" / "step_10").mkdir(parents=True)
    (folder / "checkpoints" / "step_10" / "optimizer.bin").write_bytes(b"\x80\x04pickled optimiser state")
    return folder


def test_push_sends_exactly_the_adapter_files(adapter, monkeypatch):
    with HubTestServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)
        info = push_adapter(adapter, "me/sam2-lora", private=True, revision="ct-v1", commit_message="CT adapter",
                            token="hf_test")
        repo = server.repos["me/sam2-lora"]
        assert repo.private and repo.branches == {"main", "ct-v1"}
        (commit,) = repo.commits
        assert (commit["revision"], commit["summary"]) == ("ct-v1", "CT adapter")
        assert sorted(commit["files"]) == ADAPTER_FILES  # never checkpoints/
        for name, data in commit["files"].items():
            if name != "README.md":
                assert data == (adapter / name).read_bytes(), name
        # The card names the repository, not the local folder, and keeps the run's metrics.
        local, pushed = (adapter / "README.md").read_text(), commit["files"]["README.md"].decode()
        assert "# final: SAM2 lora adapter" in local and '"final"' in local
        assert "# me/sam2-lora: SAM2 lora adapter" in pushed and '"me/sam2-lora"' in pushed and '"final"' not in pushed
        metadata = yaml.safe_load(pushed.split("---")[1])
        assert metadata["base_model"] == "me/base" and "lora" in metadata["tags"]
        assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
        assert info.commit_url == f"{server.url}/me/sam2-lora/commit/{info.oid}"

        # Existing repo: fine. A card edited by hand goes up as it is.
        (adapter / "README.md").write_text(local + "\nTrained on our 2026 scans.\n")
        push_adapter(adapter, "me/sam2-lora", include_checkpoints=True, token="hf_test")
        assert sorted(repo.commits[1]["files"]) == sorted(ADAPTER_FILES + ["checkpoints/step_10/optimizer.bin"])
        assert repo.commits[1]["revision"] == "main"
        assert repo.commits[1]["files"]["README.md"] == (adapter / "README.md").read_bytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def _load_in_subprocess(env: dict, *specs: str) -> dict:
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    done = subprocess.run([sys.executable, str(HERE / "hub_client.py"), *specs], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return {row["spec"]: row for row in map(json.loads, done.stdout.splitlines())}


def _mirror_repo(root: Path, adapters: list[Path]) -> Path:
    """A git repository `root/models/me/sam2-lora`: one commit per adapter, the first tagged v1, plus files that
    must never be downloaded (pickled weights, optimiser state)."""
    repo = root / "models" / "me" / "sam2-lora"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    for index, folder in enumerate(adapters):
        for name in ADAPTER_FILES:
            shutil.copy(folder / name, repo / name)
        (repo / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
        (repo / "checkpoints").mkdir(exist_ok=True)
        (repo / "checkpoints" / "optimizer.bin").write_bytes(b"\x80\x04 optimiser")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"adapter {index}")
        if index == 0:
            _git(repo, "tag", "v1")
    return repo


@pytest.mark.slow
def test_load_through_olah_then_offline_from_its_cache(tmp_path):
    pytest.importorskip("olah")
    folders = []
    for seed in (0, 1):
        folders.append(tmp_path / f"adapter{seed}")
        save_adapter(lora_model(seed), folders[-1], strategy="lora")
    expected = [adapter_checksum(lora_model(seed)) for seed in (0, 1)]
    _mirror_repo(tmp_path / "mirrors", folders)
    port = _free_port()
    (tmp_path / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nmirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\nrepos-path = "{tmp_path / "olah-repos"}"\n'
        f'mirrors-path = ["{tmp_path / "mirrors"}"]\n\n[accessibility]\noffline = true\n'
    )
    olah = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(tmp_path / "olah.toml")], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert olah.poll() is None and time.monotonic() < deadline, "olah did not start"
                time.sleep(0.2)
        cache = {"HF_HUB_CACHE": str(tmp_path / "hf-cache")}
        online = _load_in_subprocess({**cache, "HF_ENDPOINT": f"http://127.0.0.1:{port}"},
                                     "me/sam2-lora@v1", "me/sam2-lora")
    finally:
        olah.terminate()
        olah.wait(timeout=10)
    offline = _load_in_subprocess({**cache, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"},
                                  "me/sam2-lora@v1", "me/sam2-lora")
    for rows in (online, offline):
        assert rows["me/sam2-lora@v1"]["checksum"] == pytest.approx(expected[0], rel=1e-9)
        assert rows["me/sam2-lora"]["checksum"] == pytest.approx(expected[1], rel=1e-9)
        assert all(row["files"] == ADAPTER_FILES for row in rows.values())  # no .bin, no checkpoints/
    assert expected[0] != pytest.approx(expected[1])


def _prefill_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: list[str]) -> None:
    """Write the HF cache layout `models--owner--name/{blobs,refs,snapshots}` by hand, as a download would."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ADAPTER_FILES:
        blob = root / "blobs" / f"blob-{name}"
        shutil.copy(folder / name, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


@pytest.mark.slow
def test_offline_load_from_a_prefilled_cache(tmp_path):
    save_adapter(lora_model(5), tmp_path / "a", strategy="lora")
    _prefill_cache(tmp_path / "cache", "me/cached", tmp_path / "a", "a" * 40, ["main"])
    rows = _load_in_subprocess({"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                                "HF_ENDPOINT": "http://127.0.0.1:9"}, "me/cached", f"me/cached@{'a' * 40}")
    for row in rows.values():
        assert row["checksum"] == pytest.approx(adapter_checksum(lora_model(5)), rel=1e-9)
        assert row["files"] == ADAPTER_FILES
