"""What the demo tells its user: the verdict sentence, ``results.json`` and the curves PNG.

Kept apart from the demo's flow so the verdict can be tested on plain numbers and the
dynamic demo could reuse any of it.  Nothing here trains or talks to a teacher.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")


def samples_per_s(hists: list[Any]) -> float:
    """How fast the training loops of ``hists`` (:class:`models.History`) consumed samples, over all their runs."""
    return sum(h.samples for h in hists) / max(sum(h.seconds for h in hists), 1e-9)


def print_results(rows: list[tuple[str, int, str, list[Any], str, float]]) -> None:
    """The demo's results table, one row a model: its name, parameter count, what it trained on,
    the histories of its runs, its test accuracy (as printed) and its wall seconds."""
    print(f"  {'model':<25}{'params':>8}  {'trained on':<13}{'runs':>4}{'epochs':>8}  {'test accuracy':<18}"
          f"{'wall s':>7}{'samples/s':>11}")
    for name, params, trained_on, hists, acc, secs in rows:
        print(f"  {name:<25}{params:>8,}  {trained_on:<13}{len(hists):>4}{len(hists[0].epoch_test_acc):>8}  "
              f"{acc:<18}{secs:>7.1f}{samples_per_s(hists):>11,.0f}")


def print_distilled_rate(distilled: list[Any], reader: str) -> None:
    """How fast distilled training went, the student's steps included; ``reader`` says what fed it and how fast."""
    print(f"  distilled training: {sum(h.samples for h in distilled):,} samples with teacher soft labels at "
          f"{samples_per_s(distilled):,.0f} samples/s (training loop incl. the student's steps); {reader}")


def students_results(model: str, params: int, epochs: int, alone: list[Any], distilled: list[Any]) -> dict[str, Any]:
    """The two students' part of ``results.json``: each one's runs, and how the distilled one compares."""
    alone_accs, distilled_accs = [h.final_acc for h in alone], [h.final_acc for h in distilled]
    student = {"model": model, "params": params, "epochs": epochs}
    return {
        "student_alone": {**student, "samples_per_seed": alone[0].samples, "accuracies": alone_accs,
                          "mean": float(np.mean(alone_accs))},
        "student_distilled": {**student, "samples_per_seed": distilled[0].samples, "accuracies": distilled_accs,
                              "mean": float(np.mean(distilled_accs)), "samples_per_s": samples_per_s(distilled)},
        "gain_points": 100 * float(np.mean(distilled_accs) - np.mean(alone_accs)),
        "every_distilled_seed_above_every_alone_seed": min(distilled_accs) > max(alone_accs),
    }


def noise_level(alone: list[float], distilled: list[float], n_test: int) -> float:
    """The smallest mean gain that counts: one test image, or twice the standard error of the difference."""
    var = 0.0
    if len(alone) > 1 and len(distilled) > 1:
        var = float(np.var(alone, ddof=1) / len(alone) + np.var(distilled, ddof=1) / len(distilled))
    return max(2 * float(np.sqrt(var)), 1.0 / n_test)


def verdict(alone: list[float], distilled: list[float], n_test: int, unit: str = "test images") -> str:
    """An honest sentence on whether distillation helped, from this run's accuracies only.

    ``unit`` names what was tested (the text example tests reviews).

    "Measurable" means the mean gain over seeds exceeds the noise (:func:`noise_level`);
    the sentence also says whether every distilled seed beat every seed alone, because a
    mean can hide one bad seed.
    """
    diff = float(np.mean(distilled) - np.mean(alone))
    noise = noise_level(alone, distilled, n_test)
    pts = (f"{100 * diff:+.2f} points ({diff * n_test:+.1f} of {n_test} {unit}), "
           f"{len(distilled)} distilled vs {len(alone)} alone seed(s)")
    if min(distilled) > max(alone):
        seeds = f"every distilled seed beat every seed alone ({min(distilled):.4f} > {max(alone):.4f})"
    elif max(distilled) < min(alone):
        seeds = f"every seed alone beat every distilled seed ({min(alone):.4f} > {max(distilled):.4f})"
    else:
        seeds = f"the seeds overlap (distilled {min(distilled):.4f}-{max(distilled):.4f}, " \
                f"alone {min(alone):.4f}-{max(alone):.4f})"
    if diff > noise:
        return f"Distillation helped the student: {pts}, above the noise (~{100 * noise:.2f} points); {seeds}."
    hint = ("Distillation pays off where the teacher knows more than the student can learn from its own labels "
            "(see the example's README).")
    if diff < -noise:
        return f"Distillation hurt the student: {pts}, beyond the noise (~{100 * noise:.2f} points); {seeds}. {hint}"
    return f"No measurable gain from distillation: {pts}, within the noise (~{100 * noise:.2f} points). {hint}"


def write_json(path: str, results: dict[str, Any]) -> None:
    """Write ``results`` whole or not at all: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def plot_curves(runs: dict[str, list], path: str, note: str, finals: dict[str, float] | None = None) -> None:
    """Test accuracy over training of the three models (mean over seeds, min-max band), full range and zoomed.

    The x axis is each model's share of its own training (the teacher trains for more
    epochs than the students), so the zoom on the second half shows every model.
    ``finals`` are accuracies drawn as horizontal lines (the averaged teacher's, which has
    no curve of its own).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, zoom in zip(axes, (False, True), strict=True):
        lows = []
        for name, hists in runs.items():
            acc = np.array([h.epoch_test_acc for h in hists])
            done = 100 * np.arange(1, acc.shape[1] + 1) / acc.shape[1]
            label = name if len(hists) == 1 else f"{name} (mean of {len(hists)} seeds)"
            line = ax.plot(done, acc.mean(axis=0), "--" if "alone" in name else "-", marker=".", label=label)[0]
            if len(hists) > 1:
                ax.fill_between(done, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.15)
            lows.append(acc[:, acc.shape[1] // 2 :].min())
        for name, value in (finals or {}).items():
            ax.axhline(value, color="black", linestyle=":", linewidth=1, label=f"{name}: {value:.4f}")
            lows.append(value)
        ax.set_xlabel("training done (% of each model's epochs)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_ylim(max(0.0, min(lows) - 0.01), 1.0)
            ax.set_xlim(left=50)
            ax.set_title("zoom: second half of training")
        else:
            ax.set_ylim(0.0, 1.0)
            ax.set_title("test accuracy after each epoch")
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
