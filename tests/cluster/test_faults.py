"""Fault injection on a real local Ray cluster: a SIGKILLed train worker and a SIGKILLed teacher actor."""

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from ray.util.state import list_actors
from transformers import AutoModelForCausalLM

from lori_ray.checkpoints import verify
from lori_ray.cluster import ResourcesUnavailable, start_local, wait_for_resources
from lori_ray.data import generate_multiplication
from lori_ray.driver import fit
from lori_ray.teacher_pool import PlacedPool, build_store
from lori_ray.trajectories import EXTRACTIONS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    start_local(2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


def alive_pids(class_name: str) -> list[int]:
    filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    return [a.pid for a in list_actors(ray.get_runtime_context().gcs_address, filters=filters)]


def run_in_thread(function, *args):
    outcome = {}

    def target():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


@pytest.fixture(scope="module")
def teacher_stage(tmp_path_factory, tiny_stage):
    base = tmp_path_factory.mktemp("stage")
    return base, tiny_stage(base, "faults", examples=256, steps=40, checkpoint_every=10, log_every=5)


def test_killed_train_worker_resumes_from_its_checkpoint_with_the_same_result(cluster, teacher_stage, wait_for):
    base, stage = teacher_stage
    _, reference = fit(stage, base / "reference", base / "ray-reference")

    storage = base / "ray-killed"
    key = "0f" * 32  # the test knows the key, so it can tell when the first checkpoint is complete
    thread, outcome = run_in_thread(fit, replace(stage, checkpoint_key=key), base / "killed", storage)
    first = storage / stage.name / "step-000010" / "ds"
    # killed as soon as the upload is complete, before Ray may have recorded it
    wait_for(lambda: first.is_dir() and verify(first, 2, "", key) == 10, 300, "first complete checkpoint")
    victim = alive_pids("RayTrainWorker")[0]
    os.kill(victim, signal.SIGKILL)
    # the newest checkpoint both ranks completed before the kill (training may have passed step 10 meanwhile;
    # the dead rank writes no more shards, and the restarted group takes seconds to get back this far)
    newest = max(step for folder in (storage / stage.name).glob("step-*")
                 if (step := verify(folder / "ds", 2, "", key)) is not None)
    thread.join(600)
    if "error" in outcome:
        raise outcome["error"]
    _, metrics = outcome["result"]

    # resumed from the newest complete checkpoint, not restarted from step 0, and it says so
    assert 10 <= newest < 40 and metrics["resumed_from_step"] == newest and metrics["restarts"] == 1
    assert "resumed_from_step" not in reference
    assert metrics["step"] == reference["step"] == 40
    # deterministic data order and a restored optimizer: the same trajectory as without the fault
    assert abs(metrics["ce"] - reference["ce"]) < 1e-3 * max(1.0, reference["ce"])
    # the last periodic checkpoint holds both ranks' ZeRO shards; the final one only the model, which nothing
    # resumes from
    assert len(list((storage / stage.name / "step-000030" / "ds" / "state").glob("*optim_states.pt"))) == 2
    final = storage / stage.name / "step-000040"
    assert (final / "hf" / "model.safetensors").is_file() and not (final / "ds").exists()
    assert (base / "killed" / "model.safetensors").is_file()


def test_killed_teacher_actor_is_replaced_and_every_example_is_stored_exactly_once(cluster, tmp_path, tiny_model,
                                                                                  wait_for):
    model_dir = tiny_model(tmp_path / "model")
    examples, shards = generate_multiplication(2048, 2, 2), 128  # shards of 16: the kill has time to land mid-run
    store_dir = tmp_path / "store"
    thread, outcome = run_in_thread(build_store, model_dir, examples, [1, 2], 4, store_dir, 2, 16, 16, False, 0.0,
                                    lambda message: None)

    def extracted():
        return list(store_dir.glob(f"*/{EXTRACTIONS}/*.json"))

    workers = wait_for(lambda: len(extracted()) >= 2 and alive_pids("TeacherWorker"), 300, "extraction to start")
    killed_after = len(extracted())
    os.kill(workers[0], signal.SIGKILL)
    thread.join(600)
    if "error" in outcome:
        raise outcome["error"]
    store = outcome["result"]

    assert killed_after < shards  # the kill landed mid-extraction
    manifest = store.manifest
    assert manifest["examples"] == len(examples) and manifest["shards"] == shards
    index = [i for n in range(shards) for i in store.shard("coords", n)["index"].tolist()]
    assert sorted(index) == list(range(len(examples)))  # no gaps, no duplicates
    assert {e["shard"] for e in store.extractions()} == set(range(shards))
    assert not list(Path(store.uri).rglob("*.tmp"))  # no partial shard left behind


def test_a_stopped_teacher_pass_continues_from_the_shards_it_wrote(cluster, tmp_path, tiny_model):
    """A pass stopped after half its shards (their files written, no subspace, projection or manifest yet): run
    again, the teacher extracts only the other half and the store is the one an uninterrupted pass builds."""
    model_dir, examples = tiny_model(tmp_path / "model"), generate_multiplication(256, 2, 2)
    store_dir = tmp_path / "s"

    def build(log):
        return build_store(model_dir, examples, [1, 2], 4, store_dir, 2, 16, 16, False, 0.0, log)

    store = build(lambda message: None)
    uninterrupted = [store.shard("coords", n)["steps"] for n in range(16)]
    root = Path(store.uri)
    for path in [root / "manifest.json", root / "subspace.safetensors", *root.glob("coords/*"),
                 *(root / "hidden" / f"{n:05d}.safetensors" for n in range(8, 16))]:
        path.unlink()
    messages = []
    again = build(messages.append)
    assert any("8 of 16 shards extracted before, continuing with the other 8" in m for m in messages), messages
    extracted = [e["shard"] for e in again.extractions()]
    assert sorted(extracted) == sorted([*range(16), *range(8, 16)])  # shards 0-7 once, 8-15 again
    assert again.manifest["examples"] == 256
    for n in range(16):
        torch.testing.assert_close(again.shard("coords", n)["steps"], uninterrupted[n], atol=1e-4, rtol=1e-4)


def test_a_teacher_with_non_finite_weights_is_refused_by_the_trajectory_pass(cluster, tmp_path, tiny_model):
    model_dir = tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(model_dir)
    with pytest.raises(FloatingPointError, match=r"the teacher's hidden states are not finite at layer 2 "
                                                  r"\(trajectory.layers \[1, 2\]\) on shard \d+ \(training examples"):
        build_store(model_dir, generate_multiplication(64, 2, 2), [1, 2], 4, tmp_path / "s", 1, 16, 16, False, 0.0,
                    lambda message: None)
    assert not list((tmp_path / "s").glob("*/hidden/*.safetensors"))  # no shard counts as extracted


def cpu_holder():
    """An actor that takes one CPU of the cluster while it lives (defined here: Ray workers cannot import tests)."""
    class Holder:
        def pid(self, pause: float = 0.0) -> int:
            time.sleep(pause)
            return os.getpid()
    return ray.remote(num_cpus=1)(Holder).remote()


def test_a_pool_larger_than_the_free_cpus_extracts_with_the_actors_ray_can_place(cluster, tmp_path, tiny_model):
    """Two teacher actors with one CPU free: the actor Ray could not place held the shard the pool gave it, and the
    extraction hung at its last shard."""
    holder = cpu_holder()
    ray.get(holder.pid.remote())
    try:
        messages = []
        thread, outcome = run_in_thread(build_store, tiny_model(tmp_path / "model"),
                                        generate_multiplication(128, 2, 2), [1, 2], 4, tmp_path / "store", 2, 16, 16,
                                        False, 0.0, messages.append)
        thread.join(300)
        assert not thread.is_alive(), f"extraction hung: {messages}"
    finally:
        ray.kill(holder)
    if "error" in outcome:
        raise outcome["error"]
    assert any("1 of 2 teacher actors ready (each takes 1 CPU; free now: 0 CPU)" in m for m in messages), messages
    store = outcome["result"]
    assert store.manifest["shards"] == 8 and len({e["pid"] for e in store.extractions()}) == 1


def test_an_actor_ray_places_later_joins_the_pool_and_takes_queued_work(cluster):
    holder = cpu_holder()
    ray.get(holder.pid.remote())
    actors, messages, pids = [cpu_holder() for _ in range(2)], [], []
    try:
        pool = PlacedPool(actors, "1 CPU", messages.append)
        assert len(messages) == 1 and "1 of 2 teacher actors ready" in messages[0]
        for pid in pool.map_unordered(lambda actor, pause: actor.pid.remote(pause), [0.5] * 16):
            pids.append(pid)
            if len(pids) == 1:
                ray.kill(holder)  # a CPU frees up: Ray places the waiting actor, which takes the queued tasks
    finally:
        for actor in (holder, *actors):
            ray.kill(actor)
    assert len(pids) == 16 and len(set(pids)) == 2


def test_a_stage_without_room_on_the_cluster_says_what_it_waits_for_then_fails_after_wait_minutes(cluster):
    holders = [cpu_holder() for _ in range(2)]  # the cluster's 2 CPUs held, as by another job
    ray.get([h.pid.remote() for h in holders])
    try:
        messages = []
        with pytest.raises(ResourcesUnavailable, match=r"tiny-student: needs 1 CPU free on the Ray cluster \(it has 2 "
                                                       r"CPU, 0 CPU free\) and waited 0.1 minutes for them"):
            wait_for_resources("tiny-student", {"CPU": 1, "GPU": 0}, 0.05, messages.append, poll_s=0.2, quiet_s=0,
                               say_every_s=60)
        assert messages == [("[tiny-student] waiting for 1 CPU on the Ray cluster (it has 2 CPU, 0 CPU free now), "
                             "up to 0.05 minutes (cluster.wait_minutes)")]
        # freed while it waits: it goes on
        threading.Timer(2.0, ray.kill, args=(holders[0],)).start()
        started = time.monotonic()
        wait_for_resources("tiny-student", {"CPU": 1}, 1.0, messages.append, poll_s=0.2, quiet_s=0)
        assert 1.5 < time.monotonic() - started < 30
    finally:
        for holder in holders:
            ray.kill(holder)


def _lives(process) -> bool:
    """True while the process runs and is not a zombie; it may end between any two psutil calls."""
    import psutil
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_local_cluster_ends_within_seconds_of_its_driver_being_killed(job_env):
    """SIGKILL of a driver that started a local cluster: its GCS, raylet, dashboard, agents and workers all end
    (the agents were re-parented to init and listened on for about three minutes)."""
    import psutil
    code = ("import time, ray\nfrom lori_ray.cluster import start_local\nstart_local(1, include_dashboard=True)\n"
            "ray.get(ray.remote(lambda: 1).remote())\nprint('up', flush=True)\ntime.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "up"
        processes, names = [], ""
        for process in psutil.Process(driver.pid).children(recursive=True):
            try:  # a short-lived helper may already be a zombie or gone: it is not a process that could linger
                command = process.cmdline()
                name = process.name()
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue
            if "lori_ray.reaper" not in " ".join(command):
                processes.append(process)
                names += " " + " ".join([name, *command[:3]])
        assert "raylet" in names and "gcs_server" in names and "DashboardAgent" in names, names
    finally:
        driver.kill()
        driver.wait()
    deadline = time.time() + 20
    while (left := [p for p in processes if _lives(p)]) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [p.pid for p in left]
