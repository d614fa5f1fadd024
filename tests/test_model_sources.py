"""Model sources: hub ids and an empty ``tokenizer_path`` resolve offline first (issue 18).

The tiny twin's files are laid out as a Hugging Face cache and a ModelScope cache, in the layouts
their clients write, under the real Wan repositories' ids. The clients' own offline look-ups find
them (checked first, without rewardfl), and the demo model loads from each with ``model_paths``
unset and ``tokenizer_path`` empty.

No test opens a connection: ``HF_HUB_OFFLINE=1`` and ``socket.socket.connect`` refuses and records
every attempt, in every test. Downloads (``allow_download: true``) are exercised with the clients'
download functions replaced by local copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from wan_fixtures import build_tiny, tiny_config, tiny_dir, tiny_options  # noqa: F401  (session fixture)

from rewardfl.models.wan.model import Wan22TinyModel
from rewardfl.models.wan.weights import ModelSourceNotFound

I2V = "Wan-AI/Wan2.2-I2V-A14B"
T2V = "Wan-AI/Wan2.1-T2V-1.3B"  # DiffSynth-Studio's default tokenizer repository
CONVERTED = "DiffSynth-Studio/Wan-Series-Converted-Safetensors"  # where DiffSynth redirects the .pth files
#: the Wan2.2-I2V-A14B files in DiffSynth-Studio's hub form, as docs/models.md writes them
USER_SPEC = ",".join(f"{I2V}:{p}" for p in ("high_noise_model/diffusion_pytorch_model*.safetensors",
                                            "low_noise_model/diffusion_pytorch_model*.safetensors",
                                            "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"))


# --------------------------------------------------------------------------- the caches, as the clients write them


def _with_options(config):
    """``(config, its model options)``: what ``Wan22TinyModel.check`` takes."""
    return config, tiny_options(config)


def write_hf_cache(root: str, repo_id: str, files: dict[str, str]) -> str:
    """``huggingface_hub``'s layout: ``models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/...}``,
    each snapshot file a relative symlink to its blob. Returns the snapshot folder."""
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    for rel, src in files.items():
        data = open(src, "rb").read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(snapshot, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)  # no newline, as the client writes it
    return snapshot


def write_ms_cache(root: str, repo_id: str, files: dict[str, str]) -> str:
    """modelscope 1.40 / modelscope-hub's layout: ``models/org--name/snapshots/master/...``, plain files
    (``DownloadManager.download_repo``). Returns the snapshot folder."""
    snapshot = os.path.join(root, "models", repo_id.replace("/", "--"), "snapshots", "master")
    for rel, src in files.items():
        os.makedirs(os.path.dirname(os.path.join(snapshot, rel)), exist_ok=True)
        shutil.copyfile(src, os.path.join(snapshot, rel))
    return snapshot


def shard(src: str, out_dir: str, stem: str, n: int = 2) -> dict[str, str]:
    """``src`` split like a sharded hub checkpoint: ``{stem}-0000i-of-0000n.safetensors`` + index."""
    state = load_file(src)
    keys = sorted(state)
    files, weight_map = {}, {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n]}
        save_file(part, os.path.join(out_dir, name))
        files[name] = os.path.join(out_dir, name)
        weight_map.update({k: name for k in part})
    index = os.path.join(out_dir, f"{stem}.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    files[os.path.basename(index)] = index
    return files


@pytest.fixture(scope="module")
def repos(tiny_dir, tmp_path_factory):  # noqa: F811
    """The tiny twin's files per hub and repository, as ``{hub: {repo_id: {path in repo: local file}}}``.

    Hugging Face: Wan2.2-I2V-A14B's file names, text encoder and VAE as ``.pth`` (as in the real
    repository). ModelScope: sharded DiTs with their index, the text encoder and VAE only under
    DiffSynth's converted repository (what a DiffSynth run leaves in the cache).
    """
    stage = str(tmp_path_factory.mktemp("stage"))
    for name in ("text_encoder", "vae"):
        torch.save(load_file(os.path.join(tiny_dir, f"{name}.safetensors")), os.path.join(stage, f"{name}.pth"))
    tokenizer = {f"google/umt5-xxl/{f}": os.path.join(tiny_dir, "tokenizer", f)
                 for f in os.listdir(os.path.join(tiny_dir, "tokenizer"))}
    ms_i2v = {}
    for folder, name in (("high_noise_model", "dit_high_noise"), ("low_noise_model", "dit_low_noise")):
        os.makedirs(os.path.join(stage, folder))
        shards = shard(os.path.join(tiny_dir, f"{name}.safetensors"), os.path.join(stage, folder),
                       "diffusion_pytorch_model")
        ms_i2v.update({f"{folder}/{rel}": path for rel, path in shards.items()})
    return {
        "hf": {
            I2V: {"high_noise_model/diffusion_pytorch_model.safetensors":
                  os.path.join(tiny_dir, "dit_high_noise.safetensors"),
                  "low_noise_model/diffusion_pytorch_model.safetensors":
                  os.path.join(tiny_dir, "dit_low_noise.safetensors"),
                  "models_t5_umt5-xxl-enc-bf16.pth": os.path.join(stage, "text_encoder.pth"),
                  "Wan2.1_VAE.pth": os.path.join(stage, "vae.pth")},
            T2V: tokenizer,
        },
        "ms": {
            I2V: ms_i2v,
            CONVERTED: {"models_t5_umt5-xxl-enc-bf16.safetensors": os.path.join(tiny_dir, "text_encoder.safetensors"),
                        "Wan2.1_VAE.safetensors": os.path.join(tiny_dir, "vae.safetensors")},
            T2V: tokenizer,
        },
    }


@pytest.fixture(scope="module")
def caches(repos, tmp_path_factory):
    """``{"hf": HF cache root, "ms": ModelScope cache root, "empty": an empty folder}``."""
    hf, ms = str(tmp_path_factory.mktemp("hf_hub")), str(tmp_path_factory.mktemp("modelscope"))
    for repo_id, files in repos["hf"].items():
        write_hf_cache(hf, repo_id, files)
    for repo_id, files in repos["ms"].items():
        write_ms_cache(ms, repo_id, files)
    return {"hf": hf, "ms": ms, "empty": str(tmp_path_factory.mktemp("empty"))}


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every test runs offline: HF_HUB_OFFLINE=1, and a socket connect raises; returns the attempts."""
    import huggingface_hub.constants

    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"test: connection to {address} refused (no network in tests)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    yield attempts
    assert not attempts, f"a connection was attempted: {attempts}"


