"""The wall-clock budget: the planning arithmetic, the re-plan from the real pace, the speed
measurement, the config rules, and one real budgeted run that must end inside its budget."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, quick_overrides

from catdog import budget, training
from catdog.config import load_config
from catdog.train_job import run_training
from catdog.training import measure_speed, pick_train_precision, replan

EPOCH_S = {48: 10.0, 64: 20.0}


def plan_cost(epochs: int, early: int, epoch_s: dict, sizes: tuple[int, int], done: tuple[int, int] = (0, 0)) -> float:
    return (early - done[1]) * epoch_s[sizes[0]] + (epochs - early - (done[0] - done[1])) * epoch_s[sizes[1]]


@pytest.mark.parametrize("seconds", [25.0, 100.0, 333.0, 1000.0])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.65])
def test_fit_epochs_plans_the_most_epochs_that_fit(seconds, fraction):
    sizes = (48, 64)
    epochs, early = budget.fit_epochs(seconds, EPOCH_S, sizes, fraction, (0, 0))
    planned = budget.split_epochs(epochs, fraction)
    assert epochs - early >= 1 and early in ((planned, planned + 1) if fraction else (0,))
    assert plan_cost(epochs, early, EPOCH_S, sizes) <= seconds
    if early > planned:  # one small epoch more than the fraction only where the planned split did not fit
        assert plan_cost(epochs, planned, EPOCH_S, sizes) > seconds
    one_more = budget.split_epochs(epochs + 1, fraction)
    for split in (one_more, one_more + 1) if fraction else (0,):  # the most that fits, either split
        if split < epochs + 1:
            assert plan_cost(epochs + 1, split, EPOCH_S, sizes) > seconds


def test_one_more_small_epoch_rather_than_one_epoch_fewer():
    """ResNet18 after its first 96 px epoch: 1,699 s left, epochs of 207 s at 96 px and 313 s at 128.
    8 epochs as planned (5 + 3) need 1,767 s; 6 + 2 need 1,661 s and fit, where the fraction alone gave 7 (5 + 2)."""
    epoch_s = {96: 207.0, 128: 313.0}
    assert budget.fit_epochs(1699.0, epoch_s, (96, 128), 0.65, (1, 1)) == (8, 6)
    assert budget.fit_epochs(1800.0, epoch_s, (96, 128), 0.65, (1, 1)) == (8, 5)  # the planned split when it fits
    assert budget.fit_epochs(1699.0, epoch_s, (96, 128), 0.65, (2, 1)) == (7, 1)  # at the final size: fixed


def test_fit_epochs_keeps_one_final_size_epoch_even_over_budget_and_stops_once_there():
    assert budget.fit_epochs(5.0, EPOCH_S, (48, 64), 0.5, (0, 0)) == (1, 0)
    assert budget.fit_epochs(5.0, EPOCH_S, (48, 64), 0.5, (3, 3)) == (4, 3)  # early ones done: one at 64 px
    assert budget.fit_epochs(5.0, EPOCH_S, (48, 64), 0.5, (4, 3)) == (4, 3)  # at 64 px already: stop now
    # Once at the final size, the early count is fixed and every later epoch costs the final size.
    assert budget.fit_epochs(65.0, EPOCH_S, (48, 64), 0.5, (4, 2)) == (7, 2)


def test_plan_run_shares_the_time_and_fits_it():
    archs = [
        {"share": share, "sizes": (48, 64), "early_fraction": 0.5, "epoch_s": EPOCH_S}
        for share in budget.shares([3, None])
    ]
    plans = budget.plan_run(archs, 1200.0, arch_fixed=30.0)
    assert sum(p["predicted_s"] for p in plans) <= 1200.0
    assert plans[0]["allotted_s"] == pytest.approx((1200.0 - 30.0) * 0.75)
    assert plans[0]["epochs"] > plans[1]["epochs"] >= 1
    for plan in plans:
        assert plan["predicted_s"] <= plan["allotted_s"]


def test_a_later_model_whose_share_cannot_pay_its_one_epoch_has_it_reserved_first():
    # The last model's share (1 of 15 of 1,140 s: 76 s) is below its one obligatory epoch (240 s,
    # a 2-core EPYC without AVX-512's sequential_cnn): the first model leaves it that epoch.
    slow = {"share": 1 / 15, "sizes": (64, 64), "early_fraction": 0.0, "epoch_s": {64: 240.0}}
    first = {"share": 14 / 15, "sizes": (48, 64), "early_fraction": 0.5, "epoch_s": EPOCH_S}
    plans = budget.plan_run([first, slow], 1200.0, arch_fixed=30.0)
    assert plans[1]["epochs"] == 1
    assert sum(p["predicted_s"] for p in plans) <= 1200.0
    # All but the slow one's fixed cost and epoch (the first one's fixed cost is in its allotment).
    assert plans[0]["allotted_s"] == pytest.approx(1200.0 - 30.0 - 240.0)
    # A share that does pay for its epoch is not cut: the plain share rule, as before.
    cheap = {**slow, "epoch_s": {64: 20.0}}
    assert budget.arch_seconds(1170.0, [cheap], 14 / 15, 30.0) == pytest.approx((1170.0 - 30.0) * 14 / 15)
    # Not even the least plans fit: nothing is left to share, and each still gets its one epoch.
    assert budget.arch_seconds(200.0, [slow], 14 / 15, 30.0) == 0.0
    assert [p["epochs"] for p in budget.plan_run([first, slow], 200.0, arch_fixed=30.0)] == [1, 1]


def test_choose_sizes_takes_the_first_rung_where_min_epochs_fit_else_the_most_epochs():
    # Rung 0 (48>64 px) fits 5 epochs of 20 s in 100 s, rung 1 (32>48) 10 of 10 s, rung 2 (24>32) 20 of 5 s.
    rungs = [
        {"sizes": (48, 64), "epoch_s": {48: 20.0, 64: 20.0}},
        {"sizes": (32, 48), "epoch_s": {32: 10.0, 48: 10.0}},
        {"sizes": (24, 32), "epoch_s": {24: 5.0, 32: 5.0}},
    ]
    arch = {"share": 1.0, "early_fraction": 0.5, **rungs[0], "rungs": rungs}

    def chosen(min_epochs: int, seconds: float = 130.0) -> tuple:
        [pick] = budget.choose_sizes([{**arch, "min_epochs": min_epochs}], seconds, arch_fixed=30.0)
        return pick["rung"], pick["sizes"], pick["epoch_s"]

    assert chosen(1) == (0, (48, 64), rungs[0]["epoch_s"])  # enough epochs at its own sizes: kept
    assert chosen(5)[0] == 0 and chosen(6)[0] == 1 and chosen(11)[0] == 2
    assert chosen(100)[:2] == (2, (24, 32))  # no rung reaches it: the most epochs
    # A tie (each fits its one obligatory epoch only) keeps the larger images.
    assert chosen(100, seconds=0.0)[0] == 0
    # A later model is counted at its own (dearest) sizes while the first chooses.
    later = {"share": 1.0, "early_fraction": 0.0, "min_epochs": 1, "sizes": (64, 64), "epoch_s": {64: 50.0}}
    later["rungs"] = [{"sizes": (64, 64), "epoch_s": {64: 50.0}}]
    first, second = budget.choose_sizes([{**arch, "min_epochs": 6}, later], 260.0, arch_fixed=30.0)
    assert (first["rung"], second["rung"]) == (1, 0)  # (260 - 30) / 2 = 115 s: 5 epochs at rung 0, 8 at rung 1


def test_study_reserve_grows_with_the_validation_set_the_members_and_the_test_sizes():
    one = budget.study_seconds([0.01], 1000, [1.0])
    assert budget.study_seconds([0.01], 2000, [1.0]) > one
    assert budget.study_seconds([0.01, 0.002], 1000, [1.0]) > one
    # A pass at 1.25x the size: 1.25^2 the compute, and one more predictor start.
    two = budget.study_seconds([0.01], 1000, [1.0, 1.25])
    extra = budget.STUDY_MARGIN * 1000 * 0.01 * 2 * 1.25**2 / budget.PIPELINE_EFFICIENCY
    assert two - one == pytest.approx(extra + budget.STUDY_PASS_S)


def budgeted_loop_cfg(deadline_in: float, epochs: int, early: int) -> dict:
    return {
        "arch": "sequential_cnn",
        "epochs": epochs,
        "early_epochs": early,
        "image_size": 64,
        "early_image_size": 48,
        "budget": {
            "deadline": time.time() + deadline_in,
            "epoch_seconds": dict(EPOCH_S),
            "predicted_epoch_seconds": {str(size): s for size, s in EPOCH_S.items()},  # as JSON gives it back
            "early_fraction": 0.5,
        },
    }


def trained(epoch: int, size: int, seconds: float, first_batch: float = 0.0) -> dict:
    """One epoch's metrics as the train loop hands them to replan."""
    return {"epoch": epoch, "train_image_size": size, "epoch_seconds": seconds, "first_batch_seconds": first_batch}


