"""Two machines on one host: the tiny MiLoRA recipe (no `milora_init_dir`) under DeepSpeed ZeRO-2 and ZeRO-3,
launched as on two nodes, one process each (`accelerate launch --num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1 --deepspeed_multinode_launcher standard`, gloo over the loopback address), every node
writing to its own output directory as it would to a node-local disk.

What a run across nodes must get right:
- the init split by global rank: both processes have local rank 0, so a split by local rank would decompose
  half of the layers twice and the other half never; the initial factors must be the float64 minor slice;
- the effective batch over the global world size: 16 rows per optimizer step, 8 on each node;
- shared outputs from global rank 0 only: node 1 keeps only its rank's checkpoint shards, node 0 a complete output
  that reloads (adapter, `residual_adapter/`, `merged/`);
- the same training as one process. One process (`python recipes/sft.py`) accumulates two micro-batches of 8
  rows per step; the nodes take one each, and accelerate hands rank k the k-th micro-batch of every step of the
  same sampler, so both runs see the same 16 rows per step in the same order (dropout 0, float32, one thread);
- resuming from node-local disks: refused with the fix named while a node holds only its own shards, and the same
  loss curve once every node has the union of the nodes' `checkpoint-N/` files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from milora.sft.config import RecipeError, resolve_resume_checkpoint
from milora.tiny import tiny_model
from tests.recipes.test_multiprocess import (
    LLAMA_TARGETS,
    REPO_ROOT,
    _free_port,
    check_initial_adapter,
    check_outputs_reproduce_training,
    launch_command,
    launch_environment,
    logged_losses,
    pytestmark,  # noqa: F401  (multiprocess; needs deepspeed and ninja)
    relative_error,
    text_inputs,
)

RECIPE = "recipes/tiny_milora.yaml"
STEPS, SAVE_STEPS = 4, 2
# dropout 0 for a deterministic run; no warmup, so that every step moves the weights (lr 1e-2)
OVERRIDES = ("--max_steps", str(STEPS), "--save_steps", str(SAVE_STEPS), "--lora_dropout", "0", "--warmup_steps", "0")
LOSS_RTOL = 1e-6
# The adapters after training, relative to one process's (Frobenius norm, per tensor). ZeRO-2 reproduces one
# process bit for bit (measured: 0). ZeRO-3 does not, on one process as on two: its hooks (which gather a module's
# weights for its backward) pass every module's inputs and outputs through identity autograd functions, so autograd
# sums the gradient contributions of a tensor used in several places (the residual stream: skip connection and
# RMSNorm) in another order, and float32 addition is not associative. One backward pass's gradients differ in the
# last bits (measured <= 4e-7 relative, the last layer's MLP adapters still equal), the adapters after 4 steps by
# <= 1.3e-6; the losses still agree within LOSS_RTOL.
ADAPTER_RTOL = {"zero2": 1e-6, "zero3": 1e-5}
TIMEOUT_S = 900


def _node(rank: int, port: int) -> list[str]:
    """accelerate's arguments for node `rank` of two, one process each, the first node at the loopback address."""
    return ["--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--deepspeed_multinode_launcher", "standard"]