def use_caches(monkeypatch, tmp_path, hf: str, ms: str) -> None:
    """Point HF_HUB_CACHE and MODELSCOPE_CACHE at ``hf`` and ``ms`` (and DiffSynth's folder at nothing).

    The clients read the variables once (huggingface_hub at import, modelscope-hub at first use),
    so their copies are refreshed too.
    """
    import huggingface_hub.constants
    import modelscope_hub.config

    monkeypatch.setenv("HF_HUB_CACHE", hf)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hf)
    monkeypatch.setenv("MODELSCOPE_CACHE", ms)
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "no_diffsynth_models"))
    monkeypatch.delenv("DIFFSYNTH_DOWNLOAD_SOURCE", raising=False)


def assert_is_the_tiny_twin(model, tiny_dir):  # noqa: F811
    """Every tensor of the tiny twin's files is in the model, bit for bit; the tokenizer is its own."""
    from transformers import AutoTokenizer

    from rewardfl.models.wan import architectures as arch

    for module, name, key in ((model.dits["dit"], "dit_high_noise", arch.dit_key),
                              (model.dits["dit2"], "dit_low_noise", arch.dit_key),
                              (model.text_encoder, "text_encoder", lambda k: k),
                              (model.vae.model, "vae", arch.vae_key)):
        state = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items()}  # LoRA wraps dit2
        reference = load_file(os.path.join(tiny_dir, f"{name}.safetensors"))
        assert reference
        for k, v in reference.items():
            assert torch.equal(state[key(k)], v), f"{name}: {k} differs"
    text = "a woman smiles at the camera"
    expected = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer"))(text).input_ids
    assert model.tokenizer(text).input_ids == expected


# --------------------------------------------------------------------------- the layouts are the clients'


