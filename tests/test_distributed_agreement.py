"""Class-parallel losses when the ranks disagree: every rank must raise the same error within seconds (no hang to the
process-group timeout, no gloo abort, no silent number), or, for a target no rank owns with the value checks off,
return NaN on every rank as the single-process path does.

One spawn of 2 gloo ranks (timeout 20 s) runs every case on both backends ('torch', and 'triton': the fused kernels,
in the Triton interpreter on CPU); each rank records its outcome, message and time per case, and the tests below
assert them. `pytest -s` prints the table.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepfense.distributed import _kept_quota
from distributed_cases import CASES, EXPECT

WORLD, TIMEOUT_S, FAST_S = 2, 20, 8.0  # every outcome must arrive well inside the process-group timeout
pytestmark = pytest.mark.xdist_group("distributed_agreement")


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    results = {}
    try:
        for name, (case, backends) in CASES.items():
            for backend in backends:
                start = time.monotonic()
                try:
                    detail = case(rank, backend)
                    outcome, message = "ok", json.dumps(detail) if detail else ""
                except Exception as exc:  # noqa: BLE001 - the outcome under test
                    outcome, message = type(exc).__name__, str(exc)
                results[f"{name}[{backend}]"] = dict(outcome=outcome, message=message,
                                                      seconds=time.monotonic() - start)
                gc.collect()  # DDP objects of a case must go while the group lives
                dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("agreement")
    start = time.monotonic()
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    print(f"\n{WORLD} gloo ranks, all cases: {time.monotonic() - start:.1f} s wall (spawn included)")
    for key in ranks[0]:
        cells = " | ".join(f"{rk[key]['outcome']} {rk[key]['seconds']:.2f} s: {rk[key]['message'][:70]}"
                           for rk in ranks)
        print(f"| {key} | {cells} |")
    return ranks


CASE_KEYS = [f"{name}[{b}]" for name, (_, backends) in CASES.items() for b in backends]


@pytest.mark.parametrize("key", CASE_KEYS)
def test_every_rank_gets_the_outcome_in_seconds(outcomes, key):
    expected = EXPECT[key.split("[")[0]]
    for rank, got in enumerate(r[key] for r in outcomes):
        outcome, fragment = expected[rank] if isinstance(expected, dict) else expected
        assert got["outcome"] == outcome, f"rank {rank}: {got}"
        assert fragment in got["message"], f"rank {rank}: {fragment!r} not in {got['message']!r}"
        if outcome != "ok":  # an error must not wait for the timeout (an 'ok' case's time is its compute)
            assert got["seconds"] < FAST_S, f"rank {rank} took {got['seconds']:.1f} s (timeout {TIMEOUT_S} s)"


def test_partial_fc_keeps_an_integer_quota():
    # 0.07 * 100 is 7.000000000000001 in floating point: its ceil would keep 8 of 100 classes
    assert [_kept_quota(0.07, 100), _kept_quota(0.1, 30), _kept_quota(0.25, 9), _kept_quota(1.0, 5)] == [7, 3, 3, 5]
    assert _kept_quota(1e-9, 10) == 1 and _kept_quota(0.3, 10) == 3
