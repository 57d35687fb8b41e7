"""Wall-clock budgets: size each architecture's epochs, and its progressive-resizing split, to the
time it is given, from this machine's measured speed.

Plain arithmetic on plain numbers, used at three moments:

1. before training, the driver turns step speeds measured on a Train-worker-shaped task
   (``training.measure_speed``) into predicted epoch seconds, and plans every architecture;
2. when an architecture starts, the driver re-plans it from the time actually left (an earlier
   architecture that ran long or short moves the later ones);
3. inside the train loop, after every epoch, the real pace (the mean of the last ``PACE_EPOCHS``)
   replaces the prediction: both ways while the epochs are still at the early size
   (:func:`paced_epoch_seconds`), only ever downwards once at the final size.  The
   learning-rate schedule is a pure function of (step, total steps), so a re-plan only reshapes the
   rest of the one-cycle.
"""

from __future__ import annotations

# Epochs whose mean seconds pace a re-plan: one epoch's seconds drift by a third from one epoch to the
# next on a shared 2-core VM (ResNet18 at 96 px: 89-147 s in one run), and a plan following each one
# re-planned 13 times in that run, eight of them between 19 and 20 epochs (bench/NOTES.md).
PACE_EPOCHS = 3
# Plan to this share of the time left: the last epoch must not push the run past its budget.
SAFETY = 0.95
# Steps measured on a bare model run faster than inside the Ray pipeline, where decoding shares the
# cores (Ray Train reached 0.65-0.85 of a plain loop on 2 cores, bench/NOTES.md "Targets"); the
# first real epoch corrects the rest.
PIPELINE_EFFICIENCY = 0.8
# Per epoch beyond the steps: the data pipeline's restart, the checkpoint write and upload.
EPOCH_FIXED_S = 3.0
# Per architecture beyond its epochs: Train controller and worker start, the data pipeline's first
# start, shutdown (35-60 s on a 2-core box, the first architecture of a fresh Ray the slowest; the
# first trained architecture's real figure replaces it for the later ones).
ARCH_FIXED_S = 45.0
# Per validation-study pass beyond the images: a predictor actor's start and the Parquet write
# (six passes over 100 images took 49 s on a 2-core box).
STUDY_PASS_S = 8.0
# After an architecture's last epoch: the last report, the controller's shutdown, result.json.
ARCH_TAIL_S = 5.0
# The validation study comes last, so nothing after it absorbs an overrun, and its forecast rests on
# validation speeds timed for a second or two: summed over the three models of configs/local.yaml they
# measured 0.0094 and 0.0079 s per image in two runs on one CPU the same day, and a study reserved at
# 2.96 minutes took 3.47, ending that run 0.17 minutes past its 45 (bench/NOTES.md).
STUDY_MARGIN = 1.2


def split_epochs(epochs: int, early_fraction: float) -> int:
    """Early (small-image) epochs of a plan of ``epochs``: at least one epoch stays at the final size."""
    if epochs <= 1 or early_fraction <= 0:
        return 0
    return min(epochs - 1, round(epochs * early_fraction))


def epoch_seconds(speed: dict, size: int, n_train: int, n_val: int) -> float:
    """Predicted seconds of one epoch training at ``size`` (validation always runs at the final size).
    ``speed``: seconds per image, ``train`` by size and ``val``, as measured, per worker."""
    steps = n_train * speed["train"][size] + n_val * speed["val"]
    return steps / PIPELINE_EFFICIENCY + EPOCH_FIXED_S