def test_replan_after_the_first_epoch_follows_the_real_pace():
    # Planned 10 epochs; the first (48 px, predicted 10 s) really took 27 s, 2 s of it its first batch's wait.
    cfg = budgeted_loop_cfg(deadline_in=200.0, epochs=10, early=5)
    line = replan(cfg, [trained(1, 48, 29.0, first_batch=2.0)], torch.device("cpu"))
    slow = budget.paced_epoch_seconds(EPOCH_S, 48, 27.0)
    assert cfg["budget"]["epoch_seconds"] == pytest.approx(slow) == {48: 27.0, 64: 35.0}
    left = 200.0 * budget.SAFETY
    assert plan_cost(cfg["epochs"], cfg["early_epochs"], slow, (48, 64), (1, 1)) <= left + 0.5
    assert cfg["epochs"] < 10 and line and "from epoch 1's pace (27 s)" in line
    # Faster than predicted: more epochs.
    fast = budgeted_loop_cfg(deadline_in=200.0, epochs=4, early=2)
    replan(fast, [trained(1, 48, 5.0)], torch.device("cpu"))
    assert fast["epochs"] > 4


def test_the_first_epoch_paces_every_size_by_the_lesser_of_its_pace_and_its_extra_seconds():
    """ResNet18 on a 2-core Xeon: predicted 185 s at 96 px and 326.5 s at 128 px; epoch 1 (96 px) took
    200 s.  One pace (x1.08) would put 128 px at 353 s; its 54 s beyond the bare compute (146 s),
    added to 128 px's (259 s), at 313 s: that is kept (the real ones took 285-300 s)."""
    paced = budget.paced_epoch_seconds({96: 185.0, 128: 326.5}, 96, 200.0)
    bare = {
        size: (s - budget.EPOCH_FIXED_S) * budget.PIPELINE_EFFICIENCY for size, s in {96: 185.0, 128: 326.5}.items()
    }
    assert paced[96] == pytest.approx(200.0)
    assert paced[128] == pytest.approx(bare[128] + 200.0 - bare[96]) == pytest.approx(313.2, abs=0.1)
    # Tiny epochs (the 3-minute test's CNN, steady below EPOCH_FIXED_S): the extra is mostly each
    # epoch's restart, the sum would add at least EPOCH_FIXED_S to every size's compute: the pace wins.
    tiny = budget.paced_epoch_seconds({24: 3.5, 32: 4.0}, 24, 2.0)
    assert tiny[32] == pytest.approx(budget.EPOCH_FIXED_S, abs=0.01)
    assert tiny[32] < (4.0 - budget.EPOCH_FIXED_S) * budget.PIPELINE_EFFICIENCY + budget.EPOCH_FIXED_S
    # The trained size gets its own seconds, whichever rule wins at the other.
    for steady in (150.0, 200.0, 400.0):
        assert budget.paced_epoch_seconds({96: 185.0, 128: 326.5}, 96, steady)[96] == pytest.approx(steady)


