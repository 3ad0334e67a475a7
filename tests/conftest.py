import shutil

import pytest

from .dist import run_ranks
from .models import VARIANTS, build_checkpoint, build_layout_checkpoints
from .repo import digest
from .sft_fixtures import chat_tokenizers  # noqa: F401  (a session fixture for the SFT tests)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Every tiny variant saved once per session with save_pretrained; name -> directory."""
    root = tmp_path_factory.mktemp("checkpoints")
    for name in VARIANTS:
        build_checkpoint(name, root / name)
    return root


@pytest.fixture(scope="session")
def equivalence(checkpoints):
    """tp -> {variant -> metrics}, each tp size run once (all variants in one launch of tp ranks)."""
    cache = {}

    def get(tp: int, moe_impl: str = "auto"):
        key = (tp, moe_impl)
        if key not in cache:
            cache[key] = run_ranks(tp, "tests.equivalence:compare", str(checkpoints), list(VARIANTS), tp, moe_impl)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def layouts(checkpoints):
    """Extra storage layouts of a tiny DeepSeek-V2: name -> directory (index-sharded, fused keys, tied)."""
    return build_layout_checkpoints(checkpoints / "_layouts")


@pytest.fixture
def src(checkpoints, tmp_path):
    """A private copy of the tiny DeepSeek-V3 checkpoint, hashed, checked unchanged after each test."""
    path = tmp_path / "src"
    shutil.copytree(checkpoints / "deepseek_v3", path)
    before = digest(path)
    yield path
    assert digest(path) == before, "the source checkpoint was modified"