def paced_epoch_seconds(epoch_s: dict[int, float], size: int, steady: float) -> dict[int, float]:
    """Every size's epoch seconds once the first epoch, at ``size``, really took ``steady`` seconds;
    ``epoch_s``: the predictions before it (:func:`epoch_seconds`).  The lesser of two rules, each
    exact at ``size``:

    - one pace scaling every size's prediction: right when what an epoch takes beyond its model
      compute grows with that compute, and for tiny epochs, where each epoch's pipeline restart and
      checkpoint dominate (the 3-minute budget test: 1 s steady, 2 s real; the sum below planned 136
      epochs there);
    - that epoch's seconds beyond its bare compute added to every size's bare compute: right when the
      extra is the data pipeline, decoding on the same cores at about the same seconds per image
      whatever the training size.  After ResNet18's first 96 px epoch the pace put a 128 px epoch at
      329 s, the sum at 303 s; they took 300 s (bench/NOTES.md, "Time budget: predicted vs actual"),
      and the plan had dropped an epoch for it.
    """
    bare = {k: (v - EPOCH_FIXED_S) * PIPELINE_EFFICIENCY for k, v in epoch_s.items()}
    pace = max(steady - EPOCH_FIXED_S, 1e-3) / max(epoch_s[size] - EPOCH_FIXED_S, 1e-3)
    # At least EPOCH_FIXED_S: later epochs restart the pipeline and write a checkpoint, which the first
    # epoch's steady seconds (without its first batch's wait) hide.
    extra = max(steady - bare[size], EPOCH_FIXED_S)
    return {k: min((v - EPOCH_FIXED_S) * pace + EPOCH_FIXED_S, bare[k] + extra) for k, v in epoch_s.items()}


def plan_seconds(
    epoch_s: dict[int, float], sizes: tuple[int, int], plan: tuple[int, int], done: tuple[int, int]
) -> float:
    """Seconds of the epochs of ``plan`` (total, early) not yet ``done`` (total, early), early ones at
    ``sizes[0]``, the rest at ``sizes[1]``; ``epoch_s``: seconds of one epoch by training size."""
    (epochs, early), (done_epochs, done_early) = plan, done
    return (early - done_early) * epoch_s[sizes[0]] + (epochs - early - (done_epochs - done_early)) * epoch_s[sizes[1]]


def fit_epochs(
    seconds: float, epoch_s: dict[int, float], sizes: tuple[int, int], early_fraction: float, done: tuple[int, int]
) -> tuple[int, int]:
    """The most epochs (total, early) whose remaining epochs fit in ``seconds``.

    ``epoch_s``: seconds of one epoch by training size; ``sizes``: (early, final); ``done``:
    (epochs, early epochs) already trained.  Once an epoch ran at the final size the early count is
    fixed.  Before that, a plan may take one small-size epoch more than ``early_fraction`` says where
    that makes one more epoch fit: with epochs of 200-300 s in a 30-minute allotment, 8 epochs as
    6 + 2 beat 7 as 5 + 2 (8 as 5 + 3 did not fit, and the minutes left went to other models).  One
    more than the fraction, never more: where the early epochs done already reach the fraction's
    split, a re-plan near the budget's edge would otherwise trade a final-size epoch for a small one
    at every epoch (15 + 4 where 0.65 of 19 says 12 + 7).  At least one epoch at the final size is
    always planned, even over the budget (a model must end at the size it is validated and used
    at); nothing more than what fits otherwise."""
    done_epochs, done_early = done
    at_final = done_epochs > done_early
    best = None
    for epochs in range(done_epochs + 1, done_epochs + 100_000):
        split = split_epochs(epochs, early_fraction)
        planned = done_early if at_final else max(done_early, split)
        may_add = not at_final and early_fraction > 0 and planned == split and planned + 1 < epochs
        one_more = [planned + 1] if may_add else []
        fitting = [e for e in (planned, *one_more) if plan_seconds(epoch_s, sizes, (epochs, e), done) <= seconds]
        if not fitting:
            break
        best = (epochs, fitting[0])
    if best is not None:
        return best
    return (done_epochs, done_early) if at_final else (done_early + 1, done_early)


def shares(weights: list[float | None]) -> list[float]:
    """Each architecture's share of the training time: its ``budget_share`` (unset = 1), normalised."""
    values = [1.0 if w is None else float(w) for w in weights]
    total = sum(values)
    return [v / total for v in values]


