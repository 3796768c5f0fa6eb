"""The stages of a distillation run, each a module that owns its inputs and outputs: ``teacher_sft`` (the CoT
teacher), ``trajectories`` (the teacher actors' trajectory store), ``student`` (the student's initial model,
training tensors and objective, then its training) and ``evaluate`` (held-out accuracy, eRank, the report and
model cards); ``training`` holds what the two training stages share. ``lori_ray.recipe`` strings them together.
"""

from __future__ import annotations

from .. import storage


def log(message: str) -> None:
    """One line of the job's output, with the credentials of any URI in it replaced by ***."""
    print(storage.redact(message), flush=True)
