import pytest

from simsearch.errors import SimsearchError
from simsearch.retrieval.index_plan import (FLAT_MAX, HNSW_AUTO_DIM, HNSW_AUTO_MAX, KMEANS_BUDGET, IndexPlan,
                                            choose_index, ivf_lists, parse_bytes)

GiB = 1 << 30


@pytest.mark.parametrize("count, dim, budget, plan", [
    (FLAT_MAX, 1280, 8 * GiB, IndexPlan("flat")),
    (FLAT_MAX + 1, 256, 8 * GiB, IndexPlan("ivf", 256)),  # 4*sqrt(10k) = 400 -> 512, capped at 10k / 39
    (FLAT_MAX + 1, 1280, 8 * GiB, IndexPlan("hnsw", hnsw_m=32)),  # wide vectors: a graph, up to HNSW_AUTO_MAX
    (100_000, 1280, 8 * GiB, IndexPlan("hnsw", hnsw_m=32)),
    (100_000, 256, 8 * GiB, IndexPlan("ivf", 1024)),
    (HNSW_AUTO_MAX + 1, 1280, 8 * GiB, IndexPlan("ivf", 1024)),
    (1_000_000, 256, 8 * GiB, IndexPlan("ivf", 4096)),  # 1.0 GB of float32: fits
    (1_000_000, 1280, 8 * GiB, IndexPlan("ivf", 1024)),  # 4096 or 2048 lists: k-means over KMEANS_BUDGET
    (1_000_000, 1280, 4 * GiB, IndexPlan("sq8", 1024)),  # 5.1 GB float32 does not fit, 1.3 GB of sq8 does
    (10_000_000, 256, 8 * GiB, IndexPlan("sq8", 16384, hnsw_m=32)),  # the 10M x 256 in 8 GB
    (10_000_000, 1280, 8 * GiB, IndexPlan("ivfpq", 16384, 64, 32)),
    (10_000_000, 1280, 512 << 20, IndexPlan("ivfpq", 16384, 32, 32)),  # the largest PQ code that fits
])
def test_auto_is_a_pure_function_of_count_dim_and_budget(count, dim, budget, plan):
    assert choose_index(count, dim, budget) == plan == choose_index(count, dim, budget)
    assert plan.memory_bytes(count, dim) <= budget


def test_sizes_and_factory_strings():
    assert ivf_lists(40) == 1 and ivf_lists(1_000_000) == 4096  # at least 39 training vectors per list
    assert ivf_lists(1_000_000, 256) == 4096 and ivf_lists(1_000_000, 1280) == 1024
    assert ivf_lists(2_000_000, 1280) == 4096  # with an HNSW quantiser assignment is not brute force: no cap
    assert IndexPlan("ivfpq", 4096, 32).factory(1280) == "OPQ32_128,IVF4096,PQ32"
    assert IndexPlan("sq8", 16384, hnsw_m=32).factory(256) == "IVF16384_HNSW32,SQ8"
    assert IndexPlan("hnsw", hnsw_m=32).factory(64) == "IDMap,HNSW32"
    assert IndexPlan("sq8", 16).bytes_per_vector(256) == 264 and IndexPlan("ivfpq", 16, 32).bytes_per_vector(256) == 40


def test_an_explicit_kind_is_built_as_asked_and_nothing_fitting_is_an_error():
    assert choose_index(50, 64, 1 * GiB, "hnsw").kind == "hnsw"
    assert choose_index(2_000_000, 256, 1 * GiB, "ivf").kind == "ivf"  # over budget: built anyway (the caller warns)
    with pytest.raises(SimsearchError, match="raise --max-index-memory"):
        choose_index(100_000_000, 256, 256 << 20)
    with pytest.raises(SimsearchError, match="available: auto, flat"):
        choose_index(10, 8, GiB, "annoy")


def test_memory_sizes_parse():
    assert parse_bytes("8G") == 8 * GiB and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5gb") == int(1.5 * GiB)
    assert parse_bytes("1000") == 1000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(SimsearchError):
            parse_bytes(bad)


@pytest.mark.parametrize("count", [20_000, 100_000, 500_000, 1_000_000, 1_999_999])
@pytest.mark.parametrize("dim", [128, 256, 512, 768, 1280, 2048])
def test_lists_keep_the_k_means_cost_within_its_budget(count, dim):
    nlist = ivf_lists(count, dim)
    assert nlist * nlist * dim <= KMEANS_BUDGET and nlist <= ivf_lists(count)  # the cap only lowers 4*sqrt(n)
    assert nlist == ivf_lists(count) or (2 * nlist) ** 2 * dim > KMEANS_BUDGET  # halved no further than needed


def test_hnsw_is_auto_only_for_wide_vectors_up_to_its_limit_and_within_the_budget():
    assert choose_index(50_000, HNSW_AUTO_DIM, 8 * GiB).kind == "hnsw"
    assert choose_index(50_000, HNSW_AUTO_DIM - 1, 8 * GiB).kind == "ivf"
    assert choose_index(HNSW_AUTO_MAX + 1, 1280, 8 * GiB).kind == "ivf"
    graph = IndexPlan("hnsw", hnsw_m=32).memory_bytes(100_000, 1280)
    assert choose_index(100_000, 1280, graph - 1).kind == "ivf"  # the graph (its links) does not fit: IVF does
