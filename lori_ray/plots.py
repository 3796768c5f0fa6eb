"""The low-rank evidence: explained-variance curves and eRank of teacher trajectories per layer."""

from __future__ import annotations

from matplotlib import rcParams
from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed

from .subspace import Subspace, effective_rank


def spectrum_summary(subspace: Subspace, layers: list[int]) -> dict:
    """Per layer: cumulative explained variance by rank, and eRank of the centred trajectories.

    The singular values of the centred step-mean matrix are the square roots of the covariance
    eigenvalues (up to one factor), so eRank needs no second pass over the data.
    """
    spectrum = subspace.eigenvalues.clamp_min(0)
    cumulative = spectrum.cumsum(-1) / spectrum.sum(-1, keepdim=True)
    return {"layers": layers, "cumulative_explained_variance": cumulative.tolist(),
            "erank": effective_rank(spectrum.sqrt()).tolist(), "hidden_size": spectrum.shape[-1]}


def spectrum_figure(summary: dict, max_rank: int = 64):
    figure = Figure(figsize=(10, 4))
    curves, bars = figure.subplots(1, 2)
    for layer, cumulative in zip(summary["layers"], summary["cumulative_explained_variance"], strict=True):
        ranks = range(1, min(max_rank, len(cumulative)) + 1)
        curves.plot(ranks, cumulative[:len(ranks)], label=f"layer {layer}")
    curves.set(xlabel="rank r", ylabel="explained variance", ylim=(0, 1.01),
               title="Teacher trajectories: explained variance")
    curves.legend(fontsize="small")
    bars.bar([str(layer) for layer in summary["layers"]], summary["erank"])
    bars.set(xlabel="layer", ylabel="eRank", title=f"eRank of trajectories (hidden size {summary['hidden_size']})")
    figure.tight_layout()
    return figure


def erank_figure(ranks: dict[str, list[float]]):
    """eRank per layer (0 = embedding output) of each model's hidden states, one line per model."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for label, values in ranks.items():
        axes.plot(range(len(values)), values, marker="o", label=label)
    axes.set(xlabel="layer (0 = embeddings)", ylabel="eRank", title="eRank of hidden states")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def curves_figure(curves: dict[str, list[list[tuple[int, float, float]]]], metric: str = "validation exact match"):
    """Learning curves of each method (one colour, a line per seed) against steps and against minutes."""
    figure = Figure(figsize=(11, 4))
    by_step, by_time = figure.subplots(1, 2)
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (method, seeds) in enumerate(curves.items()):
        colour = colours[number % len(colours)]
        for i, curve in enumerate(seeds):
            if not curve:
                continue
            steps, minutes, values = zip(*curve, strict=True)
            label = method if i == 0 else None
            by_step.plot(steps, values, color=colour, marker=".", label=label)
            by_time.plot(minutes, values, color=colour, marker=".", label=label)
    by_step.set(xlabel="step", ylabel=metric, ylim=(-0.02, 1.02), title="Learning curves (one line per seed)")
    by_time.set(xlabel="minutes of training", ylabel=metric, ylim=(-0.02, 1.02), title="Against wall-clock")
    by_step.legend(fontsize="small")
    figure.tight_layout()
    return figure
