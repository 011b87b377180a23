"""Shared fixtures: offline, one thread, the tiny SD-shaped model built once per session."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from threads, and two multi-threaded processes on a 2-core machine
# slow each other down a hundredfold.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    from stylediffusion.models import load_models

    return load_models("tiny")


@pytest.fixture(scope="session")
def tokenizer():
    from stylediffusion.models import sd_tokenizer

    return sd_tokenizer()


@pytest.fixture(scope="session")
def testbed_editor():
    """The trained test-bed model behind the API's editor (CPU, no progress bars), loaded once."""
    from stylediffusion import StyleDiffusionEditor

    return StyleDiffusionEditor.from_pretrained("testbed", device="cpu", progress=False)


@pytest.fixture(scope="session")
def noise_photo(tmp_path_factory):
    """A 64x64 PNG of uniform noise (an image file with no structure, for the surfaces' round trips)."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("noise_photo") / "photo.png"
    Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    return path
