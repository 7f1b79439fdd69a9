"""Smoke tests of ``examples/text_distill``: the generated language, the saved teacher, the demo on a tiny corpus.

The language's rules are checked against a second reading of them written here (on the
words, not the ids); the saved teacher against the trained network run review by review,
unpadded.  The served path (``zdistill-teacher`` + ``DistillReader`` with a slot whose
samples differ in length) is skipped until the reader carries such slots.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import sys
from types import ModuleType

import numpy as np
import pytest

from tests import procs
from tests.test_example import assert_gone, epoch_of_seven, final_bar_accuracies, run_demo

EXAMPLE = procs.REPO / "examples" / "text_distill"
HAVE_PADDLE = importlib.util.find_spec("paddle") is not None
HAVE_DEMO_DEPS = all(importlib.util.find_spec(m) is not None for m in ("tqdm", "matplotlib"))
needs_paddle = pytest.mark.skipif(not (HAVE_PADDLE and HAVE_DEMO_DEPS),
                                  reason="the example needs paddlepaddle, tqdm and matplotlib")
TINY = {"n_teacher": 400, "n_train": 96, "n_labeled": 16, "n_test": 64}


def example(name: str) -> ModuleType:
    """Import one of the example's modules (they import each other by plain name)."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    return __import__(name)


# -- the language, no Paddle needed --------------------------------------------------------


def rules(text: str) -> int:
    """The rules read off the words: the last clause's opinion, flipped by ``not``/``never`` before it; 1 = positive."""
    language = example("language")
    last = re.split(r"\b(?:and|but)\b", text)[-1].split()
    opinion = next(i for i, w in enumerate(last) if w in language.POSITIVE or w in language.NEGATIVE)
    negated = any(w in ("not", "never") for w in last[:opinion])
    return int((last[opinion] in language.POSITIVE) != negated)


def test_labels_follow_the_rules():
    language = example("language")
    for text, label in [("the lid is flimsy", 0), ("the lid is not flimsy", 1), ("my fan was never good", 0),
                        ("the lid is good but the case was bad", 0),
                        ("the lid is not good but the case was not bad", 1),
                        ("not good and bad but honestly the box is very nice", 1),
                        ("the box is nice and this strap was not so sturdy", 0)]:
        assert language.label_of(language.encode(text)) == label == rules(text), text
    reviews = language.GRAMMAR.reviews(3000, seed=5)
    assert len(reviews) == 3000 and reviews.labels.dtype == np.int64
    assert 0.4 < reviews.labels.mean() < 0.6
    for ids, label in zip(reviews.sentences, reviews.labels, strict=True):
        assert ids.dtype == np.int64 and ids.ndim == 1 and language.MIN_LENGTH <= len(ids) <= language.MAX_LENGTH
        assert language.PAD not in ids
        text = language.decode(ids)
        assert label == rules(text) == language.label_of(ids), text
        # "but" contrasts, "and" keeps: each clause's polarity against the one before
        clauses = re.split(r"\b(and|but)\b", text)
        for before, join, after in zip(clauses[0:-2:2], clauses[1::2], clauses[2::2], strict=True):
            assert (rules(before) != rules(after)) == (join == "but"), text
    lengths = reviews.lengths
    assert lengths.min() == language.MIN_LENGTH and lengths.max() > 40
    assert len(language.VOCAB) == 200 and len(set(language.VOCAB)) == 200 and language.VOCAB[0] == "<pad>"
    used = np.unique(np.concatenate(reviews.sentences))
    assert len(used) == 199, "every word but <pad> occurs"


def test_reviews_are_the_same_for_the_same_seed():
    language = example("language")
    a, b, c = (language.GRAMMAR.reviews(200, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a.sentences, b.sentences, strict=True))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert sum(np.array_equal(x, y) for x, y in zip(a.sentences, c.sentences, strict=True)) < 5
    corpus, again = language.make_corpus(seed=3, **TINY), language.make_corpus(seed=3, **TINY)
    np.testing.assert_array_equal(corpus.labeled, again.labeled)
    assert len(corpus.labeled) == 16 and corpus.train.labels[corpus.labeled].sum() == 8  # class-balanced
    assert (corpus.student_labels == language.UNLABELED).sum() == 96 - 16
    np.testing.assert_array_equal(corpus.student_labels[corpus.labeled], corpus.train.labels[corpus.labeled])


