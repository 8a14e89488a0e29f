import os
import sys

# every compacted row the scheduler sends is checked against a scan of vLLM's block list
# (the ledger caches block ids by position; engines started by the tests inherit this)
os.environ.setdefault("KVEVICT_CHECK_ROWS", "1")
# and every decision is logged (tests rebuild reference attention masks from the log)
os.environ.setdefault("KVEVICT_EVICTION_LOG", "1")
# metrics snapshots written at every step that changed them (tests scrape right after a request)
os.environ.setdefault("VLLM_KVEVICT_METRICS_INTERVAL_S", "0")

# engine_helpers.py sits beside the tests
sys.path.insert(0, os.path.dirname(__file__))
