"""ImageNet weights by name (``msra:R-50``, ``torchvision:IMAGENET1K_V1``): downloaded once into
torch hub's cache from a real HTTP server on 127.0.0.1, checked by SHA-256, refused when
corrupted, a clear error (exit 2) when the server cannot be reached, one download for two
ranks of a process group; torchvision's names through torchvision's weights API."""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
import torchvision
from test_engine import run_two_ranks, tiny_config

from autoassign.config import ExperimentConfig, ModelConfig
from autoassign.data.synthetic import write_synthetic
from autoassign.engine import Trainer
from autoassign.errors import ConfigError
from autoassign.model.backbone import build_resnet
from autoassign.model.pretrained import (
    PretrainedWeightsError,
    fetch_on_main_process_first,
    weights_file,
)
from autoassign.model.weights import load_backbone_weights

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
EPS = 1e-5  # FrozenBatchNorm2d's


# --------------------------------------------------------------------------------------------
# A small real MSRA file: Caffe2 blobs of a ResNet-50, written as Detectron's pickles are
# --------------------------------------------------------------------------------------------


def caffe2_blob_name(key: str) -> str:
    """torchvision ResNet name -> Caffe2/Detectron blob name (``res2_0_branch2a_bn_s``)."""
    module, field = key.rsplit(".", 1)
    suffix = {"weight": "_w", "bias": "_b"}[field]
    if module in ("conv1", "bn1"):
        return "conv1_w" if module == "conv1" else "res_conv1_bn" + suffix.replace("_w", "_s")
    layer, block, part = module.split(".", 2)
    stem = f"res{int(layer[len('layer') :]) + 1}_{block}_"
    if part.startswith("downsample"):
        stem += "branch1"
        is_norm = part == "downsample.1"
    else:
        stem += "branch2" + "abc"[int(part[-1]) - 1]
        is_norm = part.startswith("bn")
    return stem + ("_bn" + suffix.replace("_w", "_s") if is_norm else suffix)


