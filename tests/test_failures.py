"""shapes/failures.py and evaluate.py's failure report: blank chunks, videos lost for good, the
seed option and the confidence interval, on hand-made score tables."""

import csv
import math

import pytest

import evaluate
from shapes.failures import Blanks, failure_rows, failure_table, horizons, read_scores, wilson_interval


def fed(found: list[float]) -> Blanks:
    video = Blanks()
    for value in found:
        video.add(value)
    return video


def test_a_blank_stretch_that_comes_back_one_that_does_not_and_one_never_found():
    back = fed([1, 1, 0, 0, 0.25, 1, 1, 1])          # blank at 3 and 4, found again at 5
    gone = fed([1, 0, 1, 1, 0, 0, 0, 0])             # a slip at 2, then blank from 5 to the end
    never = fed([0] * 8)                             # no shape in any chunk
    fine = fed([1, 0.5, 1, 1, 1, 1, 1, 0.25])
    assert (back.first_blank, back.blank_from) == (3, None)
    assert (gone.first_blank, gone.blank_from) == (2, 5)
    assert (never.first_blank, never.blank_from) == (1, 1)
    assert (fine.first_blank, fine.blank_from) == (None, None)

    rows = failure_rows([back, gone, never, fine], alive={8: 2})
    assert [row["chunks"] for row in rows] == [8]
    row = rows[0]
    assert (row["videos"], row["went_blank"], row["lost_for_good"], row["survival"]) == (4, 0.75, 0.5, 0.5)
    assert row["lost_for_good_interval"] == pytest.approx(list(wilson_interval(2, 4)))


def test_horizons_are_30_100_1000_and_the_last_chunk():
    assert horizons(8) == [8]
    assert horizons(100) == [30, 100]
    assert horizons(1500) == [30, 100, 1000, 1500]
    going = fed([1] * 40 + [0] * 60)                  # lost for good from chunk 41
    rows = failure_rows([going, fed([1] * 100)])
    assert [(row["chunks"], row["went_blank"], row["lost_for_good"]) for row in rows] == [(30, 0, 0), (100, 0.5, 0.5)]


def test_the_wilson_interval_against_a_hand_computation():
    # 8 of 10, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.7167402, half-width
    # z / (1 + z^2/10) * sqrt(0.8 * 0.2 / 10 + z^2 / 400) = 0.2265777: about 0.49 to 0.94.
    assert wilson_interval(8, 10) == pytest.approx((0.7167402 - 0.2265777, 0.7167402 + 0.2265777), abs=2e-7)
    low, high = wilson_interval(0, 50)               # none of 50: the upper end is z^2 / (50 + z^2)
    assert low == 0 and high == pytest.approx(1.959964**2 / (50 + 1.959964**2), abs=1e-9)
    assert all(math.isnan(value) for value in wilson_interval(0, 0))


def test_the_seed_option_takes_a_count_a_range_and_a_list():
    assert evaluate.seed_list("3") == [0, 1, 2]
    assert evaluate.seed_list("1000-1003") == [1000, 1001, 1002, 1003]
    assert evaluate.seed_list("11,12") == [11, 12]
    assert evaluate.seed_list("7,11-13,7") == [7, 11, 12, 13]
    for bad in ("0", "-1", "a", "5-3", "1e12", "", "0-200000", "3,"):
        with pytest.raises(ValueError, match="--seeds"):
            evaluate.seed_list(bad)


def write_scores(path, videos: dict[tuple[str, int], list[float]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, ["prompt", "seed", "chunk", "found", "alive"])
        writer.writeheader()
        for (prompt, seed), found in videos.items():
            writer.writerows({"prompt": prompt, "seed": seed, "chunk": index + 1, "found": value, "alive": int(value > 0)}
                             for index, value in enumerate(found))


def test_failures_reads_scores_files_and_refuses_what_is_not_one(tmp_path, capsys):
    scores = tmp_path / "s.csv"
    write_scores(scores, {("a red circle moving left", 0): [1, 0, 0], ("a red circle moving left", 1): [1, 1, 1]})
    videos, alive = read_scores(scores)
    assert {key: (video.first_blank, video.blank_from) for key, video in videos.items()} == {
        ("a red circle moving left", 0): (2, 2), ("a red circle moving left", 1): (None, None)}
    assert alive == {1: 2, 2: 1, 3: 1}
    tables = evaluate.main(["--failures", str(scores)])
    assert tables[str(scores)][0]["lost_for_good"] == 0.5
    assert "| 3 | 2 | 0.500 (0.09-0.91) | 0.500 (0.09-0.91) | 0.500 (0.09-0.91) |" in capsys.readouterr().out

    write_scores(scores, {("a red circle moving left", 0): [1, 0, 0]})
    with open(scores) as file:
        rows = file.read().splitlines()
    (tmp_path / "skipped.csv").write_text("\n".join(rows[:2] + rows[3:]) + "\n")  # chunk 3 right after chunk 1
    (tmp_path / "curves.csv").write_text("chunk,videos,survival\n1,2,1.0\n")
    for name in ("skipped.csv", "curves.csv", "missing.csv"):
        with pytest.raises(ValueError, match=f"--failures .*{name}: not a scores file"):
            read_scores(tmp_path / name)
    with pytest.raises(ValueError, match="--scores .* is --failures"):
        evaluate.main(["--failures", str(scores), "--scores", str(scores), "--overwrite"])


def test_failures_refuses_what_it_cannot_read_and_the_options_it_would_ignore(tmp_path):
    scores = tmp_path / "s.csv"
    write_scores(scores, {("a red circle moving left", 0): [1, 0.5, 0]})
    good = scores.read_text()
    for damaged in (good.replace(",0,1,1,1", ",0,1,1,5"),             # alive 5
                    good.replace(",0,1,1,1", ",٣,1,1,1"),             # a seed in other digits
                    good.replace("0.5", "1.5"),                       # found above 1
                    good + "x" * 200_000 + "\n"):                     # a field past csv's limit
        scores.write_text(damaged)
        with pytest.raises(ValueError, match="--failures .*s.csv: not a scores file"):
            read_scores(scores)
    scores.write_text(good)
    for extra in (["--survival-window", "5"], ["--seeds", "3"], ["--ground-truth"], ["--compare", "a=b.csv"],
                  ["--scheduler", "euler"], ["--chunks", "7"]):
        with pytest.raises(ValueError, match="makes no video and would ignore --"):
            evaluate.main(["--failures", str(scores), *extra])


def test_seeds_are_ascii_digits_below_2_to_the_63():
    for bad in ("٣", "²", "1-²", str(2**63), f"0-{2**64}"):
        with pytest.raises(ValueError, match="--seeds"):
            evaluate.seed_list(bad)
    assert evaluate.seed_list(str(2**63 - 1) + "-" + str(2**63 - 1)) == [2**63 - 1]
