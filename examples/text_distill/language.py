"""A generated language of product reviews whose label a bag of words cannot read: offline, seeded.

The example needs text whose labels depend on word *order*, so that a sequence teacher
knows something a bag-of-words student cannot learn from a few labels, and it must run
with no download.  So the text is made here, from a fixed vocabulary of 200 words:

* a review is 1 to 4 *clauses* joined by ``and`` or ``but``; a clause says something about
  a product part (``the battery was really good``) and carries one opinion word, positive
  (``good``, ``sturdy`` ...) or negative (``flimsy``, ``awful`` ...);
* ``not`` or ``never`` before the opinion word flips that clause's polarity, within the
  clause only (``the lid is not flimsy`` is positive);
* ``but`` contrasts: the clause after it has the opposite polarity of the one before,
  ``and`` keeps it;
* fillers (``honestly``, ``i think``, ``the``, ...) carry no opinion and may appear anywhere;
* the review's label is the polarity of its LAST clause (1 positive, 0 negative).

What a bag of words sees is which words occur, not where: ``good but not bad`` (positive:
the last clause is ``not bad``) and ``not good but bad`` (negative) have the same words, and
no linear function of word counts gets ``not`` right (a positive word scores up on its own
and down after ``not``: an exclusive or).  A recurrent model reading left to right can track
which clause is the last and whether ``not`` came before its opinion word.

Token id 0 is padding (:data:`PAD`); sentences are 1-D ``int64`` arrays of ids, 4 to 60 long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from mnist_parts import data as mnist_data

PAD = 0
POSITIVE = ("good great excellent superb lovely solid sturdy reliable perfect nice fantastic brilliant pleasant "
            "decent wonderful smooth handy impressive comfortable fast").split()
NEGATIVE = ("bad poor awful flimsy broken cheap terrible faulty horrible weak noisy clumsy slow disappointing "
            "useless fragile ugly annoying mediocre dreadful").split()
NEGATORS = ("not", "never")
AND, BUT = "and", "but"
NOUNS = ("battery screen price case cable charger lid handle button strap box manual motor lens speaker keyboard "
         "fan plug hinge sound colour finish grip display sensor switch wheel blade pump filter knob seal frame "
         "zipper pocket cover base stand light delivery").split()
DETERMINERS = ("the", "this", "my", "its")
VERBS = ("is", "was", "seems", "felt")
FILLERS = ("really quite very so honestly overall i think pretty rather just still also totally somewhat fairly "
           "truly definitely actually kind of sort bit little lot at all in on for with to from after first day "
           "week month use using bought got item product thing one which that when while we they you he she our "
           "their were are be been being has had have do did does maybe perhaps probably surely clearly simply "
           "mostly usually often always sometimes again even already too enough extra more less most well frankly "
           "anyway around since about then here there okay oh wow hmm lately recently initially basically generally "
           "personally").split()
VOCAB: tuple[str, ...] = ("<pad>", *POSITIVE, *NEGATIVE, *NEGATORS, AND, BUT, *NOUNS, *DETERMINERS, *VERBS, *FILLERS)
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
assert len(WORD_ID) == len(VOCAB) == 200, "every word once, 200 in all (with <pad>)"

MIN_LENGTH, MAX_LENGTH = 4, 60


def _ids(words: Sequence[str]) -> np.ndarray:
    return np.array([WORD_ID[w] for w in words], dtype=np.int64)


POSITIVE_IDS, NEGATIVE_IDS, NEGATOR_IDS = _ids(POSITIVE), _ids(NEGATIVE), _ids(NEGATORS)
NOUN_IDS, FILLER_IDS = _ids(NOUNS), _ids(FILLERS)
AND_ID, BUT_ID = WORD_ID[AND], WORD_ID[BUT]
_POLARITY = np.zeros(len(VOCAB), dtype=np.int64)  # +1 positive opinion word, -1 negative, 0 anything else
_POLARITY[POSITIVE_IDS], _POLARITY[NEGATIVE_IDS] = 1, -1
_IS_NEGATOR = np.isin(np.arange(len(VOCAB)), NEGATOR_IDS)
_IS_FILLER = np.isin(np.arange(len(VOCAB)), FILLER_IDS)
_IS_NOUN = np.isin(np.arange(len(VOCAB)), NOUN_IDS)


def encode(text: str) -> np.ndarray:
    """``"the lid is not flimsy"`` -> int64 ids (KeyError on a word outside the vocabulary)."""
    return _ids(text.split())


def decode(ids: np.ndarray) -> str:
    return " ".join(VOCAB[i] for i in ids if i != PAD)


def label_of(ids: np.ndarray) -> int:
    """The rules: the last clause's polarity (its opinion word, flipped by a ``not``/``never`` in it); 1 = positive.

    Clauses end at ``and``/``but``; a clause's first opinion word counts.  ``ValueError``
    when the last clause has no opinion word (the generator never makes one).
    """
    ids = np.asarray(ids)
    breaks = np.flatnonzero((ids == AND_ID) | (ids == BUT_ID))
    last = ids[breaks[-1] + 1 :] if len(breaks) else ids
    opinions = np.flatnonzero(_POLARITY[last] != 0)
    if len(opinions) == 0:
        raise ValueError(f"the last clause of {decode(ids)!r} has no opinion word")
    polarity = _POLARITY[last[opinions[0]]] * (-1 if _IS_NEGATOR[last[: opinions[0]]].any() else 1)
    return int(polarity > 0)


@dataclass(frozen=True)
class Reviews:
    """Sentences (a list of 1-D int64 id arrays, different lengths) and their labels (int64, 1 = positive)."""

    sentences: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Reviews:
        return Reviews([self.sentences[i] for i in index], self.labels[index])

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.sentences), dtype=np.int64, count=len(self.sentences))


@dataclass(frozen=True)
class Grammar:
    """How reviews are drawn: clause counts, how often ``not`` and ``but`` occur, how many fillers."""

    clause_weights: tuple[float, ...] = (0.3, 0.35, 0.2, 0.15)  # 1, 2, 3, 4 clauses
    negation: float = 0.2  # of the clauses
    contrast: float = 0.25  # of the joins that are ``but`` (the rest ``and``)
    fillers: float = 1.2  # mean fillers per gap (Poisson), three gaps per clause

    def clause(self, polarity: int, rng: np.random.Generator) -> list[int]:
        """One clause of the given polarity: ``[fillers] the NOUN is [fillers] [not] OPINION [fillers]``."""

        def fill() -> list[int]:
            return list(rng.choice(FILLER_IDS, size=min(rng.poisson(self.fillers), 3)))

        negated = rng.random() < self.negation
        opinion = rng.choice(POSITIVE_IDS if (polarity > 0) != negated else NEGATIVE_IDS)
        return [*fill(), WORD_ID[rng.choice(DETERMINERS)], rng.choice(NOUN_IDS), WORD_ID[rng.choice(VERBS)], *fill(),
                *([rng.choice(NEGATOR_IDS)] if negated else []), opinion, *fill()]

    def review(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        clauses = 1 + rng.choice(len(self.clause_weights), p=np.asarray(self.clause_weights) / sum(self.clause_weights))
        polarity = 1 if rng.random() < 0.5 else -1
        words = self.clause(polarity, rng)
        for _ in range(clauses - 1):
            contrast = rng.random() < self.contrast
            polarity = -polarity if contrast else polarity
            words += [BUT_ID if contrast else AND_ID, *self.clause(polarity, rng)]
        return np.array(words, dtype=np.int64), int(polarity > 0)

    def reviews(self, n: int, seed: int) -> Reviews:
        """``n`` reviews, the same ones for the same ``seed``.

        A clause is 4 to 14 words and a review at most 4 clauses and 3 joins, so every
        review is 4 to 59 words long: none needs cutting.
        """
        rng = np.random.default_rng(seed)
        drawn = [self.review(rng) for _ in range(n)]
        return Reviews([ids for ids, _ in drawn], np.array([label for _, label in drawn], dtype=np.int64))


GRAMMAR = Grammar()


@dataclass(frozen=True)
class Augment:
    """Label-preserving rewrites, drawn afresh for every view of every review.

    Fillers carry no opinion, so deleting or inserting them keeps the label; swapping an
    opinion word for another of the same polarity, or a noun for another noun, keeps it too.
    Negators and connectors are never touched: they are what the label depends on.
    """

    delete: float = 0.3  # chance of each filler being dropped
    insert: float = 0.1  # chance of a filler being inserted before each word
    swap: float = 0.5  # chance of each opinion word or noun being swapped for one of its kind
    share: float = 0.8  # of the views rewritten (the rest are the plain reviews)

    def describe(self) -> str:
        return (f"{100 * self.share:g}% of the views rewritten: each filler dropped with p={self.delete:g}, a filler "
                f"inserted before each word with p={self.insert:g}, opinion words and nouns swapped for one of the "
                f"same kind with p={self.swap:g}")

    def view(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One rewritten view of one review (4..60 tokens, same label)."""
        if rng.random() >= self.share:
            return ids
        out = ids.copy()
        polarity = _POLARITY[out]
        swap = rng.random(len(out)) < self.swap
        for kind, pool in ((polarity > 0, POSITIVE_IDS), (polarity < 0, NEGATIVE_IDS), (_IS_NOUN[out], NOUN_IDS)):
            where = np.flatnonzero(kind & swap)
            out[where] = rng.choice(pool, size=len(where))
        keep = ~(_IS_FILLER[out] & (rng.random(len(out)) < self.delete))
        out = out[keep]
        inserted = np.flatnonzero(rng.random(len(out)) < self.insert)
        out = np.insert(out, inserted, rng.choice(FILLER_IDS, size=len(inserted)))
        return out[:MAX_LENGTH] if len(out) >= MIN_LENGTH and label_of(out[:MAX_LENGTH]) == label_of(ids) else ids

    def __call__(self, sentences: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        return [self.view(s, rng) for s in sentences]


AUGMENT = Augment()


def pad(sentences: Sequence[np.ndarray], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [rows, longest] int64 padded with PAD, lengths [rows] int64)``: what the teacher model takes."""
    lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
    width = int(lengths.max(initial=1)) if length is None else length
    out = np.full((len(sentences), width), PAD, dtype=np.int64)
    for i, s in enumerate(sentences):
        out[i, : len(s)] = s
    return out, lengths


def bag_of_words(sentences: Sequence[np.ndarray]) -> np.ndarray:
    """Word counts ``[rows, len(VOCAB)]`` (padding not counted): all a bag-of-words model sees."""
    counts = np.zeros((len(sentences), len(VOCAB)), dtype=np.int64)
    for i, s in enumerate(sentences):
        np.add.at(counts[i], s, 1)
    counts[:, PAD] = 0
    return counts


UNLABELED = -1  # the label of a training review whose label the student does not have


@dataclass(frozen=True)
class Corpus:
    """The example's data: reviews for the teacher, the student's training reviews and the test reviews.

    ``labeled`` indexes the student's training reviews whose labels it has; the rest it
    only reads, for the teacher to label.  The teacher's labeled reviews are separate
    (a teacher trained elsewhere, on more labels, as EDL's ERNIE was).
    """

    teacher_train: Reviews
    train: Reviews
    test: Reviews
    labeled: np.ndarray
    source: str

    @property
    def student_labels(self) -> np.ndarray:
        """The training labels as the student knows them: ``UNLABELED`` where it has none."""
        known = np.full_like(self.train.labels, UNLABELED)
        known[self.labeled] = self.train.labels[self.labeled]
        return known

    @property
    def student_train(self) -> Reviews:
        """Every training review with the label the student has for it (what the distilled student reads)."""
        return Reviews(self.train.sentences, self.student_labels)

    @property
    def labeled_train(self) -> Reviews:
        """The training reviews the student has labels for (what the student alone reads)."""
        return self.train.take(self.labeled)

    def describe(self) -> str:
        return (f"{self.source}: {len(self.teacher_train)} labeled reviews for the teacher, {len(self.train)} "
                f"training reviews for the student ({len(self.labeled)} labeled), {len(self.test)} test reviews")



def make_corpus(n_teacher: int = 4000, n_train: int = 5000, n_labeled: int = 200, n_test: int = 2000,
                seed: int = 0, grammar: Grammar = GRAMMAR) -> Corpus:
    """Draw the three sets from one seed (independent draws); the labeled part is class-balanced."""
    teacher_train = grammar.reviews(n_teacher, seed=10_000 + seed)
    train = grammar.reviews(n_train, seed=20_000 + seed)
    test = grammar.reviews(n_test, seed=30_000 + seed)
    rng = np.random.default_rng(seed)
    labeled = np.sort(np.concatenate([rng.choice(np.flatnonzero(train.labels == k), size=n_labeled // 2,
                                                 replace=False) for k in (0, 1)]))
    return Corpus(teacher_train, train, test, labeled, f"generated reviews (seed {seed}, vocabulary {len(VOCAB)})")


class ReviewReader(mnist_data.EpochReader):
    """An :class:`EpochReader` (the MNIST example's) of ``(ids, label)`` samples.

    ``ids`` is a 1-D int64 array of the review's own length (the slot whose samples differ
    in length), ``label`` int64 ``(1,)`` (``UNLABELED`` where the student has none).
    """

    def __init__(self, reviews: Reviews, batch_size: int, augment: Augment | None = None, seed: int = 0,
                 samples_per_epoch: int | None = None) -> None:
        if len(reviews) == 0:
            raise ValueError("a reader needs at least one review")
        self.reviews = reviews
        super().__init__(len(reviews), batch_size, augment=augment, seed=seed, samples_per_epoch=samples_per_epoch)

    def batch(self, idx: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        views = [self.reviews.sentences[i] for i in idx]
        if self.augment is not None:
            views = self.augment(views, rng)
        labels = self.reviews.labels
        return [(views[k], labels[i : i + 1]) for k, i in enumerate(idx)]
