"""GPU allocation: allocate(), impossible(), env_for(), requests_of(), plain values, no podman.

The property tests drive the allocator the way the reconciler does (one stack's
requests per pass, against the ledger every stack shares, releasing the stack's
replicas that no longer ask) and check after every pass what must always hold.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aisemble.model import AISemble, AISembleSpec, StackKey
from aisemble.planning.gpu import (
    EXCLUSIVE,
    SHARED,
    Allocation,
    Device,
    Grant,
    Holder,
    Request,
    allocate,
    env_for,
    impossible,
    requests_of,
)
from aisemble.sources.store import Store

NV = "nvidia.com/gpu"
AMD = "amd.com/gpu"
Gi = 2**30


def gpu(name: str, kind: str = NV, uuid: str | None = None, memory: int | None = None) -> Device:
    parent = name.split(":", 1)[0] if ":" in name else None
    return Device(kind, name, uuid=uuid, memory_bytes=memory, parent=parent)


def holder(stack: str = "s", service: str = "a", replica: int = 0) -> Holder:
    return Holder("default", stack, service, replica)


def ask(who: Holder, count: int | None = None, **fields) -> Request:
    return Request(holder=who, count=count, **fields)


def names(allocation: Allocation, who: Holder, inventory: list[Device]) -> list[str]:
    return [d.cdi for d in allocation.devices(who, inventory)]


def ordered(grants) -> list[Grant]:
    return sorted(grants, key=lambda g: (g.holder, g.device))


def grant(device: Device, who: Holder, sharing: str = EXCLUSIVE, max_holders: int = 1) -> Grant:
    return Grant(device.id, who, sharing, max_holders)


FOUR = [gpu(str(i)) for i in range(4)]


class TestChoice:
    def test_free_devices_are_taken_in_numeric_order_of_their_names(self) -> None:
        inventory = [gpu("10"), gpu("2"), gpu("1")]
        result = allocate([ask(holder(), 2)], inventory, [])
        assert names(result, holder(), inventory) == [f"{NV}=1", f"{NV}=2"]

    def test_the_same_requests_get_the_same_devices_whatever_order_they_come_in(self) -> None:
        inventory = [*FOUR, gpu("0", AMD), gpu("1", AMD)]
        requests = [
            ask(holder(service="a"), 1),
            ask(holder(service="b", replica=0), 2),
            ask(holder(service="b", replica=1), 1, kind=AMD),
            ask(holder(service="c"), 1),
        ]
        first = allocate(requests, inventory, [])
        rng = random.Random(5)
        for _ in range(20):
            shuffled = rng.sample(requests, len(requests))
            again = allocate(shuffled, rng.sample(inventory, len(inventory)), [])
            assert again.grants == first.grants
            assert again.unschedulable == first.unschedulable

    def test_a_replica_keeps_the_devices_it_holds(self) -> None:
        ledger = [grant(FOUR[3], holder())]
        result = allocate([ask(holder(), 1)], FOUR, ledger)
        assert names(result, holder(), FOUR) == [f"{NV}=3"]

    def test_kind_narrows_the_choice(self) -> None:
        inventory = [gpu("0", AMD), gpu("0"), gpu("1", AMD)]
        result = allocate([ask(holder(), 2, kind=AMD)], inventory, [])
        assert names(result, holder(), inventory) == [f"{AMD}=0", f"{AMD}=1"]

    def test_minimum_memory_skips_small_devices_and_devices_of_unknown_memory(self) -> None:
        inventory = [gpu("0", memory=8 * Gi), gpu("1"), gpu("2", memory=24 * Gi)]
        result = allocate([ask(holder(), 1, min_memory=16 * Gi)], inventory, [])
        assert names(result, holder(), inventory) == [f"{NV}=2"]
        assert holder() not in result.unschedulable

    def test_explicit_names_get_exactly_those_devices(self) -> None:
        result = allocate([ask(holder(), names=(f"{NV}=3", f"{NV}=1"))], FOUR, [])
        assert names(result, holder(), FOUR) == [f"{NV}=1", f"{NV}=3"]

    def test_a_gpu_can_be_named_by_its_uuid_as_well_as_by_its_index(self) -> None:
        # NVIDIA's CDI specs name each GPU twice; the inventory keeps one entry per GPU.
        inventory = [gpu("0", uuid="GPU-aaa"), gpu("1", uuid="GPU-bbb")]
        request = ask(holder(), names=(f"{NV}=GPU-bbb",))
        assert impossible(request, inventory) is None
        result = allocate([request], inventory, [])
        assert names(result, holder(), inventory) == [f"{NV}=1"]

    def test_named_devices_are_served_before_counts_that_could_take_them(self) -> None:
        requests = [ask(holder(service="a"), 1), ask(holder(service="b"), names=(f"{NV}=0",))]
        result = allocate(requests, FOUR[:2], [])
        assert result.unschedulable == {}
        assert names(result, holder(service="a"), FOUR) == [f"{NV}=1"]
        assert names(result, holder(service="b"), FOUR) == [f"{NV}=0"]

    def test_the_all_device_is_given_by_name_only(self) -> None:
        inventory = [gpu("all"), gpu("0")]
        result = allocate([ask(holder(), 1)], inventory, [])
        assert names(result, holder(), inventory) == [f"{NV}=0"]
        result = allocate([ask(holder("t"), names=(f"{NV}=all",))], inventory, [])
        assert names(result, holder("t"), inventory) == [f"{NV}=all"]


class TestExclusive:
    def test_an_exclusive_device_never_goes_to_a_second_holder_of_another_stack(self) -> None:
        inventory = FOUR[:2]
        first = allocate([ask(holder("s1"), 2)], inventory, [])
        second = allocate([ask(holder("s2"), 1)], inventory, first.grants)
        assert holder("s2") in second.unschedulable
        assert names(second, holder("s2"), inventory) == []
        assert second.grants == first.grants

    def test_a_device_kept_by_one_replica_is_not_given_to_another_in_the_same_pass(self) -> None:
        # b already holds gpu 0; a (sorted first) is new. a must not get gpu 0 too.
        inventory = FOUR[:2]
        ledger = [grant(FOUR[0], holder(service="b"))]
        result = allocate(
            [ask(holder(service="a"), 1), ask(holder(service="b"), 1)], inventory, ledger
        )
        assert names(result, holder(service="b"), inventory) == [f"{NV}=0"]
        assert names(result, holder(service="a"), inventory) == [f"{NV}=1"]

    def test_an_exclusive_holder_keeps_a_shared_one_off_and_the_other_way_round(self) -> None:
        inventory = FOUR[:1]
        taken = allocate([ask(holder("s1"), 1)], inventory, [])
        shared = allocate([ask(holder("s2"), 1, sharing=SHARED)], inventory, taken.grants)
        assert holder("s2") in shared.unschedulable
        sharing = allocate([ask(holder("s1"), 1, sharing=SHARED)], inventory, [])
        alone = allocate([ask(holder("s2"), 1)], inventory, sharing.grants)
        assert holder("s2") in alone.unschedulable


class TestSharing:
    def test_a_shared_device_takes_holders_up_to_their_limit(self) -> None:
        inventory = FOUR[:1]
        ledger: list[Grant] = []
        for stack in ("s1", "s2", "s3"):
            result = allocate(
                [ask(holder(stack), 1, sharing=SHARED, max_holders=3)], inventory, ledger
            )
            assert names(result, holder(stack), inventory) == [f"{NV}=0"]
            ledger = result.grants
        fourth = allocate([ask(holder("s4"), 1, sharing=SHARED, max_holders=3)], inventory, ledger)
        assert holder("s4") in fourth.unschedulable

    def test_the_lowest_limit_among_the_holders_counts(self) -> None:
        inventory = FOUR[:1]
        first = allocate([ask(holder("s1"), 1, sharing=SHARED, max_holders=2)], inventory, [])
        second = allocate(
            [ask(holder("s2"), 1, sharing=SHARED, max_holders=8)], inventory, first.grants
        )
        third = allocate(
            [ask(holder("s3"), 1, sharing=SHARED, max_holders=8)], inventory, second.grants
        )
        assert names(second, holder("s2"), inventory) == [f"{NV}=0"]
        assert holder("s3") in third.unschedulable

    def test_shared_holders_are_spread_in_order_only_when_the_first_device_is_full(self) -> None:
        inventory = FOUR[:2]
        ledger: list[Grant] = []
        got = []
        for stack in ("s1", "s2", "s3"):
            result = allocate(
                [ask(holder(stack), 1, sharing=SHARED, max_holders=2)], inventory, ledger
            )
            got += names(result, holder(stack), inventory)
            ledger = result.grants
        assert got == [f"{NV}=0", f"{NV}=0", f"{NV}=1"]


class TestOverlap:
    MIG = [gpu("0"), gpu("0:0"), gpu("0:1"), gpu("1")]

    def test_a_mig_slice_and_its_parent_never_go_to_different_holders(self) -> None:
        whole = allocate([ask(holder("s1"), names=(f"{NV}=0",))], self.MIG, [])
        slice_ = allocate([ask(holder("s2"), names=(f"{NV}=0:1",))], self.MIG, whole.grants)
        assert holder("s2") in slice_.unschedulable
        assert slice_.unschedulable[holder("s2")] == (
            f"{NV}=0:1 not free; held: {NV}=0 by default/s1 a[0]"
        )
        sliced = allocate([ask(holder("s1"), names=(f"{NV}=0:1",))], self.MIG, [])
        parent = allocate([ask(holder("s2"), names=(f"{NV}=0",))], self.MIG, sliced.grants)
        assert holder("s2") in parent.unschedulable

    def test_two_slices_of_one_gpu_go_to_two_holders(self) -> None:
        first = allocate([ask(holder("s1"), names=(f"{NV}=0:0",))], self.MIG, [])
        second = allocate([ask(holder("s2"), names=(f"{NV}=0:1",))], self.MIG, first.grants)
        assert names(second, holder("s2"), self.MIG) == [f"{NV}=0:1"]

    def test_sharing_does_not_reach_across_a_slice_and_its_parent(self) -> None:
        first = allocate([ask(holder("s1"), names=(f"{NV}=0",), sharing=SHARED)], self.MIG, [])
        second = allocate(
            [ask(holder("s2"), names=(f"{NV}=0:0",), sharing=SHARED)], self.MIG, first.grants
        )
        assert holder("s2") in second.unschedulable

    def test_a_count_skips_slices_of_a_gpu_another_holder_has(self) -> None:
        first = allocate([ask(holder("s1"), 1)], self.MIG, [])
        assert names(first, holder("s1"), self.MIG) == [f"{NV}=0"]
        second = allocate([ask(holder("s2"), 1)], self.MIG, first.grants)
        assert names(second, holder("s2"), self.MIG) == [f"{NV}=1"]

    def test_all_and_any_device_of_its_kind_never_go_to_different_holders(self) -> None:
        inventory = [gpu("all"), gpu("0"), gpu("1"), gpu("0", AMD)]
        everything = allocate([ask(holder("s1"), names=(f"{NV}=all",))], inventory, [])
        one = allocate([ask(holder("s2"), 1, kind=NV)], inventory, everything.grants)
        assert holder("s2") in one.unschedulable
        other_kind = allocate([ask(holder("s2"), 1, kind=AMD)], inventory, everything.grants)
        assert names(other_kind, holder("s2"), inventory) == [f"{AMD}=0"]
        single = allocate([ask(holder("s1"), 1, kind=NV)], inventory, [])
        whole = allocate([ask(holder("s2"), names=(f"{NV}=all",))], inventory, single.grants)
        assert holder("s2") in whole.unschedulable


class TestUnschedulable:
    def test_a_count_that_cannot_be_met_gets_nothing_and_says_what_is_missing(self) -> None:
        inventory = [gpu("0", "test.io/gpu"), gpu("1", "test.io/gpu")]
        first = allocate([ask(holder("s1"), 1)], inventory, [])
        second = allocate([ask(holder("s2"), 2, kind="test.io/gpu")], inventory, first.grants)
        assert names(second, holder("s2"), inventory) == []
        assert second.grants == first.grants
        why = second.unschedulable[holder("s2")]
        assert "2 exclusive GPU(s) of kind test.io/gpu asked" in why
        assert "1 free of 2 matching" in why
        assert "test.io/gpu=0 by default/s1 a[0]" in why

    def test_the_message_names_a_few_holders_per_device_and_counts_the_rest(self) -> None:
        inventory = [gpu("10"), gpu("9")]
        ledger = [grant(inventory[0], holder("x"))] + [
            grant(inventory[1], holder(f"s{i}"), SHARED, 8) for i in range(5)
        ]
        result = allocate([ask(holder("new"), 1)], inventory, ledger)
        assert result.unschedulable[holder("new")] == (
            "1 exclusive GPU(s) asked, 0 free of 2 matching; held: "
            f"{NV}=9 by default/s0 a[0], default/s1 a[0], default/s2 a[0] and 2 more; "
            f"{NV}=10 by default/x a[0]"
        )

    def test_a_kind_the_host_lacks_is_named(self) -> None:
        result = allocate([ask(holder(), 1, kind=AMD)], FOUR, [])
        assert result.unschedulable[holder()] == (
            f"1 exclusive GPU(s) of kind {AMD} asked, but the host has no such device"
        )

    def test_the_memory_asked_for_is_named_as_given(self) -> None:
        inventory = [gpu("0", memory=8 * Gi)]
        result = allocate([ask(holder(), 1, min_memory=1536 * 2**20)], inventory, [])
        assert result.unschedulable == {}
        result = allocate([ask(holder(), 1, min_memory=24 * Gi)], inventory, [])
        assert "with at least 24Gi" in result.unschedulable[holder()]
        result = allocate([ask(holder(), 2, min_memory=1536 * 2**20)], inventory, [])
        assert "with at least 1536Mi" in result.unschedulable[holder()]

    def test_a_named_device_held_by_another_names_the_holder(self) -> None:
        first = allocate([ask(holder("s1"), names=(f"{NV}=1",))], FOUR, [])
        second = allocate([ask(holder("s2"), names=(f"{NV}=0", f"{NV}=1"))], FOUR, first.grants)
        assert (
            second.unschedulable[holder("s2")]
            == f"{NV}=1 not free; held: {NV}=1 by default/s1 a[0]"
        )
        assert names(second, holder("s2"), FOUR) == []

    def test_an_unknown_name_is_named(self) -> None:
        result = allocate([ask(holder(), names=(f"{NV}=7",))], FOUR, [])
        assert f"no such device: {NV}=7" in result.unschedulable[holder()]

    def test_a_service_is_held_whole_when_one_replica_cannot_be_met(self) -> None:
        inventory = FOUR[:3]
        requests = [ask(holder(replica=r), 2) for r in range(2)]
        result = allocate(requests, inventory, [])
        assert holder(replica=1) in result.unschedulable
        assert result.grants == []  # replica 0 could have had two: no partial start

    def test_a_held_replica_keeps_what_it_held_while_it_waits(self) -> None:
        # Its pod keeps running on gpu 0 while the bigger request waits: gpu 0 stays its.
        ledger = [grant(FOUR[0], holder("s1")), grant(FOUR[1], holder("s2"))]
        result = allocate([ask(holder("s1"), 2)], FOUR[:2], ledger)
        assert holder("s1") in result.unschedulable
        assert ordered(result.grants) == ordered(ledger)
        third = allocate([ask(holder("s3"), 1)], FOUR[:2], result.grants)
        assert holder("s3") in third.unschedulable

    def test_other_replicas_of_a_held_service_keep_what_they_held(self) -> None:
        # Replica 0 held gpu 3, which no longer fits its (new) kind; the service is held,
        # so replica 0 keeps gpu 3 rather than moving while its old pod still runs.
        inventory = [*FOUR[:2], gpu("0", AMD)]
        ledger = [grant(FOUR[1], holder(replica=0)), grant(FOUR[0], holder("other"))]
        requests = [ask(holder(replica=r), 1, kind=AMD) for r in range(2)]
        result = allocate(requests, inventory, ledger)
        assert holder(replica=1) in result.unschedulable
        assert ordered(result.grants) == ordered(ledger)


class TestLedger:
    def test_grants_follow_the_uuid_when_a_reboot_renumbers_the_devices(self) -> None:
        before = [gpu("0", uuid="GPU-aaa"), gpu("1", uuid="GPU-bbb")]
        first = allocate([ask(holder("s1"), names=(f"{NV}=1",))], before, [])
        assert first.grants[0].device == "GPU-bbb"
        after = [gpu("0", uuid="GPU-bbb"), gpu("1", uuid="GPU-aaa")]
        again = allocate([ask(holder("s1"), 1)], after, first.grants)
        assert names(again, holder("s1"), after) == [f"{NV}=0"]  # the same GPU, renamed
        other = allocate([ask(holder("s2"), 1)], after, again.grants)
        assert names(other, holder("s2"), after) == [f"{NV}=1"]

    def test_a_device_that_disappears_is_reported_lost_and_replaced_when_possible(self) -> None:
        ledger = [grant(FOUR[2], holder())]
        result = allocate([ask(holder(), 1)], [FOUR[0], FOUR[1]], ledger)
        assert result.lost == {holder(): [f"{NV}=2"]}
        assert names(result, holder(), FOUR) == [f"{NV}=0"]

    def test_a_named_device_that_disappears_is_lost_and_still_held(self) -> None:
        ledger = [grant(FOUR[2], holder())]
        result = allocate([ask(holder(), names=(f"{NV}=2",))], FOUR[:2], ledger)
        assert result.lost == {holder(): [f"{NV}=2"]}
        assert "no such device" in result.unschedulable[holder()]
        assert result.grants == ledger

    def test_other_stacks_grants_stand_even_for_devices_gone(self) -> None:
        ledger = [grant(FOUR[2], holder("s1")), grant(FOUR[0], holder("s2"))]
        result = allocate([ask(holder("s3"), 1)], FOUR[:2], ledger)
        assert set(ledger) <= set(result.grants)
        assert names(result, holder("s3"), FOUR) == [f"{NV}=1"]

    def test_releasing_a_holder_frees_its_devices(self) -> None:
        full = allocate([ask(holder("s1"), 2)], FOUR[:2], [])
        waiting = allocate([ask(holder("s2"), 1)], FOUR[:2], full.grants)
        assert holder("s2") in waiting.unschedulable
        released = allocate([], FOUR[:2], full.grants, release=[holder("s1")])
        assert released.grants == []
        after = allocate([ask(holder("s2"), 1)], FOUR[:2], released.grants)
        assert names(after, holder("s2"), FOUR) == [f"{NV}=0"]

    def test_the_ledger_survives_the_store_being_reopened(self, tmp_path) -> None:
        result = allocate(
            [ask(holder(), 1), ask(holder(service="b"), 1, sharing=SHARED, max_holders=3)],
            [gpu("0", uuid="GPU-aaa"), gpu("1")],
            [],
        )
        store = Store(tmp_path)
        store.set_gpu_grants(result.grants)
        store.close()
        store = Store(tmp_path)
        try:
            assert store.gpu_grants() == result.grants
        finally:
            store.close()


class TestImpossible:
    def test_unknown_names_are_impossible_and_the_known_ones_are_listed(self) -> None:
        why = impossible(ask(holder(), names=(f"{NV}=0", f"{NV}=9")), FOUR[:2])
        assert why == f"no such device: {NV}=9 (the host's CDI devices: {NV}=0, {NV}=1)"

    def test_a_count_above_what_exists_is_impossible(self) -> None:
        assert impossible(ask(holder(), 4), FOUR) is None
        assert impossible(ask(holder(), 5), FOUR) == (
            "5 GPU(s) asked, but the host has 4 such device(s) in all"
        )
        inventory = [*FOUR[:2], gpu("0", AMD), gpu("all")]
        assert impossible(ask(holder(), 2, kind=AMD), inventory) == (
            f"2 GPU(s) of kind {AMD} asked, but the host has 1 such device(s) in all"
        )
        assert "with at least 16Gi" in impossible(ask(holder(), 1, min_memory=16 * Gi), inventory)

    def test_held_devices_do_not_make_a_request_impossible(self) -> None:
        assert impossible(ask(holder(), names=(f"{NV}=0",)), FOUR) is None

    def test_replicas_that_together_need_more_than_exists_are_impossible(self) -> None:
        assert impossible(ask(holder(), 1), FOUR[:2], replicas=2) is None
        assert "3 replicas" in impossible(ask(holder(), 1), FOUR[:2], replicas=3)
        assert impossible(ask(holder(), 1, sharing=SHARED, max_holders=2), FOUR[:2], 4) is None
        assert impossible(ask(holder(), 1, sharing=SHARED, max_holders=2), FOUR[:2], 5)
        assert "2 replicas" in impossible(ask(holder(), names=(f"{NV}=0",)), FOUR, replicas=2)
        named = ask(holder(), names=(f"{NV}=0",), sharing=SHARED, max_holders=2)
        assert impossible(named, FOUR, replicas=2) is None
        assert impossible(named, FOUR, replicas=3)


class TestEnvironment:
    def test_nvidia_devices_are_named_by_uuid_where_known(self) -> None:
        devices = [gpu("2", uuid="GPU-aaa"), gpu("3", uuid="GPU-bbb")]
        assert env_for(devices) == {
            "CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb",
            "NVIDIA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb",
            "AISEMBLE_GPUS": f"{NV}=2,{NV}=3",
        }

    def test_nvidia_devices_without_uuid_count_from_zero_inside_the_container(self) -> None:
        env = env_for([gpu("2"), gpu("3")])
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert env["NVIDIA_VISIBLE_DEVICES"] == "2,3"

    def test_amd_devices_count_from_zero_inside_the_container(self) -> None:
        assert env_for([gpu("4", AMD), gpu("6", AMD)]) == {
            "ROCR_VISIBLE_DEVICES": "0,1",
            "HIP_VISIBLE_DEVICES": "0,1",
            "AISEMBLE_GPUS": f"{AMD}=4,{AMD}=6",
        }

    def test_each_vendor_counts_only_its_own_devices(self) -> None:
        env = env_for([gpu("1", AMD), gpu("5")])
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
        assert env["ROCR_VISIBLE_DEVICES"] == "0"

    def test_the_all_device_does_not_narrow_what_the_runtime_sees(self) -> None:
        env = env_for([gpu("all")])
        assert "CUDA_VISIBLE_DEVICES" not in env
        assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
        assert "ROCR_VISIBLE_DEVICES" not in env_for([gpu("all", AMD)])

    def test_other_vendors_get_only_the_cdi_names(self) -> None:
        assert env_for([gpu("0", "test.io/gpu")]) == {"AISEMBLE_GPUS": "test.io/gpu=0"}
        assert env_for([]) == {}


def stack(*services: dict) -> AISemble:
    return AISemble.model_validate(
        {
            "apiVersion": "aisemble.io/v1alpha1",
            "kind": "AISemble",
            "metadata": {"name": "lab", "namespace": "ml"},
            "spec": {"services": [{"image": "i", **s} for s in services]},
        }
    )


class TestRequestsOf:
    def test_one_request_per_replica_of_each_service_that_asks(self) -> None:
        resource = stack(
            {"name": "web"},
            {
                "name": "llm",
                "replicas": 2,
                "resources": {
                    "gpus": 2,
                    "gpuKind": NV,
                    "gpuMinMemory": "16Gi",
                    "gpuSharing": "shared",
                    "gpuMaxHolders": 3,
                },
            },
            {"name": "ocr", "resources": {"gpuDevices": [f"{AMD}=1"]}},
        )
        found = requests_of(StackKey("ml", "lab"), resource.spec.services)
        assert found == [
            Request(Holder("ml", "lab", "llm", r), 2, (), NV, 16 * Gi, SHARED, 3) for r in (0, 1)
        ] + [Request(Holder("ml", "lab", "ocr", 0), None, (f"{AMD}=1",))]


def spec_error(resources: dict) -> str:
    with pytest.raises(ValidationError) as info:
        AISembleSpec.model_validate(
            {"services": [{"name": "a", "image": "i", "resources": resources}]}
        )
    return str(info.value)


class TestBadInput:
    """What tests/unit/test_model.py does not already cover of the GPU fields."""

    @pytest.mark.parametrize(
        ("resources", "expected"),
        [
            ({"gpuDevices": [f"{NV}=0", f"{NV}=0"]}, "gpuDevices names a device twice"),
            ({"gpuDevices": []}, "at least 1 item"),
            ({"gpuMinMemory": "16Gi"}, "set gpus too"),
            ({"gpuDevices": [f"{NV}=0"], "gpuKind": NV}, "not to named gpuDevices"),
            ({"gpuDevices": [f"{NV}=0"], "gpuMinMemory": "8Gi"}, "not to named gpuDevices"),
            ({"gpus": 65}, "less than or equal to 64"),
            ({"gpus": 1, "gpuKind": "gpu"}, "String should match pattern"),
            ({"gpus": 1, "gpuMinMemory": "lots"}, "not a memory quantity"),
            ({"gpus": 1, "gpuSharing": "timesliced"}, "'exclusive' or 'shared'"),
            ({"gpus": 1, "gpuSharing": "shared", "gpuMaxHolders": 1}, "greater than or equal to 2"),
        ],
    )
    def test_bad_gpu_requests_say_what_is_wrong(self, resources: dict, expected: str) -> None:
        assert expected in spec_error(resources)


# -- properties --------------------------------------------------------------------------------

STACKS = ("s1", "s2")
SERVICES = ("a", "b", "c")
LIMITS = {"a": 2, "b": 3, "c": 4}  # a service's gpuMaxHolders (the spec's, not per pass)


@st.composite
def inventories(draw) -> list[Device]:
    devices: list[Device] = []
    serial = itertools.count()
    for kind in (NV, AMD):
        for index in range(draw(st.integers(0, 3))):
            uuid = f"GPU-{next(serial)}" if draw(st.booleans()) else None
            memory = draw(st.sampled_from([None, 8 * Gi, 24 * Gi]))
            devices.append(gpu(str(index), kind, uuid, memory))
            if kind == NV and draw(st.booleans()):
                devices += [gpu(f"{index}:{s}", kind) for s in range(2)]
        if draw(st.booleans()):
            devices.append(gpu("all", kind))
    return devices


@st.composite
def passes(draw, inventory: list[Device]) -> list[tuple[str, list[Request]]]:
    cdi = [d.cdi for d in inventory] + [f"{NV}=9"]
    found = []
    for _ in range(draw(st.integers(1, 8))):
        stack_ = draw(st.sampled_from(STACKS))
        requests = []
        for service in draw(
            st.lists(st.sampled_from(SERVICES), min_size=1, max_size=3, unique=True)
        ):
            sharing = draw(st.sampled_from([EXCLUSIVE, SHARED]))
            if draw(st.integers(0, 3)) == 0:
                fields = {
                    "names": tuple(
                        draw(st.lists(st.sampled_from(cdi), min_size=1, max_size=2, unique=True))
                    )
                }
            else:
                fields = {
                    "count": draw(st.integers(1, 3)),
                    "kind": draw(st.sampled_from([None, NV, AMD])),
                    "min_memory": draw(st.sampled_from([None, 16 * Gi])),
                }
            for replica in range(draw(st.integers(1, 2))):
                requests.append(
                    Request(
                        Holder("default", stack_, service, replica),
                        sharing=sharing,
                        max_holders=LIMITS[service],
                        **fields,
                    )
                )
        found.append((stack_, requests))
    return found


def overlap(a: Device, b: Device) -> bool:
    """Whether two devices share hardware (written apart from the allocator's own rule)."""
    if a.id == b.id:
        return True
    if a.kind != b.kind:
        return False
    return "all" in (a.name, b.name) or a.parent == b.name or b.parent == a.name


def check_ledger(grants: list[Grant], inventory: list[Device]) -> None:
    by_id = {d.id: d for d in inventory}
    present = [g for g in grants if g.device in by_id]
    for one, other in itertools.combinations(present, 2):
        if one.holder == other.holder or not overlap(by_id[one.device], by_id[other.device]):
            continue
        assert one.device == other.device, f"overlapping devices to two holders: {one} {other}"
        assert one.sharing == other.sharing == SHARED, f"exclusive device shared: {one} {other}"
    for device, group in itertools.groupby(
        sorted(present, key=lambda g: g.device), key=lambda g: g.device
    ):
        group = list(group)
        holders = {g.holder for g in group}
        assert len(holders) <= min(g.max_holders for g in group), (
            f"{device}: {len(holders)} holders"
        )


def fits(request: Request, devices: list[Device]) -> bool:
    if request.names:
        return {d.cdi for d in devices} == set(request.names)
    return len(devices) == request.count and all(
        d.name != "all"
        and (request.kind is None or d.kind == request.kind)
        and (request.min_memory is None or (d.memory_bytes or 0) >= request.min_memory)
        for d in devices
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_sequence_of_passes_keeps_the_ledger_sound(data) -> None:
    inventory = data.draw(inventories())
    ledger: list[Grant] = []
    for stack_, requests in data.draw(passes(inventory)):
        asking = {r.holder for r in requests}
        release = [g.holder for g in ledger if g.holder.stack == stack_ and g.holder not in asking]
        result = allocate(requests, inventory, ledger, release)

        check_ledger(result.grants, inventory)
        # Other stacks' grants stand as they were.
        assert [g for g in result.grants if g.holder.stack != stack_] == ordered(
            g for g in ledger if g.holder.stack != stack_
        )
        blocked = {r.holder.service for r in requests if r.holder in result.unschedulable}
        for request in requests:
            now = ordered(g for g in result.grants if g.holder == request.holder)
            if request.holder.service in blocked:  # held whole: nothing new, nothing lost
                assert now == ordered(g for g in ledger if g.holder == request.holder)
            else:
                assert fits(request, result.devices(request.holder, inventory)), (request, now)
        # Deterministic, whatever order requests, devices and grants come in.
        rng = random.Random(len(ledger))
        again = allocate(
            rng.sample(requests, len(requests)),
            rng.sample(inventory, len(inventory)),
            rng.sample(ledger, len(ledger)),
            release,
        )
        assert (again.grants, again.unschedulable) == (result.grants, result.unschedulable)
        ledger = result.grants
