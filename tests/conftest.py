"""Shared fixtures.

The local Hub (tests/hub_server.py) starts first, at import time: huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_TOKEN once, when it is imported (huggingface_hub.constants), and
timm and datasets import it. So the block below must stay above any import of those libraries.
"""

import atexit
import os
import shutil
import sys
import tempfile

# --- local Hub: runs before anything imports huggingface_hub ------------------------------

if "huggingface_hub" in sys.modules:
    raise RuntimeError(
        "huggingface_hub was imported before tests/conftest.py could point it at the local Hub; "
        "move that import out of the pytest plugin or configuration that triggers it"
    )

from hub_server import HubServer  # noqa: E402 - pytest puts tests/ on sys.path for its conftest

HUB_TOKEN = "hf_local_test_token"
_HUB = HubServer(token=HUB_TOKEN).start()
_HUB.home = tempfile.mkdtemp(prefix="hf-home-")
_HUB_ENV = {
    "HF_ENDPOINT": _HUB.url,
    "HF_HOME": _HUB.home,
    "HF_TOKEN": HUB_TOKEN,
    "HF_HUB_DISABLE_XET": "1",  # the local Hub speaks LFS, not Xet
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
# Offline switches, and cache or token locations that would escape the temporary HF_HOME.
_UNSET_VARS = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_DATASETS_CACHE", "HF_XET_CACHE",
    "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "HUGGING_FACE_HUB_TOKEN",
)


def _no_proxy_for_localhost() -> str:
    hosts = [h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h]
    return ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])


_HUB_ENV["NO_PROXY"] = _HUB_ENV["no_proxy"] = _no_proxy_for_localhost()
os.environ.update(_HUB_ENV)
for _name in _UNSET_VARS:
    os.environ.pop(_name, None)


def _stop_hub() -> None:
    _HUB.stop()
    shutil.rmtree(_HUB.home, ignore_errors=True)


atexit.register(_stop_hub)

# --- end of the local Hub set-up ------------------------------------------------------------

import pytest  # noqa: E402


def tiny_model_dir(directory, label_names=None):
    """A saved random-weight ``test_efficientnet`` of 10 classes at 32 px: a model directory for tests."""
    import torch
    from timm_noisystudent.models import load_model, save_model
    torch.manual_seed(0)
    model = load_model('test_efficientnet', pretrained=False, num_classes=10)
    return save_model(model, directory, label_names=label_names or [str(i) for i in range(10)],
                      data_config={'input_size': (3, 32, 32), 'crop_pct': 1.0, 'interpolation': 'bilinear',
                                   'mean': (0.5,) * 3, 'std': (0.5,) * 3})


def error_line(err: str) -> str:
    """The one `error:` line a command that failed on bad input printed; no traceback beside it."""
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(lines) == 1, err[-3000:]
    assert 'Traceback' not in err
    return lines[0]


def hub_env(**extra: str) -> dict[str, str]:
    """A full environment for a subprocess (accelerate launch, the CLI) that uses the local Hub."""
    env = {k: v for k, v in os.environ.items() if k not in _UNSET_VARS}
    env.update(_HUB_ENV)
    env.update(extra)
    return env


def pytest_unconfigure(config):
    _stop_hub()


@pytest.fixture
def hub_server():
    """The session's local Hub, a tests/hub_server.HubServer, with a clean request log.

    `url`, `token` (the HF_TOKEN the clients send), `home` (HF_HOME), `user`; `requests`,
    `unhandled`; `commits()`, `files()`, `lfs_files()`, `create_repo()`, `commit()`,
    `unique_repo_id()`; `rejected_tokens`, `read_only_tokens`, `read_only_repos` and the
    faults of `fail()`, `drop()`, `cut()` and `slow()` (reset after each test). Repos persist
    for the session: use `unique_repo_id()` for new ones.
    """
    _HUB.clear_log()
    yield _HUB
    _HUB.clear_faults()
    _HUB.rejected_tokens.clear()
    _HUB.read_only_tokens.clear()
    _HUB.read_only_repos.clear()
