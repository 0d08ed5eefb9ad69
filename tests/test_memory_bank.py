"""The memory bank: one epoch's shard per process, by position, and what every re-clustering sees.

`smog train` runs on 1, 2 and 3 real processes (gloo, the launch harness of tests/test_train_distributed.py)
for 3 epochs on 250 digits, so that drop_last leaves samples out (1 process: 250 = 7 x 32 + 26; 2: 125
per rank = 7 x 16 + 13; 3: 83 per rank (one sample dropped by the sampler) = 5 x 16 + 3), and on 2
processes with train.accumulate=2 (each step's 16 rows per rank written as two sub-batches of 8). A driver wraps
the trainer from the outside: every `MemoryBank.write` is recorded with the training step it belongs to
(the fill pass as step -1), and every `on_epoch_start` records each rank's bank and the rows handed to
k-means. The test process then rebuilds, from the writes alone, each sample's freshest row (the one
written at its most recent step, across all ranks) and checks at every re-clustering:
- the ranks' banks together hold each sample at most once, exactly the samples of the previous epoch's
  shards (at epoch 0: the fill pass's, which are epoch 0's): the dataset minus the drop_last remainder;
- each row is its sample's freshest row, written during the previous epoch (at epoch 0: by the fill pass);
- the rows k-means clusters for head h are, across ranks, exactly those freshest rows of bank view h mod 2;
- a bank holds one shard: steps per epoch x per-process batch rows, not the dataset;
- the groups k-means returns are the same on every rank.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smog_kernels.memory_bank import MemoryBank
from tests.test_train_distributed import load_rank, start_ranks

IMAGES, EPOCHS = 250, 3
LAUNCH_TIMEOUT_S = 900.0  # 8 processes share the cores: generous, a hang still ends the test
CASES = {"1": (1, 32, 1), "2": (2, 32, 1), "3": (3, 48, 1), "2-accumulate": (2, 32, 2)}  # processes, batch, A

DRIVER = r'''
import json, os, sys
import torch

spec = json.loads(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
import smog.callbacks, smog.runlog
from smog.loop import Trainer
from smog.method import SMoG
from smog_kernels import Grouping
from smog_kernels.memory_bank import MemoryBank

# not what is tested, and the slowest parts of a tiny run: plots and the final kNN
smog.runlog.RunLog.plot = lambda self: None
smog.callbacks.knn_scores = lambda *args, **kwargs: {}

current, writes, snapshots, clustered = {"step": None}, [], [], []

_write = MemoryBank.write
def write(self, index, rows):
    writes.append({"step": current["step"], "index": index.clone(), "rows": rows.clone()})
    _write(self, index, rows)
MemoryBank.write = write

_fill = SMoG.on_fit_start
def on_fit_start(self, trainer):
    current["step"] = -1
    return _fill(self, trainer)
SMoG.on_fit_start = on_fit_start

_step = Trainer.step
def step(self, batch):
    current["step"] = self.progress.step
    return _step(self, batch)
Trainer.step = step

_recluster = Grouping.recluster
def recluster(self, rows, *args, **kwargs):
    clustered.extend(rows[h % len(rows)].clone() for h in range(self.heads))  # head h's rows
    return _recluster(self, rows, *args, **kwargs)
Grouping.recluster = recluster

_start = SMoG.on_epoch_start
def on_epoch_start(self, trainer, epoch):
    clustered.clear()
    record = _start(self, trainer, epoch)
    snapshots.append({"epoch": epoch, "step": trainer.progress.step, "writes": len(writes),
                      "bank": self.bank.bank.clone(), "index": self.bank.index.clone(), "clustered": list(clustered),
                      "groups": self.grouping.groups.clone(),
                      "steps_per_epoch": trainer.progress.steps_per_epoch, "batch": trainer.batch_size})
    return record
SMoG.on_epoch_start = on_epoch_start

from smog.cli import main
code = main(spec["argv"])
torch.save({"writes": writes, "snapshots": snapshots}, os.path.join(spec["out"], f"rank{rank}.pt"))
sys.exit(code)
'''


def train_argv(run_dir: Path, batch: int, accumulate: int) -> list[str]:
    return ["train", "--config", "digits", f"train.out_dir={run_dir.parent}", f"train.run_name={run_dir.name}",
            f"data.train_subset={IMAGES}", f"train.batch_size={batch}", f"train.accumulate={accumulate}",
            "data.small_crops=1", f"train.epochs={EPOCHS}", "train.progress=false", "eval.knn_every=0",
            "data.workers=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """case -> every rank's record of its 3-epoch `smog train` (all cases launched together)."""
    root = tmp_path_factory.mktemp("bank")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    launches = {}
    for case, (world, batch, accumulate) in CASES.items():
        out = root / f"out{case}"
        out.mkdir()
        spec = {"out": str(out), "argv": train_argv(root / f"run{case}" / "run", batch, accumulate)}
        launches[case] = start_ranks(driver, spec, world, root / f"logs{case}")
    records = {}
    for case, launch in launches.items():
        for rank, (code, _, text) in enumerate(launch.wait(timeout_s=LAUNCH_TIMEOUT_S)):
            assert code == 0, f"{case}: rank {rank} exited with {code}:\n{text[-4000:]}"
        records[case] = [load_rank(root / f"out{case}", f"rank{r}.pt") for r in range(CASES[case][0])]
    return records


