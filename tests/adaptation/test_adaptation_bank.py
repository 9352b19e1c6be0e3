"""The tenant bank: row 0 is the trained bases, published bases show up at the next lookup with their version,
a bounded LRU of tenant rows, and no bank at all for routers without a GHA subspace."""

from __future__ import annotations

import threading

import pytest
import torch

from star_serve.adaptation import RoutingPlan, TenantBank
from star_serve.model import Routing, StarMoeForCausalLM
from star_serve.training.presets import tiny_config

CPU = torch.device("cpu")
SHAPE = (2, 4, 32)  # (layers, experts, hidden)


def _bases(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _bank(capacity: int = 256) -> tuple[TenantBank, torch.Tensor]:
    trained = _bases(0)
    return TenantBank(trained, CPU, torch.float32, capacity=capacity), trained


def _rows_of(bank: TenantBank, tenants: list[str]) -> list[torch.Tensor]:
    view = bank.lookup(tenants)
    assert view.routing.bank is not None and view.routing.index is not None
    return [view.routing.bank[row] for row in view.routing.index.tolist()]


def test_unknown_tenants_get_row_zero_the_trained_bases_and_version_zero() -> None:
    bank, trained = _bank()
    view = bank.lookup(["a", "b", "a"])
    assert view.routing.index is not None and view.routing.bank is not None
    assert view.routing.index.tolist() == [0, 0, 0] and view.routing.index.dtype == torch.long
    assert view.versions == [0, 0, 0]
    assert torch.equal(view.routing.bank[0], trained)
    assert bank.version("a") == 0 and bank.resident() == 0


def test_published_bases_appear_at_the_next_lookup_with_their_version() -> None:
    bank, trained = _bank()
    own = _bases(1)
    bank.publish("a", own, version=4)
    assert bank.version("a") == 4  # known at once, applied at the next lookup
    view = bank.lookup(["b", "a", "b"])
    assert view.routing.bank is not None and view.routing.index is not None
    assert view.versions == [0, 4, 0]
    assert view.routing.index[0] == view.routing.index[2] == 0 and view.routing.index[1] != 0
    assert torch.equal(view.routing.bank[view.routing.index[1]], own)
    assert torch.equal(view.routing.bank[0], trained)
    assert bank.resident() == 1

    newer = _bases(2)
    bank.publish("a", newer, version=5)
    a, b = _rows_of(bank, ["a", "b"])
    assert torch.equal(a, newer) and torch.equal(b, trained)
    assert bank.lookup(["a"]).versions == [5]
    assert bank.resident() == 1  # a new version reuses the tenant's row


def _folding_bank() -> tuple[TenantBank, torch.Tensor, list[int]]:
    """A bank whose fold doubles the bases and records how many rows each call folded."""
    folded: list[int] = []

    def fold(bases: torch.Tensor) -> torch.Tensor:
        folded.append(bases.shape[0])
        return 2 * bases

    trained = _bases(0)
    return TenantBank(trained, CPU, torch.float32, fold=fold), trained, folded


def test_gates_are_folded_once_per_new_row_and_a_batchs_gates_reused_until_its_rows_change() -> None:
    bank, trained, folded = _folding_bank()
    assert folded == [1]  # the trained row, at construction
    bank.publish("a", _bases(1), version=1)
    bank.publish("b", _bases(2), version=1)
    first = bank.lookup(["a", "b", "x"])
    assert folded == [1, 2]  # both new rows in one fold
    assert first.routing.gates is not None and first.routing.bank is not None and first.routing.index is not None
    # (B, L, E, D), each sequence's gates
    assert torch.equal(first.routing.gates, 2 * first.routing.bank[first.routing.index])
    assert torch.equal(first.routing.gates[2], 2 * trained)
    again = bank.lookup(["a", "b", "x"])
    # the next decode step: nothing folded or gathered
    assert again.routing.gates is first.routing.gates and folded == [1, 2]

    bank.publish("b", _bases(3), version=2)  # a new version: its row alone folded, the batch gathered anew
    moved = bank.lookup(["a", "b", "x"])
    assert folded == [1, 2, 1]
    assert moved.routing.gates is not None and moved.routing.gates is not first.routing.gates
    assert torch.equal(moved.routing.gates[1], 2 * _bases(3)) and torch.equal(moved.routing.gates[0], 2 * _bases(1))
    other = bank.lookup(["b", "a"])  # other rows: gathered anew
    assert other.routing.gates is not None and torch.equal(other.routing.gates[0], 2 * _bases(3))
    single = bank.lookup(["x", "y"]).routing.gates  # one row for the whole batch: its gates alone
    assert single is not None and single.shape == (1, *SHAPE) and torch.equal(single[0], 2 * trained)
    assert folded == [1, 2, 1]


def test_rows_rewritten_in_place_get_no_gates_and_are_folded_again_at_the_next_lookup() -> None:
    bank, trained, folded = _folding_bank()
    view = bank.lookup(["a", "b"], own=["a"], in_place=True)
    assert view.routing.gates is None and view.routing.bank is not None and view.routing.index is not None
    view.routing.bank[view.routing.index[0]] += 1  # as a sync-mode update moves the tenant's row before routing
    after = bank.lookup(["a", "b"])
    assert after.routing.gates is not None
    assert torch.equal(after.routing.gates[0], 2 * (trained + 1)) and torch.equal(after.routing.gates[1], 2 * trained)
    assert folded == [1, 2]  # both rows of the in-place batch, once


def test_a_bank_without_fold_hands_out_no_gates() -> None:
    bank, _ = _bank()
    bank.publish("a", _bases(1), version=1)
    assert bank.lookup(["a", "b"]).routing.gates is None and bank.lookup(["a"]).routing.gates is None


def test_publish_copies_the_bases() -> None:
    bank, _ = _bank()
    own = _bases(1)
    bank.publish("a", own, version=1)
    expected = own.clone()
    own.zero_()  # the publisher keeps working on its tensor
    (a,) = _rows_of(bank, ["a"])
    assert torch.equal(a, expected)


def test_publishing_none_reverts_to_the_trained_bases() -> None:
    bank, trained = _bank()
    bank.publish("a", _bases(1), version=2)
    assert bank.lookup(["a"]).versions == [2]
    bank.publish("a", None, version=0)
    view = bank.lookup(["a"])
    assert view.routing.index is not None and view.routing.index.tolist() == [0] and view.versions == [0]
    assert bank.version("a") == 0 and bank.resident() == 0
    # The freed row serves the next tenant.
    bank.publish("b", _bases(3), version=1)
    (b,) = _rows_of(bank, ["b"])
    assert torch.equal(b, _bases(3)) and bank.resident() == 1
    assert torch.equal(bank.lookup(["x"]).routing.bank[0], trained)  # type: ignore[index]


def test_the_least_recently_looked_up_tenant_is_evicted_at_capacity() -> None:
    bank, trained = _bank(capacity=2)
    evicted: list[str] = []
    bank.on_evict(evicted.append)
    bank.publish("a", _bases(1), version=1)
    bank.publish("b", _bases(2), version=1)
    bank.lookup(["a", "b"])
    bank.lookup(["b"])
    bank.lookup(["a"])  # b is now the least recently looked up
    bank.publish("c", _bases(3), version=7)
    view = bank.lookup(["a", "b", "c"])
    assert view.versions == [1, 0, 7]
    assert view.routing.index is not None and view.routing.bank is not None
    assert view.routing.index[1] == 0 and len(set(view.routing.index.tolist())) == 3
    assert torch.equal(view.routing.bank[view.routing.index[0]], _bases(1))
    assert torch.equal(view.routing.bank[view.routing.index[2]], _bases(3))
    assert torch.equal(view.routing.bank[0], trained)
    assert bank.resident() == 2 and evicted == ["b"]
    assert view.routing.bank.shape[0] <= 3  # the trained row plus `capacity` rows, no more

    bank.lookup(["c"])  # now a is the oldest
    bank.publish("d", _bases(4), version=2)
    assert bank.lookup(["a", "c", "d"]).versions == [0, 7, 2]
    assert evicted == ["b", "a"]


def test_rows_grow_as_tenants_arrive() -> None:
    bank, trained = _bank(capacity=8)
    for i in range(5):
        bank.publish(f"t{i}", _bases(10 + i), version=i + 1)
    tenants = [f"t{i}" for i in range(5)]
    rows = _rows_of(bank, tenants)
    for i, row in enumerate(rows):
        assert torch.equal(row, _bases(10 + i))
    view = bank.lookup(["nobody", *tenants])
    assert view.versions == [0, 1, 2, 3, 4, 5]
    assert view.routing.bank is not None and torch.equal(view.routing.bank[0], trained)
    assert bank.resident() == 5


def test_bases_of_the_wrong_shape_are_refused() -> None:
    bank, _ = _bank()
    with pytest.raises(ValueError, match="shape"):
        bank.publish("a", torch.zeros(2, 4, 16), version=1)
    with pytest.raises(ValueError, match="shape"):
        bank.publish("a", torch.zeros(1, *SHAPE), version=1)
    assert bank.version("a") == 0
    assert bank.lookup(["a"]).versions == [0]


def test_publish_from_another_thread_is_seen_by_the_next_lookup() -> None:
    bank, _ = _bank()
    own = _bases(5)
    publisher = threading.Thread(target=bank.publish, args=("a", own, 3))
    publisher.start()
    publisher.join(timeout=10)
    assert not publisher.is_alive()
    (a,) = _rows_of(bank, ["a"])
    assert torch.equal(a, own) and bank.lookup(["a"]).versions == [3]


def test_bank_dtype_and_trained_bases_of_a_real_model() -> None:
    torch.manual_seed(0)
    config = tiny_config(vocab_size=101)
    model = StarMoeForCausalLM(config).eval()
    trained = model.trained_bases()
    assert trained.shape == SHAPE
    bank = TenantBank(trained, CPU, torch.float64)
    bank.publish("a", _bases(1).float(), version=1)
    view = bank.lookup(["a", "b"])
    assert view.routing.bank is not None and view.routing.bank.dtype == torch.float64
    assert torch.equal(view.routing.bank[0], trained.double())


def test_a_model_without_subspace_has_no_bank() -> None:
    config = tiny_config(vocab_size=101, router_type="linear")
    model = StarMoeForCausalLM(config).eval()
    with pytest.raises(ValueError):
        model.trained_bases()
    bank = TenantBank(None, CPU, torch.float32)
    assert bank.lookup(["a", "b"]) == RoutingPlan(Routing(), [0, 0], [0, 0])
    with pytest.raises(ValueError, match="no GHA subspace"):
        bank.publish("a", _bases(1), version=1)
    assert bank.resident() == 0
