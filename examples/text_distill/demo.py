"""Distil a sequence teacher (GRU) into a bag-of-words student on generated reviews, and compare.

    python examples/text_distill/demo.py                 # served: zdistill-teacher + DistillReader
    python examples/text_distill/demo.py --in-process    # the saved teacher run in this process
    python examples/text_distill/demo.py --tiny --in-process   # seconds: a smoke run

EDL's text example distils ERNIE into a bag-of-words model; this one does the same on a
generated language whose label a bag of words cannot read (``language.py``), offline.
Steps, each with a progress bar:

1. generate the reviews; train the teacher (a GRU) on its labeled reviews and export it
   with a variable-length input (``ids [-1, -1]`` + ``lengths [-1]``, ``paddle.jit.save``);
2. start ``zdistill-teacher --lengths-input lengths`` on it as a child process (stopped by
   PID on exit and Ctrl-C) and, while it loads, train the student alone on its 200 labeled
   reviews, as the baseline;
3. train the same student on all the training reviews, each rewritten view labeled by the
   teacher as it is made: through ``DistillReader`` (each sample's ``ids`` a 1-D int64 array
   of its own length), or with ``--in-process`` by the saved model run here
   (``paddle.inference``, padded and given lengths exactly as the server does);
4. print the test accuracy of teacher / student alone / student distilled, an honest
   verdict, and write ``out/results.json`` (the MNIST demo's format) and ``out/curves.png``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mnist_parts import mnist_demo

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = {"n_teacher": 400, "n_train": 256, "n_labeled": 32, "n_test": 128}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="model, logs, results.json and the PNG go here")
    p.add_argument("--in-process", action="store_true",
                   help="label with the saved teacher run in this process (paddle.inference) instead of serving it")
    p.add_argument("--labeled", type=int, default=200, help="training reviews the student has labels for")
    p.add_argument("--no-augment", action="store_true", help="train every model on the plain reviews")
    p.add_argument("--teacher-epochs", type=int, default=None, help="default: train_text_teacher.TEACHER_EPOCHS")
    p.add_argument("--student-epochs", type=int, default=None, help="default: distill_text_student.STUDENT_EPOCHS")
    p.add_argument("--seeds", type=int, default=3, help="students trained per kind, to tell gain from noise")
    p.add_argument("--seed", type=int, default=0,
                   help="the teacher's seed; the students get the next --seeds ones (another value: another run)")
    p.add_argument("--data-seed", type=int, default=0, help="which generated reviews, and which are labeled")
    p.add_argument("--temperature", type=float, default=None, help="default: distill_text_student.TEMPERATURE")
    p.add_argument("--hard-weight", type=float, default=None, help="default: distill_text_student.HARD_WEIGHT")
    p.add_argument("--port", type=int, default=0, help="teacher port (default 0: any free port)")
    p.add_argument("--tiny", action="store_true", help="a few hundred reviews, 1 epoch: a smoke run")
    args = p.parse_args(argv)
    for name in ("seeds", "labeled", "teacher_epochs", "student_epochs"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "labeled" else 1):
            p.error(f"--{name.replace('_', '-')} is too small: {value}")

    print("loading Paddle ...", flush=True)
    from mnist_parts import mnist_demo  # noqa: F811  (imports paddle: after --help)

    return mnist_demo.run_with_children(os.path.join(args.out, "logs"),
                                        lambda children: run_demo(args, children))


def run_demo(args: argparse.Namespace, children: mnist_demo.Children) -> int:
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("zdistill").setLevel(logging.WARNING)
    import distill_text_student as ds
    from language import AUGMENT, VOCAB, make_corpus
    from mnist_parts import mnist_demo, models, report
    from text_models import TEACHER_EMBEDDING, TEACHER_HIDDEN, TEACHER_OUTPUT, StudentBOW, export_teacher
    from train_text_teacher import TEACHER_EPOCHS, train_teacher

    from zdistill import DistillReader

    children.catch_signals()  # after `import paddle`, which replaced the SIGTERM handler
    temperature = ds.TEMPERATURE if args.temperature is None else args.temperature
    hard_weight = ds.HARD_WEIGHT if args.hard_weight is None else args.hard_weight
    augment = None if args.no_augment else AUGMENT
    seeds = list(range(args.seed + 1, args.seed + args.seeds + 1))
    teacher_epochs = args.teacher_epochs or TEACHER_EPOCHS
    student_epochs = args.student_epochs or ds.STUDENT_EPOCHS
    sizes = {"n_labeled": args.labeled}
    if args.tiny:
        sizes, teacher_epochs, student_epochs = dict(TINY), 1, 1
    corpus = make_corpus(seed=args.data_seed, **sizes)
    n_train, n_labeled, n_test = len(corpus.train), len(corpus.labeled), len(corpus.test)
    scenario = (f"the student has labels for {n_labeled} of its {n_train} training reviews "
                f"({100 * n_labeled / n_train:.0f}%); " + ("every epoch brings freshly rewritten views "
                f"({augment.describe()})" if augment else "no augmentation"))
    lengths = corpus.train.lengths
    print(f"data: {corpus.describe()}; {lengths.min()}..{lengths.max()} words per review (mean {lengths.mean():.1f})")
    print(f"setting: {scenario}")
    timings: dict[str, float] = {}

    print(f"\n[1/4] training the teacher (a GRU over word embeddings) on its {len(corpus.teacher_train)} labeled "
          f"reviews ({teacher_epochs} epochs)")
    t = time.perf_counter()
    teacher, teacher_hist = train_teacher(corpus, teacher_epochs, seed=args.seed, augment=augment)
    prefix = export_teacher(teacher, os.path.join(args.out, "teacher", "model"))
    timings["teacher"] = time.perf_counter() - t
    print(f"  test accuracy {teacher_hist.final_acc:.4f}; exported {mnist_demo.show(prefix)}.json + .pdiparams "
          f"(feeds ids [-1, -1] + lengths [-1], int64)")

    server = None
    if args.in_process:
        print(f"\n[2/4] the student trains alone on its {n_labeled} labeled reviews (seeds {seeds}); the teacher will "
              f"run in this process (--in-process)")
        address = "in-process"
    else:
        print(f"\n[2/4] starting zdistill-teacher; meanwhile the student trains alone on its {n_labeled} labeled "
              f"reviews (seeds {seeds})")
        server, ready = mnist_demo.start_teacher(children, prefix, port=args.port, flags=["--lengths-input", "lengths"])
        print(f"  zdistill-teacher --model {mnist_demo.show(prefix)} --lengths-input lengths --host 127.0.0.1 "
              f"--port {args.port} --threads 1 (pid {server.pid}, log {mnist_demo.show(server.log_path)})")
    t = time.perf_counter()
    alone = [ds.train_student_alone(corpus, student_epochs, seed=seed, augment=augment)[1] for seed in seeds]
    timings["alone"] = time.perf_counter() - t
    if server is not None:
        address = mnist_demo.host_port(mnist_demo.wait_for_file(ready, server))
        print(f"  teacher serving at {address}")

    how = ("by the saved teacher run in this process" if args.in_process
           else f"by the teacher at {address} through DistillReader")
    print(f"\n[3/4] distilling the student on all {n_train} training reviews, each view labeled {how} "
          f"(T={temperature:g}, hard-label weight {hard_weight:g}, seeds {seeds})")
    distilled, pipeline_rates = [], []
    t = time.perf_counter()
    for seed in seeds:
        if args.in_process:
            _, hist = ds.train_student_distilled(corpus, ds.InProcessTeacher(prefix), student_epochs,
                                                 temperature=temperature, hard_weight=hard_weight, seed=seed,
                                                 augment=augment)
        else:
            with DistillReader(ins=["ids", "label"], predicts=[TEACHER_OUTPUT]) as dr:
                dr.set_fixed_teacher(address)
                _, hist = ds.train_student_distilled(corpus, dr, student_epochs, temperature=temperature,
                                                     hard_weight=hard_weight, seed=seed, augment=augment)
                pipeline_rates.append(float(dr.stats().get("samples_per_s", 0.0)))
        distilled.append(hist)
    timings["distilled"] = time.perf_counter() - t
    if server is not None:
        children.stop(server)

    print("\n[4/4] results")
    student_params = models.n_params(StudentBOW(ds.STUDENT_EMBEDDING))
    alone_accs, distilled_accs = [h.final_acc for h in alone], [h.final_acc for h in distilled]
    rows = [
        ("teacher (GRU)", models.n_params(teacher), f"{len(corpus.teacher_train)} own", [teacher_hist],
         f"{teacher_hist.final_acc:.4f}", timings["teacher"]),
        ("student alone (BOW)", student_params, f"{n_labeled} labeled", alone, report.mean_std(alone_accs),
         timings["alone"]),
        ("student distilled (BOW)", student_params, f"all {n_train}", distilled, report.mean_std(distilled_accs),
         timings["distilled"]),
    ]
    report.print_results(rows)
    for seed, a, d in zip(seeds, alone_accs, distilled_accs, strict=True):
        print(f"  seed {seed}: alone {a:.4f}, distilled {d:.4f} ({100 * (d - a):+.2f} points)")
    where = ("the saved teacher in this process" if args.in_process
             else f"DistillReader alone {np.mean(pipeline_rates):,.0f} samples/s")
    report.print_distilled_rate(distilled, where)
    note = report.verdict(alone_accs, distilled_accs, n_test, unit="test reviews")
    if args.tiny:
        note = f"A tiny smoke run ({n_train} reviews, 1 epoch): these accuracies mean nothing. {note}"
    print(f"  {note}")
    png = os.path.join(args.out, "curves.png")
    report.plot_curves({"teacher (GRU)": [teacher_hist], "student alone": alone, "student distilled": distilled},
                       png, f"{corpus.source}; {n_labeled} labeled; bag-of-words student distilled with "
                       f"T={temperature:g}, hard-label weight {hard_weight:g}")
    wall = time.perf_counter() - started
    cpu = sum(os.times()[:4])  # this process and the children it has waited for (the teacher, the readers)
    bow = f"bag of words: mean of {ds.STUDENT_EMBEDDING}-d word embeddings, then linear"
    results = {
        "scenario": scenario,
        "data": {"source": corpus.source, "vocabulary": len(VOCAB), "teacher_reviews": len(corpus.teacher_train),
                 "train_reviews": n_train, "labeled_reviews": n_labeled, "test_reviews": n_test,
                 "words_per_review": [int(lengths.min()), int(lengths.max())],
                 "augmentation": augment.describe() if augment else None},
        "teacher": {"model": f"GRU ({TEACHER_HIDDEN} units) over {TEACHER_EMBEDDING}-d word embeddings",
                    "params": models.n_params(teacher), "epochs": teacher_epochs, "accuracy": teacher_hist.final_acc,
                    "address": address, "served": not args.in_process},
        "distillation": {"temperature": temperature, "hard_weight": hard_weight},
        "seeds": {"split": args.data_seed, "teacher": args.seed, "students": seeds},
        **report.students_results(bow, student_params, student_epochs, alone, distilled),
        "verdict": note,
        "tiny": args.tiny,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
    }
    json_path = os.path.join(args.out, "results.json")
    report.write_json(json_path, results)
    print(f"  results: {mnist_demo.show(json_path)}; training curves: {mnist_demo.show(png)}")
    print(f"  total wall time {wall:.1f} s, CPU time {cpu:.1f} s (this process and the ones it started)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