def test_replan_at_the_final_size_only_ever_shortens():
    early = [trained(1, 48, 10.0), trained(2, 48, 10.0), trained(3, 48, 10.0)]
    cfg = budgeted_loop_cfg(deadline_in=10_000.0, epochs=6, early=3)
    assert replan(cfg, [*early, trained(4, 64, 5.0)], torch.device("cpu")) is None
    assert cfg["epochs"] == 6  # far more time left, but the schedule's tail never grows back
    short = budgeted_loop_cfg(deadline_in=30.0, epochs=6, early=3)
    replan(short, [*early, trained(4, 64, 20.0)], torch.device("cpu"))
    assert short["epochs"] == 5 and short["early_epochs"] == 3
    assert short["budget"]["epoch_seconds"] == {48: 10.0, 64: 20.0}
    # Every final-size epoch may shorten it again, not only the first: after epoch 4 two more fit;
    # epoch 5 ran slow (30 s, a pace of 25 s with epoch 4's 20) with 15 s left, so the sixth goes.
    longer = budgeted_loop_cfg(deadline_in=60.0, epochs=8, early=3)
    replan(longer, [*early, trained(4, 64, 20.0)], torch.device("cpu"))
    assert longer["epochs"] == 6
    longer["budget"]["deadline"] = time.time() + 15.0
    line = replan(longer, [*early, trained(4, 64, 20.0), trained(5, 64, 30.0)], torch.device("cpu"))
    assert longer["epochs"] == 5 and longer["early_epochs"] == 3
    assert line and "re-planned to 5 epochs (3 at 48 px) from epochs 4-5's pace (25 s)" in line
    assert longer["budget"]["epoch_seconds"][64] == 25.0


def test_every_early_epoch_re_plans_from_the_recent_pace_both_ways():
    """ResNet18 on a Xeon with AMX: its first epoch ran slow (a warm-up), and a plan fixed after it
    left a quarter of the minutes unused.  Each early epoch re-paces the plan's predictions from the
    mean of the last three epochs, the first left out once another ran."""
    cfg = budgeted_loop_cfg(deadline_in=200.0, epochs=10, early=5)
    history = [trained(1, 48, 27.0)]
    replan(cfg, history, torch.device("cpu"))
    after_slow_first = cfg["epochs"]
    history.append(trained(2, 48, 10.0))
    line = replan(cfg, history, torch.device("cpu"))
    assert cfg["epochs"] > after_slow_first and line and "from epoch 2's pace (10 s)" in line
    # Paced from the predictions, not from the slow first epoch's re-prediction.
    paced = budget.paced_epoch_seconds(EPOCH_S, 48, 10.0)
    assert cfg["budget"]["epoch_seconds"] == pytest.approx(paced) == {48: 10.0, 64: 18.0}
    left = (cfg["budget"]["deadline"] - time.time()) * budget.SAFETY
    assert plan_cost(cfg["epochs"], cfg["early_epochs"], paced, (48, 64), (2, 2)) <= left
    assert plan_cost(cfg["epochs"] + 1, cfg["early_epochs"] + 1, paced, (48, 64), (2, 2)) > left
    # Slower again: fewer, while still at the early size, at the mean pace of epochs 2-3 (15 s).
    more = cfg["epochs"]
    history.append(trained(3, 48, 20.0))
    line = replan(cfg, history, torch.device("cpu"))
    assert cfg["epochs"] < more and cfg["early_epochs"] >= 3 and "from epochs 2-3's pace (15 s)" in line
    assert cfg["budget"]["epoch_seconds"][48] == pytest.approx(15.0)
    # The pace is the last three epochs': epoch 2 drops out once epoch 5 ran.
    history += [trained(4, 48, 12.0), trained(5, 48, 12.0)]
    replan(cfg, history, torch.device("cpu"))
    assert cfg["budget"]["epoch_seconds"][48] == pytest.approx((20.0 + 12.0 + 12.0) / 3)


