"""Which teachers of one service each student uses: the balancer's pure assignment rule.

No sockets, no Redis, no clock: ``assign(teachers, students, previous)`` takes the
current members and the last published assignment and returns the next one, so the
balancer can be restarted from Redis and the rule can be tested on its own.

What is shared, and what "fair" means
-------------------------------------
A teacher is a GPU behind a dynamic batcher: its throughput is the scarce thing, and
a student with ``k`` teachers gets roughly ``sum(1 / load)`` of a teacher.  Asking for
``max`` teachers is a student's ceiling, not a right: more teachers than its fair
share would only take throughput from the other students.  Two regimes follow, and
they meet at ``teachers == students`` (one teacher each), so a join or a leave across
the boundary still moves at most one pair.

* ``teachers <= students``: teachers are *shared*; every student gets exactly one.
  Loads are ``S // T`` or ``S // T + 1``, so every student gets the same share of a
  teacher (give or take one co-tenant) whatever its maximum.  A second teacher for
  some students would raise their share at the others' cost, and no student is left
  without a teacher while one exists.
* ``teachers > students``: teachers are *split*; each teacher serves at most one
  student (load 0 or 1) and the students' counts are water-filled: each student gets
  ``min(max, L)`` or ``L + 1`` teachers, for the highest level ``L`` the teachers
  allow, the ``+1`` going to as many students with room as there are teachers left
  over.  Every teacher is used whenever the maxima (capped at the number of
  teachers) add up to at least the number of teachers; otherwise every student gets
  its full maximum and the rest idle.  Exclusive teachers keep students from
  contending on one batcher, and a student's extra teacher is always one nobody
  else could use.  (EDL gave each student ``max(1, T // S)`` and left the remainder
  idle; water-filling uses it.)

In both regimes loads differ by at most one, no student exceeds its maximum, and no
student holds the same teacher twice.

Stability: move only what balance forces
----------------------------------------
``previous`` (student -> teachers it had) is kept wherever the targets allow, and
every free choice of the targets is steered towards what already exists:

* the ``+1`` load slots of the shared regime go to the teachers that already carry
  the most students, so a teacher that is already at ``S // T + 1`` keeps its
  students;
* the ``+1`` teacher of the split regime goes to students that already hold
  ``L + 1`` of their teachers;
* only then are previous pairs cut to the targets, and only the gaps are filled.

For one join or leave applied to a result of ``assign`` this moves the minimum
(``tests/test_assignment.py`` checks each bound):

* a teacher joins: only pairs to the new teacher are added; ``S // (T + 1)`` pairs
  move to it in the shared regime (the fewest that lets it reach the lower load),
  none are removed in the split regime;
* a teacher leaves: its pairs move, plus at most one more pair (the one student
  that must give up its ``+1`` so the bereaved student gets back to its level);
* a student joins: only the newcomer's pairs are added, and the other students lose
  at most as many pairs as the newcomer gets;
* a student leaves: at most one other pair moves;
* ``assign(t, s, assign(t, s, p)) == assign(t, s, p)``: a balanced input is kept.

For an arbitrary ``previous`` (several changes at once, a stale record) the result
is still valid and balanced; keeping previous pairs is then greedy, not optimal.

Determinism: the result depends on the sets only, never on input order or dict
order.  Teachers and students are sorted, ties go to the smaller address or id, and
each student's list is sorted.  There is no randomness.

Cost: ``O(P log P)`` for ``P`` pairs (sorting dominates); no loop over
teachers x students.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate

__all__ = ["assign"]


def assign(
    teachers: Sequence[str],
    students: Mapping[str, int],
    previous: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Return ``student id -> sorted teacher addresses`` for one service.

    ``teachers`` are the live teacher addresses (duplicates are ignored), ``students``
    maps each live student to the most teachers it wants (``>= 1``), and ``previous``
    is the last assignment: its pairs to teachers or students that are gone, and
    repeated teachers, are ignored.  Every student in ``students`` is a key of the
    result, with an empty list when there is no teacher.  See the module docstring for
    the balancing and stability rules.

    Raises ``ValueError`` when a maximum is below 1: such a record is a bug upstream
    (the register path validates it), and silently clamping it would hide that.
    """
    for sid, most in students.items():
        if most < 1:
            raise ValueError(f"student {sid!r} wants at most {most!r} teachers; it must want at least 1")
    pool = sorted(set(teachers))
    ids = sorted(students)
    if not pool:
        return {sid: [] for sid in ids}
    if not ids:
        return {}
    cands = _candidates(ids, set(pool), previous or {})
    if len(pool) <= len(ids):
        one = _share(pool, ids, cands)
        return {sid: [one[sid]] for sid in ids}
    return _split(pool, ids, students, cands)


