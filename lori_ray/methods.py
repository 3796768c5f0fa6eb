"""The student methods, each declared once (docs/method.md#methods-and-baselines).

A ``MethodSpec`` says what a method is made of: its latent process, whether it has latent slots, what it aligns
with the teacher and where, the curriculum it trains with, and the loss terms it computes. The config's checks
(``config``), the student stage (``stages.student``) and the objective (``objective.LMObjective``, which computes
exactly the terms it is given) read it; none of them names a method. Adding a method is one entry in
``METHODS`` (plus a loss module and its term in ``objective`` when it computes a new one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# none: no latent slots; pause: the slots are trained input tokens (continuous thoughts with student.latent
# continuous); continuous: always continuous thoughts (Coconut)
Latent = Literal["none", "pause", "continuous"]
# what meets the teacher: nothing, the student's states mapped into the teacher's subspace (a projection at the
# slots, a readout at the answer), or its full-width hidden states (MSE; the teacher's width)
Alignment = Literal["none", "subspace", "hidden"]
# where: the latent slots (slot k ↔ teacher step k), the answer positions, both, or ``####`` alone
Site = Literal["latents", "answer", "both", "separator"]
Curriculum = Literal["none", "removal", "stages"]

# each loss term (in the order the objective computes and sums them) and the ``loss`` field that weighs it
TERM_WEIGHTS = {"ce": "ce", "first_order": "first_order", "second_order": "second_order",
                "hidden_mse": "first_order", "answer_align": "answer", "kd": "kd"}
TERMS = tuple(TERM_WEIGHTS)


@dataclass(frozen=True)
class MethodSpec:
    """One student method. ``sites``: where it may align, ``loss.align_at`` choosing when there are several;
    ``curricula``: the ``student.curriculum`` values it trains with (``curriculum``: the one it always has);
    ``writes_cot``: the student writes the CoT (the teacher's sequences); ``fresh``: it may train on fresh
    problems (``student.problems: fresh``)."""

    name: str
    latent: Latent = "none"
    alignment: Alignment = "none"
    sites: tuple[Site, ...] = ()
    curriculum: Curriculum = "none"
    curricula: tuple[Curriculum, ...] = ()
    writes_cot: bool = False
    fresh: bool = False

    def __post_init__(self):
        if (self.alignment == "none") != (not self.sites):
            raise ValueError(f"method {self.name}: an alignment needs its sites and sites need an alignment")
        if self.curriculum != "none" and self.curriculum not in self.curricula:
            raise ValueError(f"method {self.name}: its curriculum {self.curriculum} must be among its curricula")

    def site(self, align_at: str) -> Site | None:
        """Where it aligns: ``align_at`` (``loss.align_at``) when it may choose, its one site otherwise, ``None``
        when it aligns nothing."""
        if not self.sites:
            return None
        if len(self.sites) == 1:
            return self.sites[0]
        if align_at not in self.sites:
            raise ValueError(f"method {self.name} aligns at {self.sites}, not {align_at!r}")
        return align_at

    def has_slots(self, align_at: str) -> bool:
        """Latent slots in its sequences: a latent process, unless it aligns at the answer alone."""
        return self.latent != "none" and self.site(align_at) != "answer"

    def aligns_slots(self, align_at: str) -> bool:
        """States at ``batch["latent_positions"]`` (the slots, or ``####``) meet the teacher's ``targets``."""
        return self.site(align_at) in ("latents", "both", "separator")

    def reads_answer(self, align_at: str) -> bool:
        """A readout at the answer positions predicts the teacher's trajectory (``answer_targets``)."""
        return self.site(align_at) in ("answer", "both")

    def terms(self, align_at: str, kd: bool = False) -> tuple[str, ...]:
        """The loss terms it computes, in ``TERMS`` order; ``kd``: the teacher runs online (``loss.kd`` > 0)."""
        terms = ["ce"]
        if self.aligns_slots(align_at):
            terms += ["first_order", "second_order"] if self.alignment == "subspace" else ["hidden_mse"]
        if self.reads_answer(align_at):
            if self.alignment != "subspace":
                raise ValueError(f"method {self.name}: an answer readout predicts subspace coordinates")
            terms.append("answer_align")
        if kd:
            terms.append("kd")
        return tuple(terms)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    # CE only: question -> answer, no latent slots; student.curriculum removal makes it icot_si
    MethodSpec("nocot", curricula=("removal",), fresh=True),
    # CE + full-width hidden-state MSE at the latent slots (weight loss.first_order)
    MethodSpec("icot_kd", latent="pause", alignment="hidden", sites=("latents",), fresh=True),
    # CE + full-width hidden-state MSE at ``####``, the token before the answer; no latent slots (CODI's
    # self-distillation with the frozen teacher)
    MethodSpec("codi", alignment="hidden", sites=("separator",)),
    # nocot trained on the teacher's sequences, their CoT removed token by token (ICoT-SI)
    MethodSpec("icot_si", curriculum="removal", curricula=("removal",)),
    # CE only, continuous thoughts replacing the CoT step by step (Coconut's stages)
    MethodSpec("coconut", latent="continuous", curriculum="stages", curricula=("stages",)),
    # CE + trajectory alignment in the teacher's subspace: first and second order at the slots, a readout at
    # the answer, or both (loss.align_at); with no slots (align_at answer) it may add the removal curriculum
    MethodSpec("lori", latent="pause", alignment="subspace", sites=("latents", "answer", "both"),
               curricula=("removal",), fresh=True),
    # the student writes the CoT like the teacher (CE, and loss.kd for logit distillation)
    MethodSpec("explicit", writes_cot=True),
)}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown student method {name!r}; one of {list(METHODS)}") from None


def term_weights(terms, loss) -> dict[str, float]:
    """Each term's weight from the ``loss`` config section (``TERM_WEIGHTS``)."""
    return {term: getattr(loss, TERM_WEIGHTS[term]) for term in terms}