def test_one_noisy_epoch_moves_the_plan_less_than_it_used_to():
    """Epochs alternating 9 and 11 s around a 10 s pace: each one's own pace re-planned between 26 and
    29 epochs every epoch, the mean of the last three alone between 27 and 28; with growth by a
    single epoch left out (within one pace's noise) the plan holds still."""
    cfg = budgeted_loop_cfg(deadline_in=400.0, epochs=30, early=15)
    history, plans = [], []
    start = time.time()
    for epoch, seconds in enumerate([10.0, 9.0, 11.0, 9.0, 11.0, 9.0, 11.0, 9.0], start=1):
        history.append(trained(epoch, 48, seconds))
        cfg["budget"]["deadline"] = start + 400.0 - 10.0 * epoch  # time passes at the mean pace
        replan(cfg, history, torch.device("cpu"))
        plans.append(cfg["epochs"])
    assert len(set(plans[3:])) == 1, plans


def test_re_plans_take_at_most_one_small_epoch_more_than_the_fraction():
    """Near the budget's edge a re-plan may keep its epoch count with one small epoch more than the
    fraction's split, but not with a second: the next re-plan gives up an epoch instead (it used to
    trade a final-size epoch for a small one at every epoch: 15 + 4 where 0.65 of 19 says 12 + 7)."""
    epoch_s = {96: 100.0, 128: 130.0}
    # 12 epochs done, all small: 19 as 12 + 7 (0.65 of 19, rounded) need 910 s more, as 13 + 6 880 s.
    assert budget.fit_epochs(890.0, epoch_s, (96, 128), 0.65, (12, 12)) == (19, 13)
    # The 13th ran 10 s slow: 19 epochs would need a 14th small one (14 + 5); the plan drops to 18.
    assert budget.fit_epochs(770.0, epoch_s, (96, 128), 0.65, (13, 13)) == (18, 13)


@pytest.mark.parametrize("seconds_after,run_eta", [(100.0, "10:00"), (1000.0, "17:50")])
def test_a_budgeted_epoch_line_counts_the_plan_left_and_the_run_to_its_budget(seconds_after, run_eta):
    """After epoch 1 of 5 (2 early at 48 px, 10 s; 3 at 64 px, 20 s): 70 s left for the architecture.
    The run ends at its budget (600 s away) unless what follows is predicted to run past it.  (The
    pace of the epochs so far said 4 x 90 s here, and later architectures' epochs at ResNet18's pace.)"""
    cfg = budgeted_loop_cfg(deadline_in=100.0, epochs=5, early=2)
    now = time.time()
    cfg["run_clock"] = {"started": now - 300, "arch_started": now - 90, "epochs_done": 0, "epochs_after": 9}
    cfg["run_clock"].update(budget_end=now + 600, seconds_after=seconds_after)
    metrics = {"epoch": 1, "train_loss": 0.5, "val_acc": 0.8, "val_log_loss": 0.4, "images_per_s": 50.0}
    line = training.epoch_line(cfg, metrics, {"started": now - 90, "epochs_before": 0})
    assert line.endswith(f"| elapsed 1:30 ETA 1:10 (sequential_cnn) {run_eta} (run)"), line


def test_measure_speed_times_each_size_and_validation():
    speed = measure_speed("sequential_cnn", [24, 32], 32, {"batch_size": 8, "amp": False, "use_gpu": False})
    assert set(speed["train"]) == {24, 32} and speed["precision"] == "fp32" and "bf16_speedup" not in speed
    assert all(0 < s < 1 for s in speed["train"].values()) and 0 < speed["val"] < 1


CNN_LOOP = {"arch": "sequential_cnn", "image_size": 32, "early_image_size": 24}


