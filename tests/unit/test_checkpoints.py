"""Signed checkpoints: the newest complete one is found whatever Ray recorded; a changed or added file is
refused before anything is unpickled."""

import os
import shutil
import stat

import pytest

from lori_ray.checkpoints import TamperedCheckpoint, newest_complete, run_key, sign, verify

KEY = "ab" * 32


def save(root, step: int, inputs: str = "inputs", ranks=(0, 1)):
    """What two ranks upload into one ``step-N/ds``: each saves and signs its own files locally."""
    target = root / f"step-{step:06d}" / "ds"
    for rank in ranks:
        local = root / f"local-{step}-{rank}"
        (local / "state").mkdir(parents=True)
        (local / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(b"shard %d %d" % (rank, step))
        if rank == 0:
            (local / "latest").write_text("state")
        sign(local, rank, step, inputs, KEY)
        shutil.copytree(local, target, dirs_exist_ok=True)
        shutil.rmtree(local)
    return target


def test_complete_checkpoints_verify_and_the_newest_complete_one_wins(tmp_path):
    assert verify(save(tmp_path, 10), 2, "inputs", KEY) == 10
    save(tmp_path, 20)
    save(tmp_path, 30, ranks=(0,))  # rank 1 died before its upload: incomplete
    assert newest_complete(tmp_path, 2, "inputs", KEY) == (20, tmp_path / "step-000020")
    shard = tmp_path / "step-000020" / "ds" / "state" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:4])  # its copy was cut short
    assert newest_complete(tmp_path, 2, "inputs", KEY) == (10, tmp_path / "step-000010")
    shard.unlink()  # or never started
    assert newest_complete(tmp_path, 2, "inputs", KEY) == (10, tmp_path / "step-000010")
    assert newest_complete(tmp_path, 2, "other inputs", KEY) is None  # another stage's (or config's) checkpoints
    assert newest_complete(tmp_path / "absent", 2, "inputs", KEY) is None


@pytest.mark.parametrize("tamper", ["changed shard", "added file", "forged manifest", "other key"])
def test_a_file_no_worker_wrote_is_refused(tmp_path, tamper):
    ds = save(tmp_path, 10)
    key = KEY
    if tamper == "changed shard":
        (ds / "state" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"import os; os.system('...')")
    elif tamper == "added file":
        (ds / "state" / "extra.pt").write_bytes(b"pickle")
    elif tamper == "forged manifest":
        manifest = ds / "manifest-rank-1.json"
        manifest.write_text(manifest.read_text().replace('"step": 10', '"step": 11'))
    else:
        key = "cd" * 32
    with pytest.raises(TamperedCheckpoint, match="refus"):
        verify(ds, 2, "inputs", key)


def test_the_run_key_is_created_once_and_readable_by_its_owner_only(tmp_path):
    key = run_key(tmp_path / "run")
    assert len(bytes.fromhex(key)) == 32 and run_key(tmp_path / "run") == key
    assert stat.S_IMODE(os.stat(tmp_path / "run" / ".checkpoint-key").st_mode) == 0o600