def swap_first_and_last_clause(ids: np.ndarray) -> np.ndarray:
    """The same words in another order: the first and the last clause trade places, the joins stay."""
    language = example("language")
    joins = np.flatnonzero((ids == language.AND_ID) | (ids == language.BUT_ID))
    clauses = np.split(ids, joins)  # every clause after the first starts with its join
    first, last = clauses[0], clauses[-1]
    return np.concatenate([last[1:], *clauses[1:-1], last[:1], first])


@needs_paddle
def test_a_bag_of_words_cannot_separate_reviews_with_the_same_words():
    import paddle

    language, text_models = example("language"), example("text_models")
    reviews = language.GRAMMAR.reviews(400, seed=7)
    pairs = []
    for ids, label in zip(reviews.sentences, reviews.labels, strict=True):
        if language.AND_ID in ids or language.BUT_ID in ids:
            swapped = swap_first_and_last_clause(ids)
            if language.label_of(swapped) != label:
                pairs.append((ids, swapped))
    assert len(pairs) > 50
    for ids, swapped in pairs:
        assert collections.Counter(ids.tolist()) == collections.Counter(swapped.tolist())
        assert not np.array_equal(ids, swapped)
    bags = language.bag_of_words([s for pair in pairs for s in pair])
    np.testing.assert_array_equal(bags[0::2], bags[1::2])

    # so the student gives both reviews of a pair the same answer: one of the two is wrong
    paddle.seed(0)
    student = text_models.StudentBOW()
    ids, _ = language.pad([s for pair in pairs for s in pair])
    logits = student(paddle.to_tensor(ids)).numpy()
    np.testing.assert_allclose(logits[0::2], logits[1::2], rtol=1e-5, atol=1e-6)
    # ... while it does tell apart reviews whose words differ
    assert not np.allclose(logits[0::2][:-1], logits[0::2][1:], atol=1e-4)


def test_augmented_views_keep_the_label_and_what_it_depends_on():
    language = example("language")
    reviews = language.GRAMMAR.reviews(500, seed=9)
    rng = np.random.default_rng(0)
    every = language.Augment(share=1.0)
    views, again = every(reviews.sentences, rng), every(reviews.sentences, rng)
    keep = np.isin(np.arange(len(language.VOCAB)), [*language.NEGATOR_IDS, language.AND_ID, language.BUT_ID])
    changed = 0
    for ids, view, label in zip(reviews.sentences, views, reviews.labels, strict=True):
        assert view.dtype == np.int64 and language.MIN_LENGTH <= len(view) <= language.MAX_LENGTH
        assert language.label_of(view) == label == rules(language.decode(view))
        np.testing.assert_array_equal(view[keep[view]], ids[keep[ids]])  # negators and joins untouched, in order
        changed += not np.array_equal(view, ids)
        assert language.PAD not in view
    assert changed > 400
    assert sum(np.array_equal(a, b) for a, b in zip(views, again, strict=True)) < 50, "each call draws new views"
    plain = language.Augment(delete=0, insert=0, swap=0)
    assert all(np.array_equal(a, b) for a, b in zip(plain(reviews.sentences, rng), reviews.sentences, strict=True))


def test_the_reader_yields_reviews_with_their_labels():
    language = example("language")
    reviews = language.GRAMMAR.reviews(7, seed=1)
    tagged = language.Reviews(reviews.sentences, np.arange(7, dtype=np.int64))  # the label says which review
    reader = language.ReviewReader(tagged, batch_size=5, samples_per_epoch=30, seed=3)
    samples = epoch_of_seven(reader)
    for ids, label in samples:
        assert label.shape == (1,) and label.dtype == np.int64
        np.testing.assert_array_equal(ids, reviews.sentences[label[0]])
    reader.epoch = 1
    which = [label[0] for _, label in samples]
    assert [label[0] for batch in reader() for _, label in batch] != which  # another epoch, another order
    with pytest.raises(ValueError, match="at least one review"):
        language.ReviewReader(language.Reviews([], np.zeros(0, np.int64)), batch_size=5)


