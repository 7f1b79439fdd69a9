"""The first thing to run: train a teacher, serve it, distill a student from it, compare.

    python examples/mnist_distill/demo.py            # 1-2 minutes on 2 CPU cores
    python examples/mnist_distill/demo.py --tiny     # seconds: a smoke run

The setting is one where only a live teacher will do: the student has labels for 3% of
its training images, and every epoch it sees freshly augmented views of all of them.
Steps, each with a progress bar:

1. train the teacher (three CNNs, averaged) on the labeled images and export it
   (``paddle.jit.save``);
2. start ``zdistill-teacher`` on it as a child process (stopped by PID on exit and Ctrl-C)
   and, while it loads, train the student alone on the labeled images, as the baseline;
3. train the same student on all the images through ``DistillReader``: the teacher labels
   each augmented view as it is made;
4. print the test accuracy of teacher / student alone / student distilled, an honest
   verdict, the distilled training's samples/s, and write ``out/results.json`` and the
   training curves ``out/curves.png``.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


# -- child processes, stopped by PID whatever happens ---------------------------------


class DaemonError(RuntimeError):
    """A daemon the demo started died or never became ready; the message carries its log's tail."""


@dataclass
class Child:
    """A process this demo started: its PID, its log, and how to stop it."""

    name: str
    popen: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (every daemon here shuts down cleanly on it), SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


class Children:
    """Every process the demo starts; :meth:`stop_all` ends them by PID, newest first.

    Called from ``finally`` blocks and again at interpreter exit; SIGTERM becomes
    ``SystemExit`` and Ctrl-C ``KeyboardInterrupt``, so both reach the ``finally``.
    """

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        atexit.register(self.stop_all)
        self.catch_signals()

    @staticmethod
    def catch_signals() -> None:
        """SIGTERM -> ``SystemExit``, SIGINT -> ``KeyboardInterrupt``: both run the ``finally`` that stops children.

        Call again after ``import paddle``: Paddle installs its own SIGTERM handler (which
        aborts with a C++ stack dump and would leave the children running).  SIGINT is set
        explicitly so ``kill -INT`` works even when the demo was started with it ignored
        (a background job of a script).
        """
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{name}.log")
        with open(log_path, "w") as log:
            popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        while self.children:
            self.children.pop().stop()


def wait_for_file(path: str, child: Child, timeout: float = 120.0) -> str:
    """Wait for a daemon's ready file (written once it really serves); fail fast if it dies."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if not child.alive():
            raise DaemonError(f"{child.name} exited with {child.popen.returncode} before it was ready; "
                               f"its log ({child.log_path}):\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise DaemonError(f"{child.name} not ready after {timeout:.0f} s; its log ({child.log_path}):\n"
                               f"{child.log_tail()}")
        time.sleep(0.05)
    with open(path) as f:
        return f.read().strip()


def show(path: str) -> str:
    """A path as the user would type it: relative when under the current folder."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def host_port(endpoint: str) -> str:
    """``tcp://127.0.0.1:5555`` -> ``127.0.0.1:5555`` (the form EDL users pass around)."""
    return endpoint.split("://", 1)[-1]


def start_teacher(children: Children, prefix: str, name: str = "teacher", port: int = 0,
                  threads: int = 1, flags: Sequence[str] = ()) -> tuple[Child, str]:
    """Start ``zdistill-teacher`` on a saved model; returns the child and its ready-file path.

    ``python -m zdistill.teacher.server`` is the ``zdistill-teacher`` console script, run with this
    interpreter so the demo works from any virtual environment, activated or not.  One
    math thread: on 2 cores the student trains in this process at the same time.
    ``flags`` are more ``zdistill-teacher`` flags (the text example's ``--lengths-input``).
    """
    ready = os.path.join(children.log_dir, f"{name}.ready")
    if os.path.exists(ready):
        os.remove(ready)
    args = [sys.executable, "-m", "zdistill.teacher.server", "--model", prefix, "--host", "127.0.0.1",
            "--port", str(port), "--threads", str(threads), "--ready-file", ready, *flags]
    child = children.start(name, args)
    return child, ready


