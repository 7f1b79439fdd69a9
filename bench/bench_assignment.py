"""How long ``assign`` takes for 1,000 teachers x 10,000 students, and how many pairs one change moves.

Run: ``python bench/bench_assignment.py [--teachers 1000] [--students 10000] [--runs 5]``.
Times are the median of ``--runs`` runs; maxima are 1..4, drawn with a fixed seed.  A second,
split-regime case (fewer students than teachers, maxima 1..8) follows.
A pair is ``(student, teacher)``; "moved" counts pairs dropped (other than those of a
teacher that left) and pairs added.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from zdistill.discovery.assignment import assign


def pairs(result: dict[str, list[str]]) -> set[tuple[str, str]]:
    return {(sid, teacher) for sid, got in result.items() for teacher in got}


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scenario(n_teachers: int, n_students: int, most: int, runs: int, seed: int = 42) -> None:
    rng = random.Random(seed)
    teachers = [f"10.{i // 250}.{i % 250}.1:7000" for i in range(n_teachers + 1)]
    joiner, teachers = teachers[-1], teachers[:-1]
    students = {f"student-{i:05d}": rng.randint(1, most) for i in range(n_students)}
    print(f"{n_teachers} teachers x {n_students} students, max teachers per student 1..{most} (seed {seed})")

    base = assign(teachers, students)
    cold = median_time(lambda: assign(teachers, students), runs)
    warm = median_time(lambda: assign(teachers, students, base), runs)
    print(f"  assign, no previous:          {cold * 1e3:8.1f} ms (median of {runs})")
    print(f"  assign, previous = result:    {warm * 1e3:8.1f} ms (median of {runs})")
    before = pairs(base)
    print(f"  pairs: {len(before)}")

    joined = pairs(assign([*teachers, joiner], students, base))
    print(f"  one teacher joins:  {len(before - joined):5d} pairs dropped, {len(joined - before):5d} added")

    middle = sorted(students)[len(students) // 2]
    leaver = base[middle][0]  # a teacher that is in use
    left = pairs(assign([t for t in teachers if t != leaver], students, base))
    orphaned = {pair for pair in before if pair[1] == leaver}
    print(
        f"  one teacher leaves: {len(orphaned):5d} pairs lost with it, "
        f"{len(before - left - orphaned):5d} others dropped, {len(left - before):5d} added"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", type=int, default=1000)
    parser.add_argument("--students", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    scenario(args.teachers, args.students, 4, args.runs)  # shared regime: teachers <= students
    # Split regime (teachers > students), with maxima high enough that every teacher is used.
    scenario(args.teachers, args.teachers // 4, 8, args.runs)


if __name__ == "__main__":
    main()
