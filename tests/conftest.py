"""Shared fixtures: a real one-node Slurm cluster for the tests marked `slurm`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.slurm_cluster import ClusterUnavailable, SlurmCluster, local_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One cluster for the whole session: starting one takes a few seconds."""
    try:
        with local_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as err:
        pytest.skip(f"no local Slurm cluster: {err}")