def freshest(records: list[dict], upto: list[int]) -> dict[int, tuple[int, torch.Tensor]]:
    """sample -> (step, rows [V, D]) of its latest write among the first upto[r] writes of each rank r."""
    latest: dict[int, tuple[int, torch.Tensor]] = {}
    for record, count in zip(records, upto):
        for w in record["writes"][:count]:
            for j, sample in enumerate(w["index"].tolist()):
                if sample not in latest or w["step"] >= latest[sample][0]:
                    assert sample not in latest or w["step"] > latest[sample][0], \
                        f"sample {sample} written twice at step {w['step']}"
                    latest[sample] = (w["step"], w["rows"][:, j])
    return latest


def as_sorted_rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(row) for row in x.tolist())


@pytest.mark.parametrize("case", CASES)
def test_each_reclustering_sees_every_sample_of_the_last_epoch_once_at_its_freshest(runs, case):
    records = runs[case]
    world, global_batch, accumulate = CASES[case]
    steps_per_epoch, batch = records[0]["snapshots"][0]["steps_per_epoch"], records[0]["snapshots"][0]["batch"]
    assert batch == global_batch // world
    sizes = {len(w["index"]) for r in records for w in r["writes"] if w["step"] >= 0}
    assert sizes == {batch // accumulate}, f"writes of {sizes} rows, not one per sub-batch of {batch // accumulate}"
    shard = steps_per_epoch * batch
    assert shard == (IMAGES // world) // batch * batch  # one epoch's rows on this process ...
    left_out = IMAGES - world * shard
    assert 0 <= left_out < world * (batch + 1)  # ... so only the drop_last remainder is left out
    for record in records:
        assert [s["epoch"] for s in record["snapshots"]] == list(range(EPOCHS))
        assert all(s["bank"].shape[1] == s["index"].shape[0] == shard for s in record["snapshots"]), \
            "a process's bank is not one shard of steps per epoch x per-process batch rows"

    for epoch in range(EPOCHS):
        snaps = [record["snapshots"][epoch] for record in records]
        assert all(torch.equal(s["groups"], snaps[0]["groups"]) for s in snaps), f"epoch {epoch}: ranks' groups differ"
        latest = freshest(records, [s["writes"] for s in snaps])
        window = range(-1, 0) if epoch == 0 else range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch)
        expected = {sample for sample, (step, _) in latest.items() if step in window}
        held = torch.cat([s["index"] for s in snaps]).tolist()
        assert len(held) == len(set(held)), f"epoch {epoch}: a sample is held twice by the {world} banks"
        assert set(held) == expected, (
            f"epoch {epoch}: the banks hold {len(set(held) - expected)} samples not written in the previous epoch "
            f"and miss {len(expected - set(held))} of its {len(expected)}")
        assert len(held) == world * shard
        for r, snap in enumerate(snaps):
            for j, sample in enumerate(snap["index"].tolist()):
                assert torch.equal(snap["bank"][:, j], latest[sample][1]), \
                    f"epoch {epoch}, rank {r}: row {j} (sample {sample}) is not its freshest row"
        # the rows k-means clusters, across ranks, for head h: the freshest rows of view h mod 2
        heads = len(snaps[0]["clustered"])
        assert heads == 3
        for h in range(heads):
            clustered = torch.cat([s["clustered"][h] for s in snaps])
            wanted = torch.stack([latest[sample][1][h % 2] for sample in sorted(expected)])
            assert as_sorted_rows(clustered) == as_sorted_rows(wanted), \
                f"epoch {epoch}, head {h}: k-means did not get the freshest rows of every sample once"
    # the fill pass holds exactly the samples epoch 0 then trains on
    first = {s for r in records for w in r["writes"] if 0 <= w["step"] < steps_per_epoch for s in w["index"].tolist()}
    assert first == set(torch.cat([r["snapshots"][0]["index"] for r in records]).tolist())


# ---- the bank alone ------------------------------------------------------------------------------


def test_writes_go_by_position_round_the_bank():
    bank = MemoryBank(6, 2, views=2)
    rows = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    bank.write(torch.tensor([7, 3, 9, 1]), rows)
    assert bank.position == 4 and bank.count == 4 and bank.index.tolist() == [7, 3, 9, 1, -1, -1]
    assert torch.equal(bank.rows(1), rows[1])
    bank.write(torch.tensor([5, 2]), rows[:, :2] + 100)
    assert bank.position == 0 and bank.count == 6  # one epoch's rows written: the next epoch starts at row 0
    bank.write(torch.tensor([0, 4]), rows[:, 2:] - 100)
    assert bank.index.tolist() == [0, 4, 9, 1, 5, 2]
    assert torch.equal(bank.bank[:, :2], rows[:, 2:] - 100) and torch.equal(bank.bank[:, 2:4], rows[:, 2:])
    with pytest.raises(ValueError, match="overruns"):
        bank.write(torch.arange(5), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match=r"\[V=2, N=2, D=2\]"):
        bank.write(torch.arange(2), torch.zeros(3, 2, 2))


def test_a_bank_of_another_shape_is_refused_naming_both_shapes():
    saved = MemoryBank(8, 4).state_dict()
    with pytest.raises(ValueError, match=r"\(2, 8, 4\).*\(2, 6, 4\)"):
        MemoryBank(6, 4).load_state_dict(saved)
    with pytest.raises(ValueError, match="lacks"):
        MemoryBank(8, 4).load_state_dict({"bank": saved["bank"], "filled": torch.ones(8, dtype=torch.bool)})
    restored = MemoryBank(8, 4)
    source = MemoryBank(8, 4)
    source.write(torch.tensor([3, 1, 2]), torch.randn(2, 3, 4))
    restored.load_state_dict(source.state_dict())
    assert restored.position == 3 and torch.equal(restored.index, source.index)
    assert torch.equal(restored.bank, source.bank)


def test_sample_zero_is_a_filled_row_and_rows_of_another_width_are_refused():
    bank = MemoryBank(3, 2, views=1)
    rows = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    bank.write(torch.tensor([0, 5]), rows)
    assert bank.count == 2 and torch.equal(bank.rows(0), rows[0])  # dataset index 0 is a sample, -1 is empty
    with pytest.raises(ValueError, match=r"\[V=1, N=1, D=2\]"):
        bank.write(torch.tensor([1]), torch.zeros(1, 1, 3))


def test_bank_lives_on_its_device():
    """Both the rows and the index are made on the given device (meta: no memory, no GPU needed)."""
    bank = MemoryBank(4, 2, views=3, device="meta")
    assert bank.bank.device.type == bank.index.device.type == "meta"
    assert bank.bank.shape == (3, 4, 2) and bank.index.shape == (4,) and bank.index.dtype == torch.int64