@pytest.mark.parametrize("bf16_seconds,trains_in_bf16", [(0.5, True), (0.97, False), (2.0, False)])
def test_a_fixed_epoch_cpu_run_trains_in_the_faster_precision_and_a_near_tie_in_fp32(
    monkeypatch, capsys, bf16_seconds, trains_in_bf16
):
    """Training steps at the largest size, fp32 and bf16 alternated twice after a warm-up each (the
    steps real, the seconds scripted); each one's fastest call counts; bf16 only by 1.05x or more."""
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: True)
    timed = []

    def scripted_timed_call(fn, x, **options):
        fn(x)
        timed.append((fn.keywords["amp"], x.shape[-1], options["warmup"]))
        slowed = 3.0 if len(timed) == 1 else 1.0  # another process took the first call's cores
        return slowed * {True: bf16_seconds, False: 1.0}[fn.keywords["amp"]]

    monkeypatch.setattr(training, "timed_call", scripted_timed_call)
    assert pick_train_precision(CNN_LOOP, torch.device("cpu"), rank=0) == (trains_in_bf16, 1 / bf16_seconds)
    assert timed == [(False, 32, 1), (True, 32, 1), (False, 32, 0), (True, 32, 0)]
    precision = "bf16" if trains_in_bf16 else "fp32"
    line = f"sequential_cnn: training in {precision}: bf16 ran {1 / bf16_seconds:.2f}x as fast as fp32 on this CPU"
    assert line in capsys.readouterr().out


def test_a_cpu_without_bf16_instructions_trains_fp32_untimed(monkeypatch, capsys):
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(training, "timed_call", lambda *_, **__: pytest.fail("timed on a CPU without bf16"))
    assert pick_train_precision(CNN_LOOP, torch.device("cpu"), rank=0) == (False, None)
    assert "training in" not in capsys.readouterr().out


def test_on_this_cpu_a_fixed_epoch_run_keeps_bf16_only_where_it_measured_faster(capsys):
    """Nothing scripted: this machine's own timing (either answer passes; the line must match it)."""
    amp, speedup = pick_train_precision(CNN_LOOP, torch.device("cpu"), rank=0)
    out = capsys.readouterr().out
    if training.cpu_has_fast_bf16():
        assert amp is (speedup >= training.BF16_MIN_SPEEDUP) and speedup > 0
        assert f"training in {'bf16' if amp else 'fp32'}: bf16 ran {speedup:.2f}x" in out
    else:
        assert (amp, speedup) == (False, None) and "training in" not in out


