"""The low-rank evidence: explained-variance curves and eRank of teacher trajectories per layer."""

from __future__ import annotations

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
    for layer, cumulative in zip(summary["layers"], summary["cumulative_explained_variance"]):
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
