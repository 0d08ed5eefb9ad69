"""The memory bank by its public behaviour: rows written at dataset indices are what each view's
clustering reads, in index order, and a checkpoint round trip keeps them; a wrong shape is refused."""
from __future__ import annotations

import pytest
import torch

from smog.memory_bank import MemoryBank


def test_written_rows_are_read_back_per_view_in_index_order():
    bank = MemoryBank(6, 3)
    assert bank.count == 0 and bank.rows(0).shape == (0, 3) and bank.rows(1).shape == (0, 3)
    rows = torch.arange(2 * 2 * 3, dtype=torch.float64).view(2, 2, 3)  # [view, row, D], float64 in
    bank.write(torch.tensor([4, 1]), rows)
    assert bank.count == 2
    assert bank.rows(0).dtype == torch.float32
    assert torch.equal(bank.rows(0), rows[0].flip(0).float())  # index 1 before index 4
    assert torch.equal(bank.rows(1), rows[1].flip(0).float())
    bank.write(torch.tensor([4]), -rows[:, :1])  # an index written again is overwritten, not added
    assert bank.count == 2
    assert torch.equal(bank.rows(0)[1], -rows[0, 0].float())


def test_checkpoint_round_trip_and_shape_check():
    bank = MemoryBank(5, 2)
    bank.write(torch.tensor([0, 3]), torch.ones(2, 2, 2))
    again = MemoryBank(5, 2)
    again.load_state_dict(bank.state_dict())
    assert again.count == 2 and torch.equal(again.rows(1), bank.rows(1))
    assert torch.equal(again.state_dict()["filled"], torch.tensor([True, False, False, True, False]))
    with pytest.raises(ValueError, match=r"\(2, 5, 2\).*\(2, 4, 2\)"):
        MemoryBank(4, 2).load_state_dict(bank.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bank_lives_on_its_device():
    bank = MemoryBank(4, 2, "cuda")
    bank.write(torch.tensor([2]), torch.ones(2, 1, 2, device="cuda"))
    assert bank.bank.device.type == "cuda" and bank.filled.device.type == "cuda" and bank.rows(0).is_cuda
