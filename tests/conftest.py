import os
import sys

import pytest

# every compacted row the scheduler sends is checked against a scan of vLLM's block list
# (the ledger caches block ids by position; engines started by the tests inherit this)
os.environ.setdefault("KVEVICT_CHECK_ROWS", "1")
# and every decision is logged (tests rebuild reference attention masks from the log)
os.environ.setdefault("KVEVICT_EVICTION_LOG", "1")
# metrics snapshots written at every step that changed them (tests scrape right after a request)
os.environ.setdefault("VLLM_KVEVICT_METRICS_INTERVAL_S", "0")

# the shared helpers (engine_helpers, policy_stats, crafted cases) are plain modules in support/;
# the benchmarks' modules (bench_scheduler's real scheduler, tasks, report) are tested too
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, "support"), os.path.join(_HERE, "..", "benchmarks")]


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: its tensors are tiny, and intra-op threads only add
    contention (20x slower on a busy 2-core box). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch  # not at import: the kernel tests set up Triton's interpreter first

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