def _wait_all(processes: list[subprocess.Popen]) -> list[int | None]:
    """Exit codes once all have ended; when one fails, the others (waiting for it in a collective) are killed."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        codes = [p.poll() for p in processes]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(1)
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and its training process: a session of their own
            p.wait()
    return [p.returncode for p in processes]


def launch_two_nodes(launcher: str, tmp_dir: Path, *overrides: str) -> list[Path]:
    """Both nodes of a two-node run of the tiny recipe; their output directories (TMP_DIR/nodeK/out), node 0's
    first."""
    port = _free_port()
    out_dirs, logs, processes = [], [], []
    for rank in range(2):
        out_dirs.append(tmp_dir / f"node{rank}" / "out")
        logs.append(tmp_dir / f"node{rank}.log")
        command = launch_command(launcher, _node(rank, port), RECIPE, out_dirs[-1], *OVERRIDES, *overrides)
        with logs[-1].open("w") as log:
            processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=launch_environment(), stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
    codes = _wait_all(processes)
    assert codes == [0, 0], "\n".join(f"node {r} exit {c}:\n{logs[r].read_text()[-4000:]}" for r, c in enumerate(codes))
    return out_dirs


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("single") / "out"
    command = [sys.executable, "recipes/sft.py", RECIPE, "--output_dir", str(out_dir), "--logging_steps", "1",
               "--report_to", "none", *OVERRIDES]
    result = subprocess.run(command, cwd=REPO_ROOT, env=launch_environment(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return out_dir


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def two_nodes(request, tmp_path_factory) -> tuple[str, list[Path]]:
    """(launcher, [node 0's output directory, node 1's]) of one finished two-node run."""
    return request.param, launch_two_nodes(request.param, tmp_path_factory.mktemp(f"{request.param}_two_nodes"))


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()}


def test_node1_keeps_only_its_checkpoint_shards_and_node0_everything_else(two_nodes):
    _, (node0, node1) = two_nodes
    checkpoints = [f"checkpoint-{step}" for step in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS)]
    on_node1 = files_under(node1)
    assert {name.split("/")[0] for name in on_node1} == set(checkpoints)  # no adapter, summary or init adapter
    for name in on_node1:  # its rank's random state and ZeRO shards (optimizer; under ZeRO-3 the weights too)
        assert name.endswith("/rng_state_1.pth") or "/zero_pp_rank_1_" in name, name
    on_node0 = files_under(node0)
    for checkpoint in checkpoints:
        assert f"{checkpoint}/rng_state_1.pth" in on_node1
        assert {f"{checkpoint}/rng_state_0.pth", f"{checkpoint}/trainer_state.json", f"{checkpoint}/latest"} <= on_node0
        assert any(name.startswith(f"{checkpoint}/") and "/zero_pp_rank_0_" in name for name in on_node0)
        assert not any("rank_1" in name or "rank1" in name for name in on_node0)
    for name in ("adapter_model.safetensors", "milora_init_adapter/adapter_model.safetensors",
                 "residual_adapter/adapter_model.safetensors", "merged/config.json", "milora_run.json"):
        assert name in on_node0, name


def test_initial_factors_are_the_float64_minor_slice(two_nodes):
    check_initial_adapter(two_nodes[1][0], tiny_model("llama"))


def test_node0_outputs_reload_and_reproduce_the_trained_model(two_nodes):
    check_outputs_reproduce_training(two_nodes[1][0], "llama", LLAMA_TARGETS, text_inputs())


def test_training_equals_a_single_process_run(two_nodes, single_process_run):
    launcher, (node0, _) = two_nodes
    state, single_state = (json.loads((d / "trainer_state.json").read_text()) for d in (node0, single_process_run))
    assert state["global_step"] == single_state["global_step"] == STEPS
    # the global batch: the same epoch fraction and tokens per step as one process with 2 accumulated micro-batches
    assert state["epoch"] == single_state["epoch"]
    assert [e["num_tokens"] for e in state["log_history"] if "loss" in e] == \
        [e["num_tokens"] for e in single_state["log_history"] if "loss" in e]
    losses, single_losses = logged_losses(node0), logged_losses(single_process_run)
    assert sorted(losses) == sorted(single_losses) == list(range(1, STEPS + 1))
    assert single_losses[STEPS] < single_losses[1]  # the curve moves: the comparison covers real updates
    for step, loss in losses.items():
        assert abs(loss - single_losses[step]) <= LOSS_RTOL * abs(single_losses[step]), (step, loss)

    initial = load_file(str(node0 / "milora_init_adapter" / "adapter_model.safetensors"))
    single_initial = load_file(str(single_process_run / "milora_init_adapter" / "adapter_model.safetensors"))
    assert sorted(initial) == sorted(single_initial)
    for key, tensor in single_initial.items():  # the split init: the very factors one process computes
        assert torch.equal(initial[key], tensor), key
    for name in ("residual_adapter/adapter_model.safetensors", "adapter_model.safetensors"):
        trained, single_trained = (load_file(str(d / name)) for d in (node0, single_process_run))
        assert sorted(trained) == sorted(single_trained)
        for key, tensor in single_trained.items():
            assert relative_error(trained[key], tensor) <= ADAPTER_RTOL[launcher], (name, key)


@pytest.mark.parametrize("two_nodes", ["zero2"], indirect=True)
def test_resume_from_node_local_disks_after_copying_the_checkpoint_to_every_node(two_nodes, tmp_path):
    _, (node0, node1) = two_nodes
    with pytest.raises(RecipeError, match="copy every node's checkpoint-N/"):  # node 1's copy alone
        resolve_resume_checkpoint(True, str(node1))
    checkpoint = f"checkpoint-{SAVE_STEPS}"
    resumed = [tmp_path / f"node{rank}" / "out" for rank in range(2)]
    for out_dir in resumed:  # the union of both nodes' files, on every node
        for node in (node0, node1):
            shutil.copytree(node / checkpoint, out_dir / checkpoint, dirs_exist_ok=True)
    shutil.copytree(node0 / "milora_init_adapter", resumed[0] / "milora_init_adapter")
    # mark the checkpoint's log: a run that ignored the checkpoint would log steps 1-2 afresh, unmarked
    for out_dir in resumed:
        state_file = out_dir / checkpoint / "trainer_state.json"
        state = json.loads(state_file.read_text())
        for entry in state["log_history"]:
            entry["from_checkpoint"] = True
        state_file.write_text(json.dumps(state))

    launch_two_nodes("zero2", tmp_path, "--resume_from_checkpoint", "true")
    log = json.loads((resumed[0] / "trainer_state.json").read_text())["log_history"]
    assert {e["step"] for e in log if e.get("from_checkpoint")} == set(range(1, SAVE_STEPS + 1))
    continued = {e["step"]: e["loss"] for e in log if "loss" in e and not e.get("from_checkpoint")}
    assert sorted(continued) == list(range(SAVE_STEPS + 1, STEPS + 1))
    uninterrupted = logged_losses(node0)
    for step, loss in continued.items():  # same weights, optimizer shards, schedule and data order
        assert abs(loss - uninterrupted[step]) <= LOSS_RTOL * abs(uninterrupted[step]), (step, loss)
