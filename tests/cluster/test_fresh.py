"""Fresh problems every step (``student.problems: fresh``) in a distillation run on a local cluster: the stream and
the teacher's online targets alone are in ``tests/unit/test_fresh.py``."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_student_trains_on_fresh_problems_with_targets_computed_in_the_step(tiny_run, tmp_path, ray_head):
    """Two workers take their rows of each step's fresh batch; the teacher's targets come from the step, not a file."""
    run_dir, _ = tiny_run
    result = subprocess.run(
        [sys.executable, "jobs/distill.py", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}",
         f"teacher.path={run_dir / 'teacher'}", ray_head.override, "student.problems=fresh", "loss.align_at=both"],
        cwd=ROOT, env=ray_head.env(), capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ("[student] fresh problems: 96 drawn over 6 steps, never one of the 48 validation and held-out questions; "
            "the teacher's targets computed in each step") in result.stdout
    assert ("[tiny-student] 6 steps x batch 16 of fresh 2x2 problems, their teacher targets computed in the step on "
            "2 workers") in result.stdout
    assert re.search(r"\[tiny-student\] step 6/6 ce=\S+ first_order=\S+ second_order=\S+ answer_align=\S+",
                     result.stdout)
    assert "| student (lori, no CoT) |" in result.stdout