@pytest.fixture(scope="module")
def msra_r50(tmp_path_factory):
    """``(file bytes, its SHA-256, the backbone state dict it must load as)``: random conv
    weights and BatchNorm affines of a caffe ResNet-50, as bare blobs (Caffe2's frozen BN)."""
    rng = np.random.default_rng(0)
    blobs, expected = {}, {}
    for key, value in build_resnet(depth=50, style="caffe").state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            continue
        array = rng.standard_normal(tuple(value.shape), dtype=np.float32) * 0.05
        blobs[caffe2_blob_name(key)] = array
        expected[key] = torch.from_numpy(array)
        if value.dim() == 1:  # a norm: identity statistics, so that scale and shift are exact
            prefix = key[: -len("weight")] if key.endswith("weight") else None
            if prefix is not None:
                expected[prefix + "running_mean"] = torch.zeros(value.shape)
                expected[prefix + "running_var"] = torch.full(value.shape, 1.0 - EPS)
    blobs["fc1000_w"] = np.zeros((1000, 2048), dtype=np.float32)  # the classifier: ignored
    blobs["fc1000_b"] = np.zeros(1000, dtype=np.float32)
    data = pickle.dumps(blobs, protocol=2)  # Detectron's pickles are protocol 2
    return data, hashlib.sha256(data).hexdigest(), expected


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and counts the GET requests per path."""

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


class Server:
    def __init__(self, folder: Path):
        self.folder = folder
        handler = functools.partial(_CountingHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.hits = collections.Counter()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/detectron2/MSRA"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def hits(self) -> int:
        return self.httpd.hits["/detectron2/MSRA/R-50.pkl"]

    def serve(self, data: bytes) -> None:
        (self.folder / "detectron2" / "MSRA").mkdir(parents=True, exist_ok=True)
        (self.folder / "detectron2" / "MSRA" / "R-50.pkl").write_bytes(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/MSRA"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.delenv("AUTOASSIGN_WEIGHTS_SHA256", raising=False)
    return home


@pytest.fixture
def server(tmp_path, torch_home, monkeypatch):
    served = Server(tmp_path / "served")
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_BASE_URL", served.url)
    yield served
    served.close()


def cache_listing(torch_home: Path) -> list[str]:
    folder = torch_home / "hub" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_backbone_holds(backbone: torch.nn.Module, expected: dict) -> None:
    state = backbone.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------------------
# msra: names
# --------------------------------------------------------------------------------------------


def test_first_use_downloads_then_the_cache_serves(server, torch_home, monkeypatch, msra_r50):
    data, sha256, expected = msra_r50
    server.serve(data)
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_SHA256", f"R-101.pkl={'0' * 64},R-50.pkl={sha256}")
    backbone = build_resnet(depth=50, style="caffe")
    load_backbone_weights(backbone, "msra:R-50")
    assert server.hits == 1
    assert_backbone_holds(backbone, expected)
    cached = torch_home / "hub" / "checkpoints" / "MSRA-R-50.pkl"
    assert cached.read_bytes() == data
    assert cache_listing(torch_home) == ["MSRA-R-50.pkl", "MSRA-R-50.pkl.lock"]  # no partial

    again = build_resnet(depth=50, style="caffe")
    load_backbone_weights(again, "msra:R-50")
    assert server.hits == 1  # from the cache
    assert_backbone_holds(again, expected)
    # What a config names resolves to the same cached file.
    backbone_cfg = ModelConfig(backbone={"weights": "msra:R-50"}).backbone
    assert weights_file(backbone_cfg.weights, depth=backbone_cfg.depth) == cached
    assert server.hits == 1


def test_a_corrupted_download_is_refused_and_not_kept(server, torch_home, monkeypatch, msra_r50):
    data, sha256, expected = msra_r50
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF
    server.serve(bytes(corrupted))
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_SHA256", f"R-50.pkl={sha256}")
    with pytest.raises(PretrainedWeightsError) as refused:
        weights_file("msra:R-50", depth=50, progress=False)
    message = str(refused.value)
    actual = hashlib.sha256(bytes(corrupted)).hexdigest()
    assert f"SHA-256 {actual}, expected {sha256} (from AUTOASSIGN_WEIGHTS_SHA256)" in message
    assert f"{server.url}/R-50.pkl" in message
    assert cache_listing(torch_home) == ["MSRA-R-50.pkl.lock"]
    assert refused.value.exit_code == 2

    server.serve(data)  # the server fixed: the next use downloads again, and keeps it
    backbone = build_resnet(depth=50, style="caffe")
    load_backbone_weights(backbone, "msra:R-50")
    assert server.hits == 2
    assert_backbone_holds(backbone, expected)


def test_a_cached_file_with_the_wrong_checksum_is_refused(torch_home, monkeypatch, msra_r50):
    _, sha256, _ = msra_r50
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_BASE_URL", closed_port_url())
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_SHA256", f"R-50.pkl={sha256}")
    placed = torch_home / "hub" / "checkpoints" / "MSRA-R-50.pkl"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"not the file")
    with pytest.raises(PretrainedWeightsError, match=re.escape(f"expected {sha256}")) as raised:
        weights_file("msra:R-50", depth=50)
    assert f"{placed} has SHA-256 {hashlib.sha256(b'not the file').hexdigest()}" in str(
        raised.value
    )


def test_without_a_checksum_a_download_must_load_and_its_checksum_is_shown(
    server, torch_home, msra_r50, capsys
):
    data, sha256, expected = msra_r50
    server.serve(b"<html>a captive portal</html>")
    with pytest.raises(PretrainedWeightsError, match="is not ResNet-50 weights, refused"):
        weights_file("msra:R-50", depth=50, progress=False)
    assert cache_listing(torch_home) == ["MSRA-R-50.pkl.lock"]

    server.serve(data)
    path = weights_file("msra:R-50", depth=50, progress=False)
    assert path.read_bytes() == data
    shown = capsys.readouterr().err
    assert "no SHA-256 to check it against (none pinned for R-50.pkl" in shown
    assert f"AUTOASSIGN_WEIGHTS_SHA256=R-50.pkl={sha256}" in shown


def test_a_malformed_checksum_variable_is_named(server, monkeypatch):
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_SHA256", "R-50.pkl=abc")
    with pytest.raises(PretrainedWeightsError, match="AUTOASSIGN_WEIGHTS_SHA256: 'R-50.pkl=abc'"):
        weights_file("msra:R-50", depth=50)
    assert server.hits == 0


def test_an_unreachable_server_names_the_url_and_where_to_place_the_file(
    tmp_path, torch_home, monkeypatch
):
    url = closed_port_url()
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_BASE_URL", url)
    target = torch_home / "hub" / "checkpoints" / "MSRA-R-50.pkl"
    with pytest.raises(PretrainedWeightsError) as raised:
        weights_file("msra:R-50", depth=50)
    message = str(raised.value)
    assert f"cannot download {url}/R-50.pkl (" in message
    assert f"place it at {target}, or set AUTOASSIGN_WEIGHTS_BASE_URL to a mirror" in message

    # The training command line: exit 2, the message, no traceback.
    config = tmp_path / "r50.yaml"
    config.write_text(
        "model: {num_classes: 2, backbone: {weights: 'msra:R-50'}}\n"
        f"data: {{root: {tmp_path / 'no-data'}}}\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "device: cpu\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "autoassign.train", str(config)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot download {url}/R-50.pkl" in result.stderr
    assert f"place it at {target}" in result.stderr


def test_names_that_do_not_fit_the_backbone_are_config_errors():
    def problem(**backbone) -> str:
        with pytest.raises(pydantic.ValidationError) as raised:
            ModelConfig(backbone=backbone)
        return str(raised.value)

    assert "msra:R-50 are a ResNet-50 but depth is 101" in problem(depth=101, weights="msra:R-50")
    assert "msra:R-101, torchvision:IMAGENET1K_V1, torchvision:IMAGENET1K_V2" in problem(
        depth=101, weights="msra:R-50"
    )
    assert "caffe-style" in problem(style="pytorch", weights="msra:R-50")
    assert "unknown weights 'msra:R-152'" in problem(weights="msra:R-152")
    assert "torchvision has no weights 'IMAGENET1K_V2' for ResNet-18 (depth 18)" in problem(
        depth=18, style="pytorch", weights="torchvision:IMAGENET1K_V2"
    )
    assert "set style: pytorch" in problem(weights="torchvision:IMAGENET1K_V1")
    assert "norm 'gn'" in problem(norm="gn", weights="msra:R-50")
    # The alias whose meaning changes between torchvision releases is not a name.
    assert "no weights 'DEFAULT'" in problem(style="pytorch", weights="torchvision:DEFAULT")
    # Names stay names; every other string is a path, as before.
    named = ModelConfig(backbone={"depth": 101, "weights": "msra:R-101"})
    assert named.backbone.weights == "msra:R-101"
    assert ModelConfig(backbone={"weights": "pretrained/R-50.pkl"}).backbone.weights == Path(
        "pretrained/R-50.pkl"
    )
    assert ModelConfig(backbone={"weights": "weird:name.pkl"}).backbone.weights == Path(
        "weird:name.pkl"
    )


def test_the_trainer_builds_its_backbone_from_the_named_weights(
    server, tmp_path, monkeypatch, msra_r50
):
    data, sha256, expected = msra_r50
    server.serve(data)
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_SHA256", f"R-50.pkl={sha256}")
    root = tmp_path / "coco"
    write_synthetic("coco", root, num_images={"train": 2, "val": 2}, num_classes=2, image_size=64)
    settings = tiny_config(root, tmp_path / "run").model_dump()
    settings["model"]["backbone"] = {"depth": 50, "style": "caffe", "weights": "msra:R-50"}
    config = ExperimentConfig.model_validate(settings)
    trainer = Trainer(config, device="cpu", show_progress=False)
    trainer.setup()
    assert server.hits == 1
    assert_backbone_holds(trainer.detector.backbone, expected)


# --------------------------------------------------------------------------------------------
# torchvision: names
# --------------------------------------------------------------------------------------------


def test_torchvision_names_use_torchvisions_cache_file(torch_home, monkeypatch):
    """No real torchvision download here: a file placed where torchvision's weights API looks
    (its URL's file name in torch hub's checkpoints folder) is what both it and we load."""
    source = torchvision.models.resnet18()
    torch.manual_seed(3)
    for tensor in source.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(torch.randn_like(tensor) * 0.05)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    placed = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    placed.parent.mkdir(parents=True)
    torch.save(source.state_dict(), placed)
    monkeypatch.setenv("https_proxy", closed_port_url())  # any download attempt would fail

    backbone = build_resnet(depth=18, style="pytorch")
    load_backbone_weights(backbone, "torchvision:IMAGENET1K_V1")
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0, msg=key)
    by_torchvision = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.get_state_dict()
    torch.testing.assert_close(by_torchvision["conv1.weight"], source.conv1.weight.detach())
    # A caffe-style backbone is refused rather than silently given pytorch-style weights.
    with pytest.raises(ConfigError, match="set style: pytorch"):
        load_backbone_weights(build_resnet(depth=18, style="caffe"), "torchvision:IMAGENET1K_V1")


def test_torchvision_offline_names_the_url_and_the_file(torch_home, monkeypatch):
    # Every HTTPS request goes to a proxy where nothing listens: no byte leaves the machine.
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("https_proxy", closed_port_url())
    monkeypatch.setenv("HTTPS_PROXY", closed_port_url())
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    with pytest.raises(PretrainedWeightsError) as raised:
        weights_file("torchvision:IMAGENET1K_V2", depth=50, progress=False)
    target = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    assert f"cannot download {url} (" in str(raised.value)
    assert f"place it at {target}" in str(raised.value)
    assert cache_listing(torch_home) == [target.name + ".lock"]


# --------------------------------------------------------------------------------------------
# Two ranks of a process group
# --------------------------------------------------------------------------------------------


def _two_rank_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    result: dict = {}
    try:
        torch.set_num_threads(1)
        try:
            fetch_on_main_process_first("msra:R-50", depth=50)
            backbone = build_resnet(depth=50, style="caffe")
            load_backbone_weights(backbone, "msra:R-50")
            result["state"] = backbone.state_dict()
        except PretrainedWeightsError as error:
            result["error"] = str(error)
    finally:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def run_ranks(tmp_path: Path, name: str) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    run_two_ranks(_two_rank_worker, str(tmp_path / f"{name}.init"), str(out), timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_two_ranks_download_once_and_share_a_failure(
    server, torch_home, tmp_path, monkeypatch, msra_r50
):
    data, sha256, expected = msra_r50
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_SHA256", f"R-50.pkl={sha256}")
    # Nothing served yet (404): rank 0 alone asks, and rank 1 stops with rank 0's verdict.
    first, second = run_ranks(tmp_path, "ranks-404")
    assert server.hits == 1
    assert "cannot download" in first["error"] and "HTTP Error 404" in first["error"]
    assert second["error"].startswith("rank 0 could not fetch msra:R-50: weights msra:R-50")

    server.serve(data)
    ranks = run_ranks(tmp_path, "ranks-served")
    assert server.hits == 2  # one more: rank 0's
    for result in ranks:
        assert "error" not in result, result.get("error")
        for key, value in expected.items():
            torch.testing.assert_close(result["state"][key], value, rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------------------
# The sweep driver, before Ray starts
# --------------------------------------------------------------------------------------------


def test_the_sweep_check_fills_the_cache_once_for_all_trials(
    server, torch_home, tmp_path, monkeypatch, msra_r50
):
    from orchestration.definition.config_checks import check_dataset_folders
    from orchestration.definition.config_loading import load_sweep_config

    data, sha256, _ = msra_r50
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_SHA256", f"R-50.pkl={sha256}")
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: named\n"
        "base: {model: {backbone: {weights: 'msra:R-50'}}}\n"
        "datasets:\n"
        "  - {name: a, format: coco, root: data/a, num_classes: 3, synthetic: true}\n"
        "  - {name: b, format: voc, root: data/b, num_classes: 2, synthetic: true}\n"
    )
    sweep = load_sweep_config(path)
    with pytest.raises(
        ConfigError,
        match=r"sweep.yaml: datasets.0 \(a\): model.backbone.weights "
        r"msra:R-50 \(set by base\): weights msra:R-50: cannot download .*404",
    ):
        check_dataset_folders(sweep, source=str(path))
    assert server.hits == 1
    server.serve(data)
    check_dataset_folders(sweep, source=str(path))
    assert server.hits == 2  # one download for both datasets' trials
    assert (torch_home / "hub" / "checkpoints" / "MSRA-R-50.pkl").read_bytes() == data
