"""The trajectory store and Ray Train checkpoints on an object store: a real S3 API (moto's server on
loopback) reached by the driver, the teacher actors and the train workers through pyarrow."""

import re
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
from moto.server import ThreadedMotoServer

from lori_ray import storage
from lori_ray.cluster import free_port, start_local
from lori_ray.config import load_config
from lori_ray.data import generate_multiplication
from lori_ray.driver import fit
from lori_ray.teacher_pool import build_store
from lori_ray.trajectories import MANIFEST, TrajectoryStore

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "lori-ray"


@pytest.fixture(scope="module")
def s3():
    """``s3://lori-ray`` on a local S3 server, and a local Ray cluster whose processes can reach it."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # pyarrow (driver, actors, Ray Train's own uploads) reads the standard AWS variables; set before
    # ray.init, every Ray worker process inherits them
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                          allow_bucket_creation=True).create_dir(BUCKET)
        start_local(2, include_dashboard=False, log_to_driver=False)
        try:
            yield f"s3://{BUCKET}"
        finally:
            ray.shutdown()
            server.stop()


def files_under(uri: str) -> dict[str, pafs.FileInfo]:
    """Every object under ``uri``, by its path relative to ``uri``."""
    filesystem, root = storage.resolve(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    return {info.path.removeprefix(root + "/"): info for info in infos if info.type == pafs.FileType.File}


def test_locations_join_resolve_and_validate():
    endpoint = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(endpoint, "key", "x") == "s3://bucket/runs/key/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("/shared/runs", "key") == "/shared/runs/key"
    assert storage.absolute("runs") == str(Path.cwd() / "runs") and storage.absolute("gs://b/p") == "gs://b/p"
    assert storage.uri_problem("/mnt/shared") is None and storage.uri_problem("s3://bucket/prefix") is None
    assert "'ftp://'" in storage.uri_problem("ftp://host/prefix")
    assert "no bucket" in storage.uri_problem("gs:///prefix")
    config = load_config(ROOT / "configs/tiny.yaml", ["trajectory.store_dir=s3://b/t", "cluster.storage_path=gs://b/r"])
    assert config.store_dir == "s3://b/t" and config.storage_path == "gs://b/r"
    assert load_config(ROOT / "configs/tiny.yaml", ["output_dir=/shared"]).storage_path == "/shared/tiny/ray"


def test_remove_temporaries_deletes_only_what_a_killed_writer_left(tmp_path):
    filesystem, root = storage.resolve(str(tmp_path))
    storage.write_whole(filesystem, f"{root}/hidden/00001.safetensors", b"whole")
    (tmp_path / "hidden" / ".00002.safetensors.4242.tmp").write_bytes(b"part")  # killed before its rename
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    assert storage.remove_temporaries(filesystem, root) == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "hidden/00001.safetensors", "notes.tmp"]
    assert storage.remove_temporaries(filesystem, f"{root}/absent") == 0


def test_trajectory_store_on_s3_holds_every_example_once_and_is_found_again(s3, tmp_path, monkeypatch, capsys,
                                                                            tiny_model):
    monkeypatch.chdir(tmp_path)  # a URI mistaken for a relative path would leave files here
    model_dir = tiny_model(tmp_path / "model")
    examples = generate_multiplication(64, 2, 2)

    def build() -> TrajectoryStore:  # 2 actors, shards of 16 examples; a progress bar as on a terminal
        return build_store(model_dir, examples, [1, 2], 4, f"{s3}/trajectories", 2, 16, 16, False, 0.0,
                           lambda message: None, bars=True)

    store = build()
    assert re.search(r"teacher pass: 100%\|.*\| 4\.00/4\.00 \[", capsys.readouterr().err)  # one per shard
    assert store.uri.startswith(f"{s3}/trajectories/")
    assert store.manifest["examples"] == 64 and store.manifest["shards"] == 4
    index = [i for n in range(4) for i in store.shard("coords", n)["index"].tolist()]
    assert sorted(index) == list(range(64))  # every example exactly once
    objects = files_under(store.uri)
    assert {f"hidden/{n:05d}.safetensors" for n in range(4)} <= set(objects)
    assert max(info.mtime for info in objects.values()) == objects[MANIFEST].mtime  # the manifest came last
    assert sorted(e["shard"] for e in store.extractions()) == [0, 1, 2, 3]
    # the readers go through the same filesystem
    assert TrajectoryStore(store.uri).coordinates(rank=4, steps=2)[1].shape == (64, 2, 2, 4)
    assert store.hidden(steps=2)[1].shape[:3] == (64, 2, 2)

    again = build()
    assert again.uri == store.uri and len(again.extractions()) == 4  # found: the teacher did not run again
    assert "teacher pass" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    filesystem, root = storage.resolve(store.uri)
    filesystem.delete_file(f"{root}/{MANIFEST}")
    assert not TrajectoryStore(store.uri).complete  # without its manifest a store is never read


def test_train_checkpoints_land_in_the_bucket_and_the_model_is_copied_out(s3, tmp_path, tiny_stage):
    stage = tiny_stage(tmp_path, "on-s3", examples=64, steps=4, log_every=2, checkpoint_every=2)
    assert stage.train.num_workers == 2

    _, metrics = fit(stage, tmp_path / "out", f"{s3}/ray")

    assert metrics["step"] == 4
    def checkpoint(step: int) -> set[str]:
        prefix = f"on-s3/step-{step:06d}/"
        return {path.removeprefix(prefix) for path in files_under(f"{s3}/ray") if path.startswith(prefix)}
    # both ranks' ZeRO shards of the periodic checkpoint were uploaded from their own worker processes; the final
    # checkpoint is rank 0's HF model alone
    assert len([p for p in checkpoint(2) if p.startswith("ds/state/") and p.endswith("optim_states.pt")]) == 2
    assert "hf/model.safetensors" in checkpoint(4) and not [p for p in checkpoint(4) if p.startswith("ds/")]
    assert (tmp_path / "out" / "model.safetensors").is_file()  # fit downloaded hf/ from the bucket
