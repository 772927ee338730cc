import os
import signal

import pytest

from rectrain.errors import UserError
from rectrain.runtime.distributed import (StopFlag, check_multinode_env, expand_slurm_nodelist, launch_mode,
                                          preempted_exit_code, slurm_to_env)


def test_expand_slurm_nodelist_handles_ranges_lists_and_padding():
    assert expand_slurm_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_slurm_nodelist("a1") == ["a1"]


def test_launch_mode_prefers_torchrun_then_srun_then_local():
    assert launch_mode({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0"}) == "torchrun"
    assert launch_mode({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "8"}) == "slurm"
    # Inside an sbatch script (no srun step with several tasks) we launch ourselves.
    assert launch_mode({"SLURM_PROCID": "0"}) == "local"
    assert launch_mode({}) == "local"


def test_slurm_env_is_translated_for_torch_distributed():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[3-4]"}
    slurm_to_env(env, "12355")
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu3" and env["MASTER_PORT"] == "12355"


def test_multinode_job_with_loopback_master_fails_with_the_fix():
    env = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1"}
    with pytest.raises(UserError, match="loopback.*rdzv_endpoint.*NCCL_SOCKET_IFNAME"):
        check_multinode_env(env)


def test_single_node_job_may_use_loopback():
    check_multinode_env({"RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "localhost"})


def test_rank_outside_world_is_an_error():
    with pytest.raises(UserError, match="RANK=4"):
        check_multinode_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"})


def test_stop_flag_records_sigterm_and_gives_exit_code():
    flag = StopFlag().install()
    try:
        assert flag.should_stop() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.should_stop() == signal.SIGTERM
        assert preempted_exit_code(flag.should_stop()) == 143
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_stop_flag_counts_copies_of_one_signal_once_and_a_second_ctrl_c_interrupts(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("rectrain.runtime.distributed.time.monotonic", lambda: clock[0])
    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # forwarded by a launcher and sent to the group: the same stop
        assert flag.should_stop() == signal.SIGINT
        clock[0] += StopFlag.REPEAT_S
        with pytest.raises(KeyboardInterrupt):  # the user presses Ctrl-C again: stop now
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs at the next bytecode boundary
                pass
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