def _candidates(ids: list[str], live: set[str], previous: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Each student's previous teachers that are still live, deduplicated and sorted.

    Sorting here is what makes the result independent of the order of ``previous``.
    Students without any are left out (read with ``.get(sid, ())``): at 100,000
    students, not allocating their empty lists is a visible share of the time.
    """
    cands: dict[str, list[str]] = {}
    for sid in ids:
        old = previous.get(sid)
        if old:
            kept = live.intersection(old)
            if kept:
                cands[sid] = sorted(kept)
    return cands


def _share(pool: list[str], ids: list[str], cands: dict[str, list[str]]) -> dict[str, str]:
    """Teachers <= students: one teacher per student (returned), loads ``S // T`` or ``S // T + 1``."""
    base, extra = divmod(len(ids), len(pool))
    firm = dict.fromkeys(pool, 0)  # students whose only live previous teacher this is
    loose = dict.fromkeys(pool, 0)  # students with several live previous teachers, this among them
    for cand in cands.values():
        if len(cand) == 1:
            firm[cand[0]] += 1
        else:
            for teacher in cand:
                loose[teacher] += 1
    # The ``extra`` teachers that may carry one more student are those already carrying
    # the most: they then keep all their students, and only the excess of others moves.
    ranked = sorted(pool, key=lambda t: (-firm[t], -loose[t], t))
    room = {teacher: base + (rank < extra) for rank, teacher in enumerate(ranked)}

    chosen: dict[str, str] = {}
    waiting: list[str] = []
    several: list[str] = []
    for sid in ids:  # students with one candidate first: they have no other way to stay put
        cand = cands.get(sid, ())
        if len(cand) == 1 and room[cand[0]] > 0:
            room[cand[0]] -= 1
            chosen[sid] = cand[0]
        elif len(cand) > 1:
            several.append(sid)
        else:
            waiting.append(sid)
    for sid in several:
        best = max(cands[sid], key=room.__getitem__)  # the emptiest; ties to the smaller address
        if room[best] > 0:
            room[best] -= 1
            chosen[sid] = best
        else:
            waiting.append(sid)

    waiting.sort()
    queue = iter(waiting)
    for teacher in pool:  # sum(room) == len(waiting): both count the students not yet placed
        for _ in range(room[teacher]):
            chosen[next(queue)] = teacher
    return chosen


def _split(
    pool: list[str], ids: list[str], maxima: Mapping[str, int], cands: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Teachers > students: each teacher to at most one student, counts water-filled; lists sorted."""
    # 1. A teacher that several students had (after a big change) stays with one of them:
    #    uncontested teachers first, then each contested one to the claimant with fewest.
    claimants: dict[str, list[str]] = {}
    for sid in ids:
        for teacher in cands.get(sid, ()):
            claimants.setdefault(teacher, []).append(sid)
    owned: dict[str, list[str]] = {sid: [] for sid in ids}
    contested: list[str] = []
    for teacher in sorted(claimants):
        holders = claimants[teacher]
        if len(holders) == 1:
            owned[holders[0]].append(teacher)
        else:
            contested.append(teacher)
    for teacher in contested:
        owner = min(claimants[teacher], key=lambda s: (len(owned[s]), s))
        owned[owner].append(teacher)

    # 2. Targets, steered towards what each student already holds.
    demand = {sid: min(maxima[sid], len(pool)) for sid in ids}
    quota = _water_fill(ids, demand, len(pool), {sid: len(owned[sid]) for sid in ids})

    # 3. Keep up to the quota, then hand the free teachers to the students short of it.
    chosen: dict[str, list[str]] = {}
    used: set[str] = set()
    for sid in ids:
        keep = sorted(owned[sid])[: quota[sid]]
        chosen[sid] = keep
        used.update(keep)
    free = iter([teacher for teacher in pool if teacher not in used])
    for sid in ids:  # the free teachers always suffice: sum(quota) <= len(pool)
        short = quota[sid] - len(chosen[sid])
        if short:
            chosen[sid] = sorted(chosen[sid] + [next(free) for _ in range(short)])
    return chosen


def _water_fill(ids: list[str], demand: dict[str, int], total: int, held: dict[str, int]) -> dict[str, int]:
    """Split ``total`` teachers: each student ``min(demand, L)`` or ``L + 1``, ``L`` as high as fits.

    The ``L + 1`` goes first to students that already hold ``L + 1`` teachers (then by
    id), so a balanced previous assignment keeps its extras.  Called only with fewer
    students than ``total``, so ``L >= 1``.
    """
    levels = sorted(demand.values())
    if sum(levels) <= total:
        return dict(demand)
    prefix = [0, *accumulate(levels)]

    def filled(level: int) -> int:
        below = bisect_right(levels, level)
        return prefix[below] + level * (len(levels) - below)

    low, high = 1, levels[-1]  # filled(low) == len(ids) <= total < filled(high) == sum(levels)
    while high - low > 1:
        mid = (low + high) // 2
        if filled(mid) <= total:
            low = mid
        else:
            high = mid
    spare = total - filled(low)  # < number of students with demand > low, since filled(low + 1) > total
    room = [sid for sid in ids if demand[sid] > low]
    room.sort(key=lambda s: (-min(held[s], low + 1), s))
    quota = {sid: min(demand[sid], low) for sid in ids}
    for sid in room[:spare]:
        quota[sid] = low + 1
    return quota