@pytest.mark.parametrize("bf16_seconds,trains_in_bf16", [(0.5, True), (2.0, False)])
def test_measure_speed_trains_in_whichever_precision_steps_faster(monkeypatch, bf16_seconds, trains_in_bf16):
    """With amp on a CPU with bf16 instructions, bf16 and fp32 are both timed at the largest size,
    and every later figure is taken in the faster one (the seconds are scripted, the steps real)."""
    monkeypatch.setattr(training, "cpu_has_fast_bf16", lambda: True)
    timed = []

    def scripted_timed_call(fn, x, **_):
        fn(x)  # the real step, so the precision it ran in can be checked
        amp = fn.keywords["amp"] if hasattr(fn, "keywords") else None  # the validation pass is the model itself
        timed.append((amp, x.shape[-1], torch.is_autocast_enabled("cpu")))
        return {True: bf16_seconds, False: 1.0, None: 0.1}[amp]

    monkeypatch.setattr(training, "timed_call", scripted_timed_call)
    speed = measure_speed("sequential_cnn", [24, 32], 32, {"batch_size": 8, "amp": True, "use_gpu": False})
    assert speed["amp"] is trains_in_bf16 and speed["bf16_speedup"] == pytest.approx(1 / bf16_seconds)
    assert speed["precision"] == ("bf16" if trains_in_bf16 else "fp32")
    assert timed[:2] == [(False, 32, False), (True, 32, False)]  # the comparison, at the largest size
    assert timed[2:3] == [(trains_in_bf16, 24, False)]  # the other size in the winner; 32 px is not timed again
    assert speed["train"][32] == pytest.approx(min(bf16_seconds, 1.0) / 8)
    assert timed[3:] == [(None, 32, trains_in_bf16)]  # validation autocasts only when training does


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["train.time_budget_minutes=10", "models=[{arch: resnet18, epochs: 3}]"],
            "models.0.epochs: train.time_budget_minutes sizes the epochs; "
            "set early_fraction instead, or drop the budget",
        ),
        (
            ["train.time_budget_minutes=10", "models=[{arch: resnet18, early_image_size: 64}]"],
            "models.0: early_image_size and early_fraction go together under a time budget",
        ),
        (
            ["models=[{arch: resnet18, early_fraction: 0.5, early_image_size: 64}]"],
            "models.0.early_fraction: only applies with train.time_budget_minutes",
        ),
        (
            ["models=[{arch: resnet18, budget_share: 2}]"],
            "models.0.budget_share: only applies with train.time_budget_minutes",
        ),
        (
            ["models=[{arch: resnet18, smaller_sizes: [[64]], min_epochs: 4}]"],
            "models.0.min_epochs: only applies with train.time_budget_minutes",
        ),
        (
            ["train.time_budget_minutes=10", "models=[{arch: resnet18, smaller_sizes: [[64]]}]"],
            "models.0: smaller_sizes and min_epochs go together",
        ),
        (
            [
                "train.time_budget_minutes=10",
                "models=[{arch: resnet18, image_size: 96, smaller_sizes: [[48, 64]], min_epochs: 4}]",
            ],
            "models.0.smaller_sizes.0: expected [image_size], as the sizes above it (got [48, 64])",
        ),
        (
            [
                "train.time_budget_minutes=10",
                "models=[{arch: resnet18, image_size: 96, early_image_size: 64, early_fraction: 0.5, "
                "smaller_sizes: [[48, 80], [48, 80]], min_epochs: 4}]",
            ],
            "models.0.smaller_sizes.1: image_size 80 must be below the size before it (80)",
        ),
        (
            [
                "train.time_budget_minutes=10",
                "models=[{arch: resnet18, image_size: 96, early_image_size: 64, early_fraction: 0.5, "
                "smaller_sizes: [[64, 48]], min_epochs: 4}]",
            ],
            "models.0.smaller_sizes.0: early_image_size 64 must be below its image_size 48",
        ),
    ],
)
def test_budget_config_rules(tmp_path, overrides, expected):
    from catdog.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("run_name: t\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert str(error.value) == f"{path}: {expected}"


@pytest.mark.parametrize("minutes,warns", [(1, True), (30, False)])
def test_a_budget_too_short_for_one_epoch_each_says_so_and_records_the_predicted_run(
    tmp_path, monkeypatch, caplog, minutes, warns
):
    """The least plan (one epoch per architecture) still trains, but never silently over the budget."""
    from catdog import train_job
    from catdog.data import Split
    from catdog.storage import Storage

    speed = {"amp": False, "precision": "fp32", "train": {64: 0.01}, "val": 0.002}
    monkeypatch.setattr(
        train_job, "measure_speeds_on_a_worker", lambda cfg: {a: speed for a in ("resnet18", "mobilenet_v2")}
    )
    overrides = {"models": "[resnet18, mobilenet_v2]", "train.time_budget_minutes": minutes, "train.report": True}
    cfg = load_config(REPO / "configs" / "quick.yaml", quick_overrides(tmp_path, tmp_path, "short", **overrides))
    rows = [{"path": f"{tmp_path}/cat.{i}.jpg", "label": 0} for i in range(1000)]
    (tmp_path / "short").mkdir()
    with caplog.at_level("WARNING", logger="catdog.train_job"):
        run_budget = train_job.plan_budget(cfg, Split(train=rows, val=rows[:250]), Storage(), time.time())
    predicted = run_budget.record["predicted_minutes"]
    # 2 x (45 s start + 1000 x 0.01 / 0.8 + 3 s) and the study's 2 x 8 s: 2.0 min at least
    assert (predicted > minutes) == warns and predicted >= 2.0
    assert json.loads((tmp_path / "short" / "plan.json").read_text())["predicted_minutes"] == predicted
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if warns:
        assert all(plan["planned_epochs"] == 1 for plan in run_budget.record["archs"].values())
        assert warnings == [
            f"time budget {minutes:.1f} min is too short for this run: even one epoch per architecture is "
            f"predicted to take {predicted:.1f} min with the measuring, the validation study and each "
            "architecture's start (about 45 s); training that anyway. Raise train.time_budget_minutes, "
            "or train fewer models or images"
        ]
    else:
        assert warnings == [] and run_budget.record["archs"]["resnet18"]["planned_epochs"] > 1


LADDER = (
    "[{arch: resnet18, image_size: 64, early_image_size: 48, early_fraction: 0.5, "
    "smaller_sizes: [[32, 48]], min_epochs: 6}]"
)


def ladder_budget(tmp_path, monkeypatch, seconds_per_image: float):
    """plan_budget for a 10-minute run of ResNet18 with one smaller rung, at a stubbed speed."""
    from catdog import train_job
    from catdog.data import Split
    from catdog.storage import Storage

    speed = {"amp": False, "precision": "fp32", "val": seconds_per_image / 3}
    speed["train"] = {size: seconds_per_image * (size / 64) ** 2 for size in (32, 48, 64)}
    monkeypatch.setattr(train_job, "measure_speeds_on_a_worker", lambda cfg: {"resnet18": speed})
    overrides = {"models": LADDER, "train.time_budget_minutes": 10}
    cfg = load_config(REPO / "configs" / "quick.yaml", quick_overrides(tmp_path, tmp_path, "ladder", **overrides))
    rows = [{"path": f"{tmp_path}/cat.{i}.jpg", "label": 0} for i in range(1000)]
    (tmp_path / "ladder").mkdir(exist_ok=True)
    run_budget = train_job.plan_budget(cfg, Split(train=rows, val=rows[:250]), Storage(), time.time())
    return cfg, run_budget


@pytest.mark.parametrize("seconds_per_image,sizes", [(0.005, (48, 64)), (0.15, (32, 48))])
def test_a_budget_trains_at_smaller_sizes_where_min_epochs_do_not_fit(
    tmp_path, monkeypatch, caplog, seconds_per_image, sizes
):
    """Fast: 6 epochs fit at 48>64 px and the model keeps its sizes.  Slow (about 160 s an epoch at
    64 px, 90 at 48): they do not, and it trains, validates and is checkpointed at 32>48, as plan.json, the
    log and the run's config.yaml say; a rerun keeps those sizes whatever it measures."""
    from catdog.storage import Storage
    from catdog.train_job import loop_config, with_recorded_sizes

    with caplog.at_level("INFO", logger="catdog.train_job"):
        cfg, run_budget = ladder_budget(tmp_path, monkeypatch, seconds_per_image)
    planned = json.loads((tmp_path / "ladder" / "plan.json").read_text())["archs"]["resnet18"]
    assert (planned["early_image_size"], planned["image_size"]) == sizes
    assert planned["planned_epochs"] >= 6
    sized = run_budget.sized(cfg)
    loop = loop_config(sized, sized.models[0], Storage(), 800)
    assert (loop["early_image_size"], loop["image_size"]) == sizes  # what the Train worker trains and validates at
    assert loop["fingerprint"]["image_size"] == sizes[1]
    written = load_config(tmp_path / "ladder" / "config.yaml").models[0]
    assert (written.early_image_size, written.image_size, written.smaller_sizes) == (*sizes, [])
    chose_smaller = "resnet18: fewer than min_epochs (6) fit at 48>64 px: training at 32>48 px" in caplog.text
    assert chose_smaller is (sizes == (32, 48))
    # The rerun: the configured ladder, resolved to the sizes recorded, with nothing left to choose.
    rerun = with_recorded_sizes(cfg, Storage()).models[0]
    assert (rerun.early_image_size, rerun.image_size, rerun.smaller_sizes, rerun.min_epochs) == (*sizes, [], None)


def test_sizes_chosen_afresh_must_still_be_those_a_trained_model_has(tmp_path, monkeypatch):
    """A run trained before plan.json recorded sizes: a rerun on a slower machine would choose 32>48,
    but its ResNet18 was trained at 48>64, so it stops naming the change instead of reusing it."""
    from catdog.config import ConfigError
    from catdog.train_job import run_fingerprint

    overrides = {"models": LADDER, "train.time_budget_minutes": 10}
    cfg = load_config(REPO / "configs" / "quick.yaml", quick_overrides(tmp_path, tmp_path, "ladder", **overrides))
    (tmp_path / "ladder" / "resnet18").mkdir(parents=True)
    result = {"epochs": 6, "fingerprint": run_fingerprint(cfg, cfg.models[0])}
    (tmp_path / "ladder" / "resnet18" / "result.json").write_text(json.dumps(result))
    with pytest.raises(ConfigError, match=r"resnet18: image_size 64 -> 48; resnet18: early_image_size 48 -> 32"):
        ladder_budget(tmp_path, monkeypatch, 0.15)
    ladder_budget(tmp_path, monkeypatch, 0.005)  # a machine where it keeps 48>64: reused as it is


def test_a_recorded_size_that_is_not_among_the_models_sizes_is_left_to_the_settings_check(tmp_path):
    from catdog.storage import Storage
    from catdog.train_job import with_recorded_sizes

    overrides = {"models": LADDER, "train.time_budget_minutes": 10}
    cfg = load_config(REPO / "configs" / "quick.yaml", quick_overrides(tmp_path, tmp_path, "ladder", **overrides))
    assert with_recorded_sizes(cfg, Storage()) == cfg  # no plan.json yet: nothing recorded
    (tmp_path / "ladder").mkdir()
    plan = {"archs": {"resnet18": {"image_size": 96, "early_image_size": 64}}}
    (tmp_path / "ladder" / "plan.json").write_text(json.dumps(plan))
    # 64>96 is none of 48>64 and 32>48: unchanged, so check_fingerprints names image_size if a model was trained.
    assert with_recorded_sizes(cfg, Storage()) == cfg


def test_local_config_is_budgeted_to_45_minutes():
    cfg = load_config(REPO / "configs" / "local.yaml")
    assert cfg.train.time_budget_minutes == 45


# Seconds per image that make train's speed measurement recorded in plan.json (fp32; train steps by
# size, a validation forward pass at the model's size): the 2-core AMD EPYC without AVX-512, run rung48
# of 2026-12-07 (bench/NOTES.md).
EPYC_ZEN3_SPEEDS = {
    "resnet18": {"train": {48: 0.00619, 64: 0.00840, 96: 0.01651, 128: 0.02741}, "val": 0.00765},
    "mobilenet_v2": {"train": {64: 0.00401}, "val": 0.00067},
    "sequential_cnn": {"train": {48: 0.00599, 64: 0.01152}, "val": 0.00353},
}


@pytest.mark.parametrize(
    "speedup,sizes",
    # 1: the EPYC as measured; 2.5: ResNet18 about as fast as in bf16 on the Xeon with AMX (model 167:
    # 6.4 ms an image at 96 px and 8.9 at 128 against 16.5 and 27.4 here), where it fitted 14 epochs.
    [(1.0, (48, 64)), (2.5, (96, 128))],
)
def test_local_config_steps_resnet18_down_only_where_12_epochs_do_not_fit(tmp_path, monkeypatch, speedup, sizes):
    """configs/local.yaml's ladder with make train's recorded speeds: the EPYC trains ResNet18 at 48>64
    px (9 epochs fit at 64>96), a machine 2.5x as fast keeps 96>128."""
    from catdog import train_job
    from catdog.data import Split
    from catdog.storage import Storage

    speeds = {
        arch: {
            "amp": False,
            "precision": "fp32",
            "val": speed["val"] / speedup,
            "train": {size: s / speedup for size, s in speed["train"].items()},
        }
        for arch, speed in EPYC_ZEN3_SPEEDS.items()
    }
    monkeypatch.setattr(train_job, "measure_speeds_on_a_worker", lambda cfg: speeds)
    sets = {"storage.root": str(tmp_path), "run_name": "local"}
    cfg = load_config(REPO / "configs" / "local.yaml", [f"{k}={v}" for k, v in sets.items()])
    rows = [{"path": f"{tmp_path}/cat.{i}.jpg", "label": 0} for i in range(16000)]
    (tmp_path / "local").mkdir()
    run_budget = train_job.plan_budget(cfg, Split(train=rows[:12800], val=rows[12800:]), Storage(), time.time())
    planned = run_budget.record["archs"]["resnet18"]
    assert (planned["early_image_size"], planned["image_size"]) == sizes
    assert planned["planned_epochs"] >= 12
    assert run_budget.record["predicted_minutes"] <= 45


@pytest.mark.slow
@pytest.mark.serial
def test_three_minute_budget_ends_inside_it_and_says_what_the_model_got(small_real_data, tmp_path, ray_session):
    """Measuring, progressive resizing, re-planning and the validation study, all inside 3 minutes.
    (One architecture: on 2 cores each costs 35-60 s before its first epoch; sharing between
    several is covered by test_plan_run_shares_the_time_and_fits_it.)"""
    models = "[{arch: sequential_cnn, early_image_size: 24, early_fraction: 0.5}]"
    overrides = {"models": models, "train.time_budget_minutes": 3, "train.report": True, "data.image_size": 32}
    overrides["train.amp"] = True  # the plan times bf16 against fp32 where the CPU has the instructions
    cfg = load_config(
        REPO / "configs" / "quick.yaml", quick_overrides(small_real_data, tmp_path, "budget", **overrides)
    )
    started = time.time()
    best_uri = run_training(cfg)
    elapsed = time.time() - started
    assert elapsed <= 180, f"a 3-minute budget took {elapsed:.0f} s"
    run = tmp_path / "budget"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["budget_minutes"] == 3 and plan["actual_minutes"] <= 3 and plan["predicted_minutes"] <= 3
    assert elapsed >= 0.6 * 180, f"a 3-minute budget left {180 - elapsed:.0f} s unused"
    cnn = plan["archs"]["sequential_cnn"]
    assert cnn["image_sizes"] == "24>32" and cnn["epochs"] >= 3
    assert 0 < cnn["actual_minutes"] <= cnn["allotted_minutes"] + 0.1
    assert plan["study"]["actual_minutes"] > 0 and plan["study"]["predicted_minutes"] > 0
    rows = list(csv.DictReader((run / "sequential_cnn" / "metrics.csv").open()))
    sizes = [int(r["train_image_size"]) for r in rows]
    assert len(rows) == cnn["epochs"] and sizes == sorted(sizes) and sizes[0] == 24 and sizes[-1] == 32
    assert all(float(r["epoch_seconds"]) >= float(r["train_seconds"]) for r in rows)
    board = next(csv.DictReader((run / "leaderboard.csv").open()))
    assert board["image_sizes"] == "24>32" and float(board["budget_minutes"]) == cnn["allotted_minutes"] > 0
    with open(best_uri) as handle:
        best = json.load(handle)
    assert best["plan"]["budget_minutes"] == 3
    # The precision measured faster is the one the worker trained in (its checkpoint's plan says).
    speed = plan["seconds_per_image"]["sequential_cnn"]
    meta = json.loads((Path(best["checkpoint"]) / "meta.json").read_text())
    assert meta["plan"]["amp"] is speed["amp"]
    assert cnn["precision"].startswith("bf16" if speed["amp"] and training.cpu_has_fast_bf16() else "fp32")
    assert ("bf16_speedup" in speed) is training.cpu_has_fast_bf16()  # the test asks for amp
    assert "# Time budget plan" in (run / "config.yaml").read_text()
    assert load_config(run / "config.yaml").train.time_budget_minutes == 3  # still a loadable config
    assert "Time budget: 3" in (run / "report.html").read_text()
