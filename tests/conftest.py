"""Shared fixtures: a tiny synthetic data set and one small trained CRD checkpoint per session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_CATEGORY = "dome"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crd_model.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(
        root,
        categories=[TINY_CATEGORY],
        seed=3,
        n_train=24,
        n_validation=8,
        n_test_good=8,
        n_test_per_defect=3,
        size_scale=0.6,
    )
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CRD model trained for a few epochs on the tiny set (about half a minute on 2 cores)."""
    from crd_model.config import CRDConfig
    from crd_model.train import TrainOptions, train_category

    out = tmp_path_factory.mktemp("ckpt") / "crd"
    train_category(
        tiny_data,
        TINY_CATEGORY,
        out,
        CRDConfig(image_size=96),
        TrainOptions(epochs=12, batch_size=8, progress=False, seed=0),
    )
    return out


# --- Redis / Valkey ------------------------------------------------------------------------------
# Tests talk to a real server: REDIS_URL if set (CI runs the stream tests against the machine's
# Redis 7 too), else an embedded Valkey started once per session. Every test gets its own line id,
# so its keys never meet another test's.


@pytest.fixture(scope="session")
def redis_url() -> str:
    from crd_model.stream.embedded import redis_server_url

    with redis_server_url() as url:
        yield url


@pytest.fixture
def settings(redis_url: str, request: pytest.FixtureRequest):
    import uuid

    from crd_model.stream.settings import Settings

    line = f"t{uuid.uuid4().hex[:10]}"
    s = Settings(line=line)
    s = s.model_copy(update={"redis": s.redis.model_copy(update={"url": redis_url})})
    yield s
    from crd_model.stream.redis_streams import connect

    r = connect(s.redis)
    for key in r.scan_iter(match=f"{s.streams.prefix}:{{{line}}}:*", count=1000):
        r.delete(key)


@pytest.fixture
def r(settings):
    from crd_model.stream.redis_streams import connect

    return connect(settings.redis)