# -- the saved teacher -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A GRU trained for one epoch on a tiny corpus and exported like the demo does."""
    if not (HAVE_PADDLE and HAVE_DEMO_DEPS):
        pytest.skip("the example needs paddlepaddle, tqdm and matplotlib")
    language, text_models, train = example("language"), example("text_models"), example("train_text_teacher")
    corpus = language.make_corpus(seed=0, **TINY)
    net, _ = train.train_teacher(corpus, epochs=1, progress=False)
    prefix = text_models.export_teacher(net, str(tmp_path_factory.mktemp("teacher") / "model"))
    return corpus, net, prefix


def dygraph_probs(net, sentences) -> np.ndarray:
    """The trained GRU's probabilities, one review at a time, unpadded: no padding code involved."""
    import paddle
    import paddle.nn.functional as F

    net.eval()
    with paddle.no_grad():
        return np.concatenate([F.softmax(net(paddle.to_tensor(s[None]), paddle.to_tensor([len(s)])), axis=-1).numpy()
                               for s in sentences])


@needs_paddle
def test_the_saved_teacher_takes_variable_length_ids_and_lengths(tiny_teacher):
    import paddle

    corpus, net, prefix = tiny_teacher
    text_models = example("text_models")
    loaded = paddle.jit.load(prefix)  # Paddle's own reading of the saved program
    assert [(spec.name, tuple(spec.shape), spec.dtype) for spec in loaded._input_spec()] == [
        ("ids", (-1, -1), paddle.int64), ("lengths", (-1,), paddle.int64)]
    teacher = text_models.SavedTeacher(prefix)
    assert sorted(teacher.input_names) == ["ids", "lengths"]
    sentences = corpus.test.sentences
    prob = teacher(sentences)
    assert prob.shape == (len(sentences), 2) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(prob, dygraph_probs(net, sentences), rtol=1e-4, atol=1e-6)
    # the padding changes nothing: each review alone, or in a batch of others padded to their longest
    alone = np.concatenate([teacher([s]) for s in sentences[:10]])
    np.testing.assert_allclose(alone, prob[:10], rtol=1e-4, atol=1e-6)
    assert not np.allclose(prob[:, 1], prob[0, 1], atol=1e-4), "a teacher that ignores its input proves nothing"


@needs_paddle
def test_the_in_process_teacher_appends_its_probabilities(tiny_teacher):
    corpus, net, prefix = tiny_teacher
    language, ds = example("language"), example("distill_text_student")
    dr = ds.InProcessTeacher(prefix)
    reader = ds.student_reader(corpus, batch_size=16, augment=language.AUGMENT)
    dr.set_sample_list_generator(reader)
    samples = [s for batch in dr() for s in batch]
    assert len(samples) == len(corpus.train) and dr.teacher.rows == len(corpus.train)
    for ids, label, prob in samples:
        assert ids.dtype == np.int64 and ids.ndim == 1 and label.shape == (1,) and prob.shape == (2,)
        if label[0] != language.UNLABELED:
            assert label[0] == language.label_of(ids)
    np.testing.assert_allclose(np.stack([s[2] for s in samples]), dygraph_probs(net, [s[0] for s in samples]),
                               rtol=1e-4, atol=1e-6)
    assert sorted(s[1][0] for s in samples) == sorted(corpus.student_labels)


