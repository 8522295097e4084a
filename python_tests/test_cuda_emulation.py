"""What the CPU emulator of the CUDA kernels promises (csrc/emulation)."""
import signal
import subprocess
import sys

import pytest

from conftest import HAS_EMULATION
from alphanet_ext import ops

pytestmark = pytest.mark.skipif(not HAS_EMULATION, reason="no CUDA emulator in this build")


def self_test(name, schedule_seed=0):
    return ops._C._emulation_self_test(name, schedule_seed)


def test_a_missing_barrier_shows_under_shuffled_schedules():
    outcomes = {self_test("publish", seed)[0] for seed in range(1, 40)}
    assert outcomes == {0, 1}
    assert self_test("publish", 0) == [1]  # in thread order the race is hidden
    assert {self_test("publish_with_barrier", seed)[0] for seed in range(40)} == {1}


@pytest.mark.parametrize("seed", [0, 7])
def test_shuffles_and_block_votes(seed):
    out = self_test("reduce", seed)
    assert out[:128] == [sum(range(32))] * 128
    assert out[128:] == [0, 0, 1, 0]  # block 0: no thread votes; block 1: thread 37 does, then nobody


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_ballots(seed):
    out = [value & 0xFFFFFFFF for value in self_test("ballot", seed)]
    for warp in range(2):
        votes = sum(1 << lane for lane in range(32) if (32 * warp + lane) % 3 == 0)
        lanes = range(32 * warp, 32 * warp + 32)
        assert [out[t] for t in lanes] == [votes] * 32
        assert [out[64 + t] for t in lanes] == [votes ^ 0xFFFFFFFF] * 32


def test_threads_waiting_at_different_barriers_are_a_deadlock():
    with pytest.raises(RuntimeError, match="deadlock"):
        self_test("split_barrier")


def test_a_misaligned_16_byte_move_faults_as_on_a_gpu():
    assert self_test("aligned_packs") == list(range(16))
    with pytest.raises(RuntimeError, match="CUDA emulation: misaligned address"):
        self_test("misaligned_packs")


def test_shared_memory_ends_where_the_launch_said():
    """An access past a launch's dynamic shared memory faults, as on a GPU. The
    fault kills the process, so the overrun runs in a child process."""
    assert self_test("shared_within") == list(range(64))
    script = "from alphanet_ext import ops; ops._C._emulation_self_test('shared_overrun', 0)"
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGSEGV, child.stderr


def test_a_shuffle_naming_an_exited_lane_is_an_error():
    with pytest.raises(RuntimeError, match="lane 31 of warp 0, which has exited"):
        self_test("exited_lane")


@pytest.mark.parametrize("name,message", [("too_many_threads", "invalid block shape"),
                                          ("too_much_shared_memory", "dynamic shared memory exceed")])
def test_launches_beyond_the_hardware_limits_are_refused(name, message):
    with pytest.raises(RuntimeError, match=message):
        self_test(name)
    assert not ops._C._cuda_emulation_enabled()  # switched back off after the failure