def study_seconds(val_speeds: list[float], n_val: int, size_factors: list[float]) -> float:
    """Predicted seconds of the validation study (report.validation_study): one pass of every model
    over the validation split per test size factor f, each image and its flip (two forward passes at
    about f^2 the compute of the training size, where ``val_speeds`` were measured)."""
    image_seconds = n_val * sum(val_speeds) * sum(2 * f * f for f in size_factors)
    return STUDY_MARGIN * image_seconds / PIPELINE_EFFICIENCY + len(size_factors) * STUDY_PASS_S


def least_seconds(arch: dict) -> float:
    """Seconds of the least plan :func:`fit_epochs` ever makes for ``arch``: one epoch at its final size."""
    return arch["epoch_s"][arch["sizes"][1]]


def arch_seconds(left: float, later: list[dict], share: float, arch_fixed: float) -> float:
    """Seconds for the next architecture from ``left`` (what the run has left for training): its
    share of what remains after the later architectures' fixed costs and the least plan of any later
    one whose share would not pay for it.  Without that reservation a later model's one obligatory
    epoch lands past the budget: on a 2-core AMD EPYC without AVX-512, sequential_cnn's one 64 px
    epoch was predicted at 4.0 minutes, its 0.5 share worth 1.3.  ``later``: share, sizes and epoch_s of each."""
    spendable = max(0.0, left - arch_fixed * len(later))
    sharing = list(later)
    while True:
        total = share + sum(a["share"] for a in sharing)
        short = [a for a in sharing if spendable * a["share"] / total < least_seconds(a)]
        if not short:
            return spendable * share / total
        spendable = max(0.0, spendable - sum(least_seconds(a) for a in short))
        sharing = [a for a in sharing if a not in short]


def minutes(seconds: float) -> float:
    return round(seconds / 60, 2)


def arch_plan(arch: dict, seconds: float, arch_fixed: float) -> dict:
    """Epochs (total, early) for one architecture given ``seconds`` for all of it, and what that
    plan is predicted to take.  ``arch``: sizes (early, final), early_fraction, epoch_s by size."""
    sizes, epoch_s = arch["sizes"], arch["epoch_s"]
    epochs, early = fit_epochs(seconds - arch_fixed, epoch_s, sizes, arch["early_fraction"], (0, 0))
    predicted = arch_fixed + plan_seconds(epoch_s, sizes, (epochs, early), (0, 0))
    return {"epochs": epochs, "early_epochs": early, "allotted_s": seconds, "predicted_s": predicted}


def plan_run(archs: list[dict], seconds: float, arch_fixed: float) -> list[dict]:
    """Every architecture in training order, from ``seconds`` of training time: each gets its share
    of what the earlier ones are predicted to leave."""
    plans, left = [], seconds
    for index, arch in enumerate(archs):
        plan = arch_plan(arch, arch_seconds(left, archs[index + 1 :], arch["share"], arch_fixed), arch_fixed)
        plans.append(plan)
        left -= plan["predicted_s"]
    return plans


def choose_sizes(archs: list[dict], seconds: float, arch_fixed: float) -> list[dict]:
    """Every architecture at the sizes it will train at, in training order, from ``seconds`` of
    training time: the first of its ``rungs`` (each ``sizes`` and ``epoch_s``, largest first) whose
    plan reaches ``min_epochs``, else the one where the most epochs fit (the earlier of a tie).  Each
    gets its share of what the earlier ones, at their chosen sizes, are predicted to leave; the later
    ones are counted at their first rung, the dearest.  Returns ``archs`` with ``sizes``, ``epoch_s``
    and ``rung`` (its index) set."""
    chosen, left = [], seconds
    for index, arch in enumerate(archs):
        allotted = arch_seconds(left, archs[index + 1 :], arch["share"], arch_fixed)
        options = [{**arch, **rung, "rung": i} for i, rung in enumerate(arch["rungs"])]
        plans = [arch_plan(option, allotted, arch_fixed) for option in options]
        enough = [i for i, plan in enumerate(plans) if plan["epochs"] >= arch["min_epochs"]]
        pick = enough[0] if enough else max(range(len(plans)), key=lambda i: (plans[i]["epochs"], -i))
        chosen.append(options[pick])
        left -= plans[pick]["predicted_s"]
    return chosen