# -- the demo ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with MNIST idx files (default: scikit-learn digits)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="model, logs, results.json and the PNG go here")
    p.add_argument("--labeled-fraction", type=float, default=None,
                   help="part of the training images the student has labels for (default: data.LABELED_FRACTION; "
                        "1 gives the student every label)")
    p.add_argument("--no-augment", action="store_true", help="train every model on the plain images")
    p.add_argument("--teacher-members", type=int, default=None,
                   help="CNNs averaged into the teacher (default: train_teacher.TEACHER_MEMBERS on 8x8 digits, 1 on "
                        "MNIST)")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="default: train_teacher.TEACHER_EPOCHS on 8x8 digits, 1 on MNIST")
    p.add_argument("--student-epochs", type=int, default=None,
                   help="default: distill_student.STUDENT_EPOCHS on 8x8 digits, 2 on MNIST")
    p.add_argument("--seeds", type=int, default=3, help="students trained per kind, to tell gain from noise")
    p.add_argument("--seed", type=int, default=0,
                   help="the teacher's seed; the students get the next --seeds ones (another value: another run)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="picks the labeled images and the digits' train/test split (MNIST keeps its own split)")
    p.add_argument("--temperature", type=float, default=None, help="default: distill_student.TEMPERATURE")
    p.add_argument("--hard-weight", type=float, default=None, help="default: distill_student.HARD_WEIGHT")
    p.add_argument("--port", type=int, default=0, help="teacher port (default 0: any free port)")
    p.add_argument("--tiny", action="store_true", help="256 training images, 1 epoch: a smoke run")
    args = p.parse_args(argv)
    if args.labeled_fraction is not None and not 0.0 < args.labeled_fraction <= 1.0:
        p.error(f"--labeled-fraction must be in (0, 1], not {args.labeled_fraction}")
    for name in ("seeds", "teacher_members", "teacher_epochs", "student_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, not {value}")

    return run_with_children(os.path.join(args.out, "logs"), lambda children: run_demo(args, children))


def run_with_children(log_dir: str, body: Callable[[Children], int]) -> int:
    """Run ``body`` and stop every process it started, whatever happens (Ctrl-C included)."""
    children = Children(log_dir)
    try:
        return body(children)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the processes the demo started", file=sys.stderr)
        return 130
    except DaemonError as exc:  # a daemon that would not start: its log says why
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()


def run_demo(args: argparse.Namespace, children: Children) -> int:
    started = time.perf_counter()
    # zdistill's workers log at the parent's level: keep their INFO lines out of the progress bars.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("zdistill").setLevel(logging.WARNING)
    print("loading Paddle ...", flush=True)
    import distill_student as ds
    from data import AUGMENT, LABELED_FRACTION, load_data
    from models import accuracy, n_params
    from report import mean_std, plot_curves, print_distilled_rate, print_results, students_results, verdict, write_json
    from train_teacher import TEACHER_EPOCHS, TEACHER_MEMBERS, TEACHER_OUTPUT, export_teacher, train_teachers

    from zdistill import DistillReader

    children.catch_signals()  # after `import paddle`, which replaced the SIGTERM handler
    temperature = ds.TEMPERATURE if args.temperature is None else args.temperature
    hard_weight = ds.HARD_WEIGHT if args.hard_weight is None else args.hard_weight
    augment = None if args.no_augment else AUGMENT
    seeds = list(range(args.seed + 1, args.seed + args.seeds + 1))
    data = load_data(args.data_dir, args.split_seed, args.labeled_fraction or LABELED_FRACTION)
    # MNIST is 12x the pixels of 8x8 digits and 42x the images: a smaller budget keeps it to minutes on a CPU.
    small = data.image_shape[1:] == (8, 8)
    members = args.teacher_members or (TEACHER_MEMBERS if small else 1)
    teacher_epochs = args.teacher_epochs or (TEACHER_EPOCHS if small else 1)
    student_epochs = args.student_epochs or (ds.STUDENT_EPOCHS if small else 2)
    if args.tiny:
        data, teacher_epochs, student_epochs = data.subset(256, 64), 1, 1
    n_train, n_labeled = len(data.y_train), len(data.y_labeled)
    scenario = (f"the student has labels for {n_labeled} of its {n_train} training images "
                f"({100 * n_labeled / n_train:.0f}%); " + ("every epoch brings freshly augmented views "
                f"({augment.describe()})" if augment else "no augmentation"))
    print(f"data: {data.source}; images {list(data.image_shape)}")
    print(f"setting: {scenario}")
    timings: dict[str, float] = {}

    cnns = f"{members} CNN{'s' if members > 1 else ''}"
    print(f"\n[1/4] training the teacher ({cnns}, averaged) on the {n_labeled} labeled images "
          f"({teacher_epochs} epochs each)")
    t = time.perf_counter()
    teacher, teacher_hists = train_teachers(data, teacher_epochs, members, seed=args.seed, augment=augment)
    teacher_acc = accuracy(teacher, data.x_test, data.y_test)
    prefix = export_teacher(teacher, os.path.join(args.out, "teacher", "model"), data.image_shape)
    timings["teacher"] = time.perf_counter() - t
    print(f"  test accuracy {teacher_acc:.4f} (each CNN alone: {mean_std([h.final_acc for h in teacher_hists])}); "
          f"exported {show(prefix)}.json + .pdiparams")

    print(f"\n[2/4] starting zdistill-teacher; meanwhile the student trains alone on its {n_labeled} labeled images "
          f"(seeds {seeds})")
    server, ready = start_teacher(children, prefix, port=args.port)
    print(f"  zdistill-teacher --model {show(prefix)} --host 127.0.0.1 --port {args.port} --threads 1 "
          f"(pid {server.pid}, log {show(server.log_path)})")
    t = time.perf_counter()
    alone = [ds.train_student_alone(data, student_epochs, seed=seed, augment=augment)[1] for seed in seeds]
    timings["alone"] = time.perf_counter() - t
    address = host_port(wait_for_file(ready, server))
    print(f"  teacher serving at {address}")

    print(f"\n[3/4] distilling the student on all {n_train} images, each view labeled by the teacher at {address} "
          f"through DistillReader (T={temperature:g}, hard-label weight {hard_weight:g}, seeds {seeds})")
    distilled, pipeline_rates = [], []
    t = time.perf_counter()
    for seed in seeds:
        with DistillReader(ins=["img", "label"], predicts=[TEACHER_OUTPUT]) as dr:
            dr.set_fixed_teacher(address)
            _, hist = ds.train_student_distilled(data, dr, student_epochs, temperature=temperature,
                                                 hard_weight=hard_weight, seed=seed, augment=augment)
            pipeline_rates.append(float(dr.stats().get("samples_per_s", 0.0)))
        distilled.append(hist)
    timings["distilled"] = time.perf_counter() - t
    children.stop(server)

    print("\n[4/4] results")
    student_params = n_params(ds.StudentMLP(data.image_shape[1:], ds.STUDENT_HIDDEN))
    alone_accs, distilled_accs = [h.final_acc for h in alone], [h.final_acc for h in distilled]
    rows = [
        (f"teacher ({cnns})", n_params(teacher), f"{n_labeled} labeled",
         teacher_hists, f"{teacher_acc:.4f}", timings["teacher"]),
        ("student alone (MLP)", student_params, f"{n_labeled} labeled", alone, mean_std(alone_accs), timings["alone"]),
        ("student distilled (MLP)", student_params, f"all {n_train}", distilled, mean_std(distilled_accs),
         timings["distilled"]),
    ]
    print_results(rows)
    print_distilled_rate(distilled, f"DistillReader alone {np.mean(pipeline_rates):,.0f} samples/s")
    note = verdict(alone_accs, distilled_accs, len(data.y_test))
    if args.tiny:
        note = f"A tiny smoke run (256 images, 1 epoch): these accuracies mean nothing. {note}"
    print(f"  {note}")
    png = os.path.join(args.out, "curves.png")
    plot_curves({"teacher's CNNs, each": teacher_hists, "student alone": alone, "student distilled": distilled}, png,
                f"{data.source}; {n_labeled} labeled; student distilled with T={temperature:g}, "
                f"hard-label weight {hard_weight:g}", finals={"teacher (its CNNs averaged)": teacher_acc})
    wall = time.perf_counter() - started
    cpu = sum(os.times()[:4])  # this process and the children it has waited for (the teacher, the readers)
    results = {
        "scenario": scenario,
        "data": {"source": data.source, "train_images": n_train, "labeled_images": n_labeled,
                 "test_images": len(data.y_test), "augmentation": augment.describe() if augment else None},
        "teacher": {"model": f"mean of {cnns}", "params": n_params(teacher), "epochs": teacher_epochs,
                    "accuracy": teacher_acc, "member_accuracies": [h.final_acc for h in teacher_hists],
                    "address": address},
        "distillation": {"temperature": temperature, "hard_weight": hard_weight},
        "seeds": {"split": args.split_seed, "teacher": args.seed, "students": seeds},
        **students_results(f"MLP, {ds.STUDENT_HIDDEN} hidden units", student_params, student_epochs, alone,
                           distilled),
        "verdict": note,
        "tiny": args.tiny,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
    }
    json_path = os.path.join(args.out, "results.json")
    write_json(json_path, results)
    print(f"  results: {show(json_path)}; training curves: {show(png)}")
    print(f"  total wall time {wall:.1f} s, CPU time {cpu:.1f} s (this process and the ones it started)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