def test_the_clients_find_the_test_caches_offline(caches, repos):
    """The clients' own offline APIs read the caches this file writes (rewardfl not involved)."""
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache
    from modelscope.hub.snapshot_download import snapshot_download as ms_snapshot_download
    from modelscope_hub.api import HubApi  # its scan_cache is what `modelscope scan-cache` reads

    hf, ms = caches["hf"], caches["ms"]
    found = try_to_load_from_cache(I2V, "high_noise_model/diffusion_pytorch_model.safetensors", cache_dir=hf)
    assert isinstance(found, str)
    assert open(found, "rb").read() == open(repos["hf"][I2V]["high_noise_model/diffusion_pytorch_model.safetensors"],
                                            "rb").read()
    assert {r.repo_id for r in scan_cache_dir(hf).repos} == {I2V, T2V}
    tokenizer = os.path.join(snapshot_download(T2V, local_files_only=True, cache_dir=hf), "google", "umt5-xxl")
    assert sorted(f"google/umt5-xxl/{f}" for f in os.listdir(tokenizer)) == sorted(repos["hf"][T2V])

    assert {r.repo_id for r in HubApi().scan_cache(ms).repos} == {I2V, T2V, CONVERTED}
    snapshot = ms_snapshot_download(I2V, local_files_only=True, cache_dir=ms)
    assert sorted(os.listdir(os.path.join(snapshot, "high_noise_model"))) == [
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.json"]
    with pytest.raises(Exception, match="Cannot find cached snapshot"):
        ms_snapshot_download("Wan-AI/Wan2.2-T2V-A14B", local_files_only=True, cache_dir=ms)


def test_the_connection_guard_sees_an_attempt(connections):
    # the guard every test relies on would catch a client connecting
    with pytest.raises(OSError, match="no network in tests"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    assert connections == [("127.0.0.1", 9)]
    connections.clear()


# --------------------------------------------------------------------------- the demo model loads from each cache


def test_demo_model_loads_from_the_hugging_face_cache(caches, tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    use_caches(monkeypatch, tmp_path, hf=caches["hf"], ms=caches["empty"])
    model = build_tiny(tiny_dir, model_paths=None, model_id_with_origin_paths=USER_SPEC)
    assert_is_the_tiny_twin(model, tiny_dir)

    config = tiny_config(tiny_dir, model_paths=None, model_id_with_origin_paths=USER_SPEC)
    lines = Wan22TinyModel.check(config, tiny_options(config))
    assert len(lines) == 5, lines
    for line, pattern in zip(lines, USER_SPEC.split(",")):
        assert f"{pattern} in the Hugging Face cache" in line, line
        assert caches["hf"] in line and "snapshots" in line
    assert lines[4].startswith(f"tokenizer: {T2V}:google/umt5-xxl/ in the Hugging Face cache; {caches['hf']}")


def test_demo_model_loads_from_the_modelscope_cache(caches, tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    # sharded DiTs; text encoder and VAE found where DiffSynth-Studio redirects the .pth files
    use_caches(monkeypatch, tmp_path, hf=caches["empty"], ms=caches["ms"])
    model = build_tiny(tiny_dir, model_paths=None, model_id_with_origin_paths=USER_SPEC)
    assert_is_the_tiny_twin(model, tiny_dir)

    config = tiny_config(tiny_dir, model_paths=None, model_id_with_origin_paths=USER_SPEC)
    lines = Wan22TinyModel.check(config, tiny_options(config))
    assert [line.split(": ", 1)[0] for line in lines] == [f"model_id_with_origin_paths[{i}]" for i in range(4)] + [
        "tokenizer"]
    assert all("in the ModelScope cache" in line and caches["ms"] in line for line in lines), lines
    assert "00001-of-00002.safetensors" in lines[0] and "00002-of-00002.safetensors" in lines[0]
    assert f"{CONVERTED}:models_t5_umt5-xxl-enc-bf16.safetensors in the ModelScope cache" in lines[2]
    assert f"{CONVERTED}:Wan2.1_VAE.safetensors in the ModelScope cache" in lines[3]


def test_empty_tokenizer_path_next_to_model_paths_uses_the_default_tokenizer(caches, tiny_dir, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    use_caches(monkeypatch, tmp_path, hf=caches["empty"], ms=caches["ms"])
    spec = json.load(open(os.path.join(tiny_dir, "model_paths.json")))
    del spec["tokenizer"]
    spec = {k: os.path.join(tiny_dir, v) for k, v in spec.items()}
    paths = tmp_path / "paths.json"
    paths.write_text(json.dumps(spec))
    model = build_tiny(tiny_dir, model_paths=str(paths), tokenizer_path="")
    assert_is_the_tiny_twin(model, tiny_dir)
    config = tiny_config(tiny_dir, model_paths=str(paths))
    lines = Wan22TinyModel.check(config, tiny_options(config))
    assert lines[0] == f"model_paths['high_noise_model']: {spec['high_noise_model']}"
    assert lines[-1].startswith(f"tokenizer: {T2V}:google/umt5-xxl/ in the ModelScope cache; {caches['ms']}")


# --------------------------------------------------------------------------- nothing found, nothing downloaded


@pytest.mark.parametrize("spec, named", [
    (f"{I2V}:high_noise_model/*.safetensors,Wan-AI/Wan2.2-T2V-A14B:low_noise_model/*.safetensors",
     "Wan-AI/Wan2.2-T2V-A14B:low_noise_model/*.safetensors"),  # an id in no cache
    (f"{I2V}:high_noise_model/diffusion_pytorch_model*.bin", f"{I2V}:high_noise_model/diffusion_pytorch_model*.bin"),
    (f"{I2V}:Wan2.2_VAE.pth", f"{I2V}:Wan2.2_VAE.pth or {CONVERTED}:Wan2.2_VAE.safetensors"),  # and its redirect
], ids=["id in no cache", "pattern matching nothing", "nor its DiffSynth redirect"])
def test_an_id_or_pattern_matching_nothing_is_a_one_line_error(caches, tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                               connections, spec, named):
    use_caches(monkeypatch, tmp_path, hf=caches["hf"], ms=caches["ms"])
    for attempt in (lambda: build_tiny(tiny_dir, model_paths=None, model_id_with_origin_paths=spec),
                    lambda: Wan22TinyModel.check(*_with_options(tiny_config(tiny_dir, model_paths=None,
                                                                            model_id_with_origin_paths=spec)))):
        with pytest.raises(ModelSourceNotFound) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"model_id_with_origin_paths: no local file matches {named} (looked in ")
        assert caches["hf"] in message and caches["ms"] in message and "allow_download: true" in message
    assert connections == []


def test_malformed_origin_path_is_a_config_error(tiny_dir):  # noqa: F811
    with pytest.raises(ValueError, match=r"model_id_with_origin_paths: 'Wan-AI/Wan2.2-I2V-A14B' is not "
                                         r"'org/name:file_pattern'"):
        build_tiny(tiny_dir, model_paths=None, model_id_with_origin_paths=I2V)


def test_allow_download_false_never_opens_a_connection(caches, tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                        connections):
    # nothing cached anywhere: both clients are asked, offline, and the answer is an error, not a download
    use_caches(monkeypatch, tmp_path, hf=caches["empty"], ms=caches["empty"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ModelSourceNotFound, match=rf"no local file matches {I2V}:high_noise_model"):
        build_tiny(tiny_dir, model_paths=None, model_id_with_origin_paths=USER_SPEC)
    # the tokenizer alone missing (weights listed, tokenizer_path empty)
    spec = json.load(open(os.path.join(tiny_dir, "model_paths.json")))
    del spec["tokenizer"]
    paths = tmp_path / "paths.json"
    paths.write_text(json.dumps({k: os.path.join(tiny_dir, v) for k, v in spec.items()}))
    with pytest.raises(ModelSourceNotFound, match=rf"^tokenizer_path: not set: no local file matches "
                                                  rf"{T2V}:google/umt5-xxl/ .*never downloads unless allow_download"):
        build_tiny(tiny_dir, model_paths=str(paths))
    assert connections == []
    assert os.listdir(caches["empty"]) == []  # and nothing was written into the caches


# --------------------------------------------------------------------------- run --check


def test_run_check_prints_the_model_lines_and_fails_in_one_line(caches, tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                capsys):
    from rewardfl import run
    from rewardfl.cli import user_error_exit
    from rewardfl.config import load_config
    from rewardfl.interfaces import Reward
    from rewardfl.registry import resolve_config, resolve_plugins

    class NoFilesReward(Reward):  # a reward without files of its own: only the model's lines print
        differentiable = True  # as the default algorithm (reward backprop) needs

        def __call__(self, videos, contexts):
            raise NotImplementedError

    use_caches(monkeypatch, tmp_path, hf=caches["hf"], ms=caches["ms"])

    @user_error_exit("rewardfl.run")
    def check(argv):
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump({"model_name": "wan2_2_tiny", "model_id_with_origin_paths": argv[0],
                                        "lora_rank": 4, "output_dir": str(tmp_path / "out")}))
        cfg = load_config(str(path))
        plugins = resolve_plugins(cfg)
        cfg = resolve_config(cfg, plugins)
        run.check(cfg, {**plugins, "reward": NoFilesReward}, str(path))
        return 0

    assert check([USER_SPEC]) == 0
    out = capsys.readouterr().out.splitlines()
    model = [line for line in out if line.startswith("model    ") and "wan2_2_tiny" not in line]
    assert len(model) == 5, out
    assert "high_noise_model/diffusion_pytorch_model*.safetensors in the Hugging Face cache" in model[0]
    assert model[4].startswith(f"model    tokenizer: {T2V}:google/umt5-xxl/ in the Hugging Face cache")
    assert out[-1].startswith("config ok")

    assert check([f"{I2V}:nothing/*.safetensors"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"rewardfl.run: error: model_id_with_origin_paths: no local file matches "
                                   f"{I2V}:nothing/*.safetensors")


# --------------------------------------------------------------------------- allow_download: the clients' downloads


@pytest.fixture
def fake_hubs(monkeypatch, repos):
    """The clients' download and listing calls, answered from ``repos`` without a network.

    Offline look-ups (``local_files_only=True``) go to the real functions; a download writes the
    repository's matching files into the client's standard cache, in its layout, and records the call.
    """
    import fnmatch
    import importlib

    import huggingface_hub
    import modelscope_hub.config
    from huggingface_hub import constants

    # modelscope's package is lazy: its submodules are reached through importlib, not attributes
    ms_download, ms_api = (importlib.import_module(f"modelscope.hub.{m}") for m in ("snapshot_download", "api"))
    calls = []
    real_hf, real_ms = huggingface_hub.snapshot_download, ms_download.snapshot_download

    def matching(hub, repo_id, pattern):
        return {rel: src for rel, src in repos[hub].get(repo_id, {}).items() if fnmatch.fnmatch(rel, pattern)}

    def hf(repo_id, *, allow_patterns=None, local_files_only=False, dry_run=False, **kwargs):
        if local_files_only:
            return real_hf(repo_id, allow_patterns=allow_patterns, local_files_only=True, **kwargs)
        calls.append(("huggingface", repo_id, allow_patterns, "dry_run" if dry_run else "download"))
        files = matching("hf", repo_id, allow_patterns)
        if dry_run:
            return [huggingface_hub.DryRunFileInfo(commit_hash="0" * 40, file_size=os.path.getsize(src), filename=rel,
                                                   local_path="", is_cached=False, will_download=True)
                    for rel, src in files.items()]
        return write_hf_cache(constants.HF_HUB_CACHE, repo_id, files)

    def ms(model_id, *, allow_patterns=None, local_files_only=False, progress_callbacks=None, **kwargs):
        if local_files_only:
            return real_ms(model_id, allow_patterns=allow_patterns, local_files_only=True, **kwargs)
        calls.append(("modelscope", model_id, allow_patterns, progress_callbacks))
        return write_ms_cache(str(modelscope_hub.config.get_default_config().cache_dir), model_id,
                              matching("ms", model_id, allow_patterns))

    class HubApi:
        def get_model_files(self, model_id, recursive=False):
            calls.append(("modelscope", model_id, "listing", recursive))
            return [{"Path": rel, "Size": os.path.getsize(src)} for rel, src in repos["ms"].get(model_id, {}).items()]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hf)
    monkeypatch.setattr(ms_download, "snapshot_download", ms)
    monkeypatch.setattr(ms_api, "HubApi", HubApi)
    return calls


def test_allow_download_fetches_with_the_client_into_its_cache_then_finds_it_there(  # noqa: F811
        caches, tiny_dir, tmp_path, monkeypatch, fake_hubs):
    from modelscope.hub.callback import TqdmCallback

    hf, ms = str(tmp_path / "hf"), str(tmp_path / "ms")
    use_caches(monkeypatch, tmp_path, hf=hf, ms=ms)  # empty: ModelScope, DiffSynth's default source, downloads
    config = dict(model_paths=None, model_id_with_origin_paths=USER_SPEC, allow_download=True)

    lines = Wan22TinyModel.check(*_with_options(tiny_config(tiny_dir, **config)))
    assert lines[0] == (f"model_id_with_origin_paths[0]: {I2V}:high_noise_model/diffusion_pytorch_model*.safetensors "
                        "(would download 2 files (0.0 GB) from ModelScope)")
    assert f"{CONVERTED}:Wan2.1_VAE.safetensors (would download 1 file " in lines[3]
    assert lines[4].startswith(f"tokenizer: {T2V}:google/umt5-xxl/ (would download ")
    assert not os.path.exists(ms) and all(c[2] == "listing" for c in fake_hubs)  # check downloads nothing
    fake_hubs.clear()

    model = build_tiny(tiny_dir, **config)
    assert_is_the_tiny_twin(model, tiny_dir)
    assert fake_hubs == [("modelscope", I2V, "high_noise_model/diffusion_pytorch_model*.safetensors", [TqdmCallback]),
                         ("modelscope", I2V, "low_noise_model/diffusion_pytorch_model*.safetensors", [TqdmCallback]),
                         ("modelscope", CONVERTED, "models_t5_umt5-xxl-enc-bf16.safetensors", [TqdmCallback]),
                         ("modelscope", CONVERTED, "Wan2.1_VAE.safetensors", [TqdmCallback]),
                         ("modelscope", T2V, "google/umt5-xxl/*", [TqdmCallback])]
    fake_hubs.clear()
    lines = Wan22TinyModel.check(*_with_options(tiny_config(tiny_dir, **config)))
    assert all("in the ModelScope cache" in line for line in lines) and fake_hubs == []


def test_allow_download_from_hugging_face_when_diffsynth_download_source_says_so(  # noqa: F811
        caches, tiny_dir, tmp_path, monkeypatch, fake_hubs):
    hf = str(tmp_path / "hf")
    use_caches(monkeypatch, tmp_path, hf=hf, ms=caches["empty"])
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "HuggingFace")  # DiffSynth-Studio's switch
    # the DiTs by hub id, the text encoder and VAE by path, the tokenizer by default
    listed = json.load(open(os.path.join(tiny_dir, "model_paths.json")))
    paths = tmp_path / "paths.json"
    paths.write_text(json.dumps({k: os.path.join(tiny_dir, listed[k]) for k in ("text_encoder", "vae")}))
    spec = f"{I2V}:high_noise_model/diffusion_pytorch_model*.safetensors,{I2V}:low_noise_model/*.safetensors"
    config = dict(model_paths=str(paths), model_id_with_origin_paths=spec, allow_download=True)

    lines = Wan22TinyModel.check(*_with_options(tiny_config(tiny_dir, **config)))
    assert lines[0] == f"model_paths['text_encoder']: {os.path.join(tiny_dir, listed['text_encoder'])}"
    assert lines[2].endswith(f"{I2V}:high_noise_model/diffusion_pytorch_model*.safetensors (would download 1 file "
                             "(0.0 GB) from Hugging Face)")
    assert [c[3] for c in fake_hubs] == ["dry_run"] * 3 and not os.path.exists(hf)
    fake_hubs.clear()

    model = build_tiny(tiny_dir, **config)
    assert_is_the_tiny_twin(model, tiny_dir)
    assert fake_hubs == [("huggingface", I2V, "high_noise_model/diffusion_pytorch_model*.safetensors", "download"),
                         ("huggingface", I2V, "low_noise_model/*.safetensors", "download"),
                         ("huggingface", T2V, "google/umt5-xxl/*", "download")]
    fake_hubs.clear()
    lines = Wan22TinyModel.check(*_with_options(tiny_config(tiny_dir, **config)))
    assert all("in the Hugging Face cache" in line for line in lines[2:]) and fake_hubs == []
