"""Shared test settings.

Tiny models run fastest on one thread (with two, OpenMP threads spin-wait on each other for
millisecond-sized ops, many times slower on a busy machine); tests marked `slow` (full Stable
Diffusion configs) keep torch's default thread count.

`vae_file` is the stage-1 output the stage-2 training tests start from; `tiny_model_file` the tiny random model as a
file; `serving` is the one way the tests serve a `daguerre.server.app.Server` over real sockets.
"""

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "daguerre" / "assets" / "configs"  # the shipped run configs


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", **kwargs) -> Iterator[int]:
    """The port of `app` (a Server) served by `daguerre serve`'s HTTP layer in a thread on a free port of `host`
    (`kwargs`: make_http_server's access, timeout, max_connections, ...); shut down and closed on exit."""
    from daguerre.server.http import make_http_server

    http = make_http_server(app, host, 0, **kwargs)
    thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield http.server_address[1]
    finally:
        http.shutdown()
        http.server_close()


@pytest.fixture(autouse=True)
def _threads_for_test_size(request):
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The Fashion-MNIST folder, for the tests that read it: a missing data set fails these tests with what to run
    (`make test` installs it: scripts/ensure-fashion-mnist), never skips them silently."""
    from daguerre.data.fashion_mnist import DEFAULT_ROOT

    root = Path(DEFAULT_ROOT)
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST is missing from {root} ({', '.join(missing)}): run `make fashion-mnist` "
                    "(as root it installs Debian's dataset-fashion-mnist)", pytrace=False)
    return root


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright (a test dependency; never `playwright install`, which downloads
    browsers). A missing browser fails the tests that use it with what to run, never skips them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is missing: run `make test` (as root it installs Debian's chromium), or "
                    "`apt-get install chromium`", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> Path:
    """A freshly initialised tiny autoencoder (tiny_vae.toml) saved as a stage-1 output, scale measured."""
    from daguerre.checkpoints.vae_file import save_vae
    from daguerre.data.shapes import ShapesDataset
    from daguerre.models.autoencoder import AutoencoderKL
    from daguerre.training.config import derive_model_config, load_run_config
    from daguerre.training.vae import measure_scale

    cfg = load_run_config(CONFIGS / "tiny_vae.toml", "vae")
    model_cfg = derive_model_config(cfg, 3, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(model_cfg.vae).eval()
    images = torch.stack([ShapesDataset(8, seed=1, size=32)[i]["image"] for i in range(8)])
    model_cfg.vae.scale_factor = measure_scale(vae, images)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_vae(vae, model_cfg, path)
    return path


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """An empty folder standing for the package's shipped models (`checkpoints.shipped.models_folder`)."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    monkeypatch.setattr("daguerre.checkpoints.shipped.models_folder", lambda: folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """The tiny random model saved in fp16 (as model files usually are); tests read it, never write it."""
    from daguerre.checkpoints import save_model
    from daguerre.registry import open_model

    path = tmp_path_factory.mktemp("tiny_model") / "tiny.safetensors"
    comps, _ = open_model("random:tiny", dtype="fp32")
    save_model(comps, path, dtype=torch.float16)
    return path


@pytest.fixture
def mid_size_fp16_files(tmp_path) -> tuple[Path, Path]:
    """(a ~64M-parameter model, the tiny one), both saved in fp16: what the peak-memory tests of a load read
    (the tiny one is loaded first, so that the measure starts with torch and daguerre imported and warm)."""
    import dataclasses

    from daguerre.checkpoints import save_model
    from daguerre.components import build_components
    from daguerre.config import preset

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, model_channels=256))  # ~64M parameters
    path, small = tmp_path / "mid.safetensors", tmp_path / "small.safetensors"
    save_model(build_components(cfg), path, dtype=torch.float16)
    save_model(build_components(preset("tiny")), small, dtype=torch.float16)
    return path, small