def check_results(out, output: str, seeds: int, served: bool) -> dict:
    """``results.json`` has the MNIST demo's form, and its figures are those the run printed."""
    results = json.loads((out / "results.json").read_text())
    assert "labels for" in results["scenario"] and "training reviews" in results["scenario"]
    assert results["teacher"]["served"] is served and 0.0 <= results["teacher"]["accuracy"] <= 1.0
    for arm in ("student_alone", "student_distilled"):
        accs = results[arm]["accuracies"]
        assert len(accs) == seeds and all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs)
    alone, distilled = results["student_alone"]["accuracies"], results["student_distilled"]["accuracies"]
    assert results["gain_points"] == pytest.approx(100 * (np.mean(distilled) - np.mean(alone)))
    assert results["every_distilled_seed_above_every_alone_seed"] == (min(distilled) > max(alone))
    assert results["data"]["labeled_reviews"] < results["data"]["train_reviews"] == 256
    assert results["student_alone"]["samples_per_seed"] == results["student_distilled"]["samples_per_seed"] == 256
    for arm, bar in (("student_alone", "student alone"), ("student_distilled", "student distilled")):
        assert [round(a, 4) for a in results[arm]["accuracies"]] == final_bar_accuracies(output, bar)
    assert f"  {results['verdict']}\n" in output
    assert f"{results['gain_points']:+.2f} points" in results["verdict"] and "test reviews" in results["verdict"]
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "teacher" / "model.json").exists()
    return results


@needs_paddle
def test_demo_tiny_in_process_writes_results(tmp_path):
    out = tmp_path / "out"
    output = run_demo("demo.py", "--tiny", "--in-process", "--seeds", "2", "--out", str(out), folder=EXAMPLE)
    for row in ("teacher (GRU)", "student alone (BOW)", "student distilled (BOW)", "samples/s", "seed 2: alone"):
        assert row in output
    results = check_results(out, output, seeds=2, served=False)
    assert results["teacher"]["address"] == "in-process" and "(pid" not in output


# -- the served path: zdistill-teacher and DistillReader with a slot of varying length ---------


@needs_paddle
def test_distill_reader_returns_each_review_with_the_teachers_probabilities(tiny_teacher, start_teacher):
    from zdistill import DistillReader
    from zdistill.client import TeacherClient

    corpus, net, prefix = tiny_teacher
    language, ds, text_models = example("language"), example("distill_text_student"), example("text_models")
    teacher = start_teacher(prefix, "--threads", "1", "--lengths-input", "lengths")
    for augment in (None, language.AUGMENT):
        with DistillReader(ins=["ids", "label"], predicts=[text_models.TEACHER_OUTPUT]) as dr:
            dr.set_fixed_teacher(teacher.endpoint.split("://")[-1])
            dr.set_sample_list_generator(ds.student_reader(corpus, batch_size=16, augment=augment))
            batches = list(dr())
        assert [len(b) for b in batches] == [16] * (len(corpus.train) // 16)  # the reader's own batches
        samples = [s for batch in batches for s in batch]
        for ids, label, prob in samples:
            assert ids.dtype == np.int64 and ids.ndim == 1 and label.shape == (1,) and label.dtype == np.int64
            assert prob.shape == (2,) and prob.dtype == np.float32
        np.testing.assert_allclose(np.stack([s[2] for s in samples]), dygraph_probs(net, [s[0] for s in samples]),
                                   rtol=1e-4, atol=1e-6)
        if augment is None:  # every review once, exactly as the reader gave it, with the label the student has
            index = {s.tobytes(): i for i, s in enumerate(corpus.train.sentences)}
            assert len(index) == len(corpus.train), "the tiny corpus has duplicate reviews; pick another seed"
            which = [index[s[0].tobytes()] for s in samples]
            assert sorted(which) == list(range(len(corpus.train)))
            np.testing.assert_array_equal([s[1][0] for s in samples], corpus.student_labels[which])
    client = TeacherClient(teacher.endpoint, timeout=10)
    try:
        assert client.stats()["rows"] >= 2 * len(corpus.train)
    finally:
        client.close()


@needs_paddle
def test_demo_tiny_served_runs_end_to_end_and_stops_its_teacher(tmp_path):
    out = tmp_path / "out"
    output = run_demo("demo.py", "--tiny", "--seeds", "2", "--out", str(out), folder=EXAMPLE, timeout=180)
    assert "zdistill-teacher --model" in output and "--lengths-input lengths" in output
    results = check_results(out, output, seeds=2, served=True)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", results["teacher"]["address"])
    assert_gone([int(pid) for pid in re.findall(r"\(pid (\d+)", output)])
