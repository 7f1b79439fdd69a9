"""GPU teachers end to end: PyTorch models served by ``zdistill-teacher``, from in-process to ``DistillReader``.

Run ``python bench/bench_gpu.py`` on a machine with a GPU (about 4 minutes), ``--quick``
(about 2), or pick with ``--cases`` / ``--configs`` / ``--batches``.  Without CUDA it runs
tiny versions of the models on the CPU: a smoke run of the whole script, not a measurement.
It prints a table and writes ``bench/results/gpu.json``.

Cases: the teacher functions of ``examples/torch_teacher`` (random weights,
bf16 autocast on the GPU):

- ``text``: a BERT-base-sized encoder, 128 int64 token ids -> 16 logits (1 KB a sample);
- ``image``: ResNet-50, uint8 3x224x224 images -> 1000 logits (150 KB a sample).

Measured for each case, in rounds (``--repeats``), every served figure paired with the
in-process figure of the same round:

- in-process rows/s: the teacher function called back to back in this process on
  256-row batches, from 1 thread and from N threads (what ``--instances N`` does), and
  the *plain* function (pageable memory, blocking copies, the default stream,
  ``no_grad``) for what the example's speed tricks buy;
- served raw rows/s: one :class:`~zdistill.client.TeacherClient` per teacher process,
  4 x instances 256-row requests in flight;
- ``DistillReader`` samples/s at reader batches 32, 64 and 256 (default options), one
  prepared batch yielded again and again, so the reader costs nothing;

each served figure for every teacher configuration: ``PxI`` = P processes with
``--instances I`` each (default ``1x1,1x2``; ``2x1`` is the two-process layout).  Beside
each served figure: the teachers' busy time (growth of ``model_seconds``, or of the
per-instance ``instance_seconds`` where reported, over wall time: 1.00 = one model call
always running), rows per model call, and the GPU's utilisation from NVML (``pynvml``;
the driver's own samples over the measured window).

The first reader batch of every configuration is checked against the in-process
function.  Every teacher and reader is stopped (by PID, for the teachers) in ``finally``.
"""

from __future__ import annotations

import os

# Before numpy is imported: one CPU math thread per process (teachers and workers inherit it).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EXAMPLE = REPO / "examples" / "torch_teacher"
RESULTS = BENCH / "results"
sys.path.insert(0, str(REPO))
# Worker processes are started as `python -m zdistill.student.worker`: they need the checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

MAX_BATCH = 256  # the teachers' max batch and the in-process batch
TIMEOUT = 120.0  # every blocking wait below is bounded by this (seconds)


@dataclass(frozen=True)
class Case:
    """One teacher of ``examples/torch_teacher`` and how to feed it."""

    module: str  # file in examples/torch_teacher
    function: str
    feed: str
    what: str

    def target(self) -> str:
        return f"{EXAMPLE / self.module}.py:{self.function}"


CASES = {
    "text": Case("text_teacher", "classify", "ids", "BERT-base-sized encoder, 128 int64 ids -> 16 logits"),
    "image": Case("image_teacher", "classify", "img", "ResNet-50, uint8 3x224x224 -> 1000 logits"),
}


@dataclass
class Plan:
    """How long and how often to measure; ``--quick`` and the CPU smoke run shrink it."""

    repeats: int
    seconds: float  # one measured run
    warm_seconds: float  # a reader's first (unmeasured) epoch, which starts its workers


FULL = Plan(repeats=3, seconds=2.0, warm_seconds=1.0)
QUICK = Plan(repeats=1, seconds=1.5, warm_seconds=0.5)
SMOKE = Plan(repeats=1, seconds=0.3, warm_seconds=0.1)


@dataclass(frozen=True)
class Config:
    """``processes`` teacher processes, each ``zdistill-teacher --instances instances``."""

    processes: int
    instances: int

    @classmethod
    def parse(cls, text: str) -> Config:
        try:
            processes, instances = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"want PROCESSESxINSTANCES (e.g. 1x2), got {text!r}") from None
        if processes < 1 or instances < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: processes and instances must be at least 1")
        return cls(processes, instances)

    @property
    def name(self) -> str:
        return f"{self.processes}x{self.instances}"


# -- measuring -----------------------------------------------------------------------------------


class GpuMonitor:
    """The GPU's utilisation over a window, from NVML; ``None`` everywhere when there is no NVML or GPU.

    NVML keeps the driver's own utilisation samples with their timestamps
    (``nvmlDeviceGetSamples``), so a window's figure is the mean of the samples taken
    inside it.  Where a driver refuses that call, a thread polls the current
    utilisation every 50 ms instead, and the window's figure is the mean of those polls.
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self.driver: str | None = None
        self.error: str | None = None
        self._nvml: Any = None
        self._handle: Any = None
        self._polls: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            self._handle = (pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit()
                            else pynvml.nvmlDeviceGetHandleByUUID(visible))
            self._nvml = pynvml
            self.name = _text(pynvml.nvmlDeviceGetName(self._handle))
            self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except Exception as exc:  # no pynvml, no driver, no GPU: the figures are simply absent
            self.error = f"{type(exc).__name__}: {exc}"
            self._nvml = None

    def __enter__(self) -> GpuMonitor:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._poll, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._nvml is not None:
            self._nvml.nvmlShutdown()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            except Exception:  # the driver went away: the driver's samples may still answer
                continue
            self._polls.append((time.time(), float(util)))
            if len(self._polls) > 20_000:  # ~16 minutes of polls: keep the list bounded
                del self._polls[:10_000]

    def utilisation(self, start: float, end: float) -> float | None:
        """Mean GPU utilisation (%) between two ``time.time()`` stamps."""
        if self._nvml is None:
            return None
        try:
            _, samples = self._nvml.nvmlDeviceGetSamples(self._handle, self._nvml.NVML_GPU_UTILIZATION_SAMPLES,
                                                         int(start * 1e6))
            inside = [s.sampleValue.uiVal for s in samples if start * 1e6 <= s.timeStamp <= end * 1e6]
            if inside:
                return float(statistics.mean(inside))
        except Exception:
            pass
        polls = [u for t, u in list(self._polls) if start <= t <= end]
        return float(statistics.mean(polls)) if polls else None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Series:
    """One measurement over the rounds: a value per round, and the figures read beside it."""

    rows_per_s: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)  # to the in-process figure (1 thread) of the same round
    ratio_same_threads: list[float] = field(default_factory=list)  # ...with as many threads as instances
    busy: list[float] = field(default_factory=list)
    instance_busy: list[list[float]] = field(default_factory=list)
    rows_per_call: list[float] = field(default_factory=list)
    gpu_util: list[float | None] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def med(values: Sequence[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return statistics.median(known) if known else None

        out: dict[str, Any] = {"runs": asdict(self)}
        for key in ("rows_per_s", "ratio", "ratio_same_threads", "busy", "rows_per_call", "gpu_util"):
            out[key] = med(getattr(self, key))
        return out


class Teachers:
    """The teacher processes of one configuration, and their ``stats`` before and after a run."""

    def __init__(self, procs: list[Any], config: Config) -> None:
        self.procs, self.config = procs, config

    @property
    def addresses(self) -> list[str]:
        return [p.endpoint.removeprefix("tcp://") for p in self.procs]

    def meta(self) -> dict[str, Any]:
        """The first process's ``meta`` without its stats (every process of a configuration is started alike)."""
        from zdistill.client import TeacherClient

        client = TeacherClient(self.procs[0].endpoint, timeout=TIMEOUT)
        try:
            return {k: v for k, v in client.meta().items() if k not in ("stats", "id", "kind")}
        finally:
            client.close()

    def raw_window(self, request_bytes: int) -> int:
        """Requests a raw client keeps in flight per process: 4 per instance, within what the teacher may hold."""
        meta = self.meta()
        room = meta.get("max_queue_bytes", 1 << 62) // max(1, request_bytes)
        return max(1, min(4 * self.config.instances, room))

    def stats(self) -> list[dict[str, Any]]:
        from tests.procs import teacher_stats

        return [teacher_stats(p.endpoint, TIMEOUT) for p in self.procs]

    @staticmethod
    def busy(before: list[dict[str, Any]], after: list[dict[str, Any]], wall: float
             ) -> tuple[float, list[float], float]:
        """Model-call seconds per wall second (all instances of all processes), per instance, rows per call."""
        instance: list[float] = []
        total = rows = calls = 0.0
        for b, a in zip(before, after, strict=True):
            if "instance_seconds" in a:
                per = [(x - y) / wall for x, y in zip(a["instance_seconds"], b["instance_seconds"], strict=True)]
                instance += per
                total += sum(per)
            else:
                total += (a["model_seconds"] - b["model_seconds"]) / wall
            rows += a["rows"] - b["rows"]
            calls += a["batches"] - b["batches"]
        return total, instance, rows / max(1.0, calls)


def measure(series: Series, run: Callable[[], tuple[int, float]], gpu: GpuMonitor,
            teachers: Teachers | None = None) -> float:
    """Run ``run`` (rows done, seconds taken); record rows/s, teacher busy time and GPU utilisation."""
    before = teachers.stats() if teachers else None
    start = time.time()
    rows, seconds = run()
    end = time.time()
    rate = rows / seconds
    series.rows_per_s.append(rate)
    series.gpu_util.append(gpu.utilisation(start, end))
    if teachers and before is not None:
        busy, instance, per_call = Teachers.busy(before, teachers.stats(), end - start)
        series.busy.append(busy)
        series.instance_busy.append(instance)
        series.rows_per_call.append(per_call)
    return rate


def in_process(fn: Callable[[dict[str, np.ndarray]], Any], feeds: dict[str, np.ndarray], seconds: float,
               threads: int) -> tuple[int, float]:
    """``threads`` threads calling ``fn`` back to back for ``seconds``: rows done and the time taken."""
    rows = len(next(iter(feeds.values())))
    done = [0] * threads
    start_line = threading.Barrier(threads + 1, timeout=TIMEOUT)
    end = [0.0]

    def loop(i: int) -> None:
        start_line.wait()
        while time.perf_counter() < end[0]:
            fn(feeds)
            done[i] += rows

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    start = time.perf_counter()
    end[0] = start + seconds
    start_line.wait()
    for w in workers:
        w.join(TIMEOUT)
    if any(w.is_alive() for w in workers):
        raise TimeoutError(f"an in-process call took longer than {TIMEOUT} s")
    return sum(done), time.perf_counter() - start


def served_raw(addresses: Sequence[str], feeds: dict[str, np.ndarray], seconds: float, window: int
               ) -> tuple[int, float]:
    """One TeacherClient per teacher keeping ``window`` requests in flight for ``seconds``: rows answered, time."""
    import zmq

    from zdistill.client import TeacherClient

    rows = len(next(iter(feeds.values())))
    clients = [TeacherClient(a, timeout=TIMEOUT) for a in addresses]
    poller = zmq.Poller()
    try:
        for c in clients:
            c.predict(feeds)  # warm the connection and the teacher's buffers
            poller.register(c.socket, zmq.POLLIN)
        done = 0
        start = time.perf_counter()
        end = start + seconds
        for c in clients:
            for _ in range(window):
                c.submit("predict", feeds)
        while any(c.in_flight for c in clients):
            poller.poll(1000)
            for c in clients:
                for completion in c.collect():
                    if completion.error is not None:
                        raise completion.error
                    done += rows
                    if time.perf_counter() < end:
                        c.submit("predict", feeds)
        return done, time.perf_counter() - start
    finally:
        for c in clients:
            c.close()


class Reader:
    """One DistillReader kept alive across rounds: :meth:`warm_up` once (it starts the workers), then :meth:`epoch`."""

    def __init__(self, addresses: Sequence[str], case: Case, batch: np.ndarray, warm_batches: int) -> None:
        from zdistill import DistillReader

        self.batch = batch
        self.count = [warm_batches]
        self.dr = DistillReader(ins=[case.feed], predicts=["logits"])
        self.dr.set_fixed_teacher(list(addresses))
        self.dr.set_batch_generator(lambda: ((self.batch,) for _ in range(self.count[0])))

    def warm_up(self, expected: np.ndarray, measured_batches: int) -> None:
        """An unmeasured epoch whose first batch is checked against ``expected``; later epochs are longer."""
        for i, (_, logits) in enumerate(self.dr()):
            if i == 0:
                check(logits, expected, "DistillReader")
        self.count[0] = measured_batches

    def epoch(self) -> tuple[int, float]:
        """One measured epoch, timed whole (the reader process's start to the last batch): rows, seconds."""
        start = time.perf_counter()
        n = sum(len(item[0]) for item in self.dr())
        elapsed = time.perf_counter() - start
        if n != self.count[0] * len(self.batch):
            raise RuntimeError(f"an epoch yielded {n} samples, expected {self.count[0] * len(self.batch)}")
        return n, elapsed


def check(got: np.ndarray, expected: np.ndarray, where: str) -> float:
    """A benchmark of wrong answers is worthless: served logits must be the in-process ones.

    bf16 results differ a little with the batch they were computed in, so the bound is
    a tenth of the logits' range, far below what a wrong model or a mixed-up row gives.
    """
    if got.shape != expected.shape:
        raise RuntimeError(f"{where} returned logits of shape {got.shape}, expected {expected.shape}")
    error = float(np.abs(got - expected).max())
    scale = float(np.ptp(expected)) or 1.0
    if error > 0.1 * scale:
        raise RuntimeError(f"{where} returned logits {error:.3g} away from the in-process ones (range {scale:.3g})")
    return error / scale


# -- one case --------------------------------------------------------------------------------------


def load_example(case: Case) -> ModuleType:
    """Import the case's teacher module in this process (its size comes from the environment)."""
    spec = importlib.util.spec_from_file_location(f"bench_gpu_{case.module}", EXAMPLE / f"{case.module}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain(module: ModuleType) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The same model called the obvious way: what ``TorchTeacher``'s tricks are measured against."""
    import torch

    teacher = module.TEACHER
    net, device = teacher.module(), teacher.device

    def call(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            return {k: v.cpu().numpy() for k, v in teacher.forward(net, inputs).items()}

    return call


def make_inputs(module: ModuleType, case: Case, rows: int) -> np.ndarray:
    rng = np.random.default_rng(13)
    if case.feed == "ids":
        return rng.integers(0, module.VOCAB, (rows, module.SEQ), dtype=np.int64)
    return rng.integers(0, 256, (rows, 3, module.IMAGE, module.IMAGE), dtype=np.uint8)


def start_teachers(case: Case, configs: Sequence[Config], folder: Path, stack: ExitStack,
                   pool: ThreadPoolExecutor) -> Callable[[], dict[Config, Teachers]]:
    """Start every teacher process at once (each loads its model in parallel); return a wait for them.

    Each process is registered on ``stack`` as soon as it is up, so it is stopped by PID
    whatever fails later, a sibling's start included.
    """
    from tests import procs

    explicit = teacher_has_instances()  # its default may be more than one on a GPU: always say how many

    def one(config: Config) -> Any:
        flags = ["--max-batch-size", str(MAX_BATCH), "--log-level", "WARNING"]
        if explicit:
            flags += ["--instances", str(config.instances)]
        proc = procs.start_teacher(case.target(), folder, *flags, timeout=TIMEOUT)
        stack.callback(proc.stop)
        return proc

    futures = {config: [pool.submit(one, config) for _ in range(config.processes)] for config in configs}

    def wait() -> dict[Config, Teachers]:
        return {config: Teachers([f.result(TIMEOUT) for f in fs], config) for config, fs in futures.items()}

    return wait


def run_case(name: str, configs: Sequence[Config], batches: Sequence[int], plan: Plan, gpu: GpuMonitor,
             folder: Path) -> dict[str, Any]:
    case = CASES[name]
    out: dict[str, Any] = {"model": case.what, "teacher": case.target()}
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=8) as pool:
        started = time.perf_counter()
        wait = start_teachers(case, configs, folder, stack, pool)
        module = load_example(case)  # loads here while the teachers load there
        x = make_inputs(module, case, MAX_BATCH)
        feeds = {case.feed: x}
        fn = module.TEACHER
        expected = fn(feeds)["logits"]  # also the first call: builds the model, warms the kernels
        plain_fn = plain(module)
        out["plain_vs_fast_error"] = check(plain_fn(feeds)["logits"], expected, "the plain function")
        fleet = wait()
        out["start_seconds"] = time.perf_counter() - started
        out["sample_bytes"] = int(x[0].nbytes)
        out["device"] = str(fn.device)
        print(f"  {name}: {case.what}; model and teachers ready in {out['start_seconds']:.1f} s", flush=True)

        threads = sorted({1, *(c.instances for c in configs)})
        local = {f"threads{t}": Series() for t in threads} | {"plain": Series()}
        raw = {c: Series() for c in configs}
        read = {(c, b): Series() for c in configs for b in batches}
        windows = {c: fleet[c].raw_window(x.nbytes) for c in configs}
        rate = measure(Series(), lambda: in_process(fn, feeds, plan.warm_seconds, 1), gpu)  # a first estimate
        readers: dict[tuple[Config, int], Reader] = {}
        for (config, b) in read:
            reader = readers[config, b] = Reader(fleet[config].addresses, case, x[:b],
                                                 warm_batches=max(2, int(rate * plan.warm_seconds / b)))
            stack.callback(reader.dr.close)
            reader.warm_up(expected[:b], measured_batches=max(4, int(rate * plan.seconds / b)))
        for r in range(plan.repeats):
            base: dict[int, float] = {}
            for t in threads:
                base[t] = measure(local[f"threads{t}"], lambda t=t: in_process(fn, feeds, plan.seconds, t), gpu)
                local[f"threads{t}"].ratio.append(base[t] / base[1])
            measure(local["plain"], lambda: in_process(plain_fn, feeds, plan.seconds, 1), gpu)
            local["plain"].ratio.append(local["plain"].rows_per_s[-1] / base[1])
            for config in configs:
                teachers = fleet[config]
                window = windows[config]
                measure(raw[config], lambda t=teachers, w=window: served_raw(t.addresses, feeds, plan.seconds, w),
                        gpu, teachers)
                for (c, b), series in read.items():
                    if c == config:
                        measure(series, readers[c, b].epoch, gpu, teachers)
                for series in [raw[config]] + [s for (c, _), s in read.items() if c == config]:
                    series.ratio.append(series.rows_per_s[-1] / base[1])
                    series.ratio_same_threads.append(series.rows_per_s[-1] / base[config.instances])
            print(f"  {name} round {r + 1}/{plan.repeats}: in-process {base[1]:,.0f} rows/s; " + "; ".join(
                f"{c.name} raw {raw[c].ratio[-1]:.2f}, reader " + "/".join(
                    f"{read[c, b].ratio[-1]:.2f}" for b in batches) for c in configs), flush=True)
        out["in_process"] = {key: s.summary() for key, s in local.items()}
        out["served"] = {
            c.name: {"processes": c.processes, "instances": c.instances, "raw_in_flight_per_process": windows[c],
                     "teacher_meta": fleet[c].meta(), "raw": raw[c].summary(),
                     **{f"reader{b}": read[c, b].summary() for b in batches}}
            for c in configs}
    return out


# -- report ------------------------------------------------------------------------------------


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    rows: list[tuple[str, ...]] = []
    for name, case in results["cases"].items():
        for key, s in case["in_process"].items():
            what = "plain (pageable, blocking, no_grad)" if key == "plain" else f"{key[len('threads'):]} thread(s)"
            rows.append((name, f"in-process, {what}", fmt(s["rows_per_s"], ",.0f"), fmt(s["ratio"], ".2f"),
                         "", "", "", fmt(s["gpu_util"], ".0f")))
        for config, served in case["served"].items():
            for key in ["raw", *(k for k in served if k.startswith("reader"))]:
                s = served[key]
                what = "raw TeacherClient" if key == "raw" else f"DistillReader, batch {key.removeprefix('reader')}"
                rows.append((name, f"{config}: {what}", fmt(s["rows_per_s"], ",.0f"), fmt(s["ratio"], ".2f"),
                             fmt(s["ratio_same_threads"], ".2f"), fmt(s["busy"], ".2f"), fmt(s["rows_per_call"], ".0f"),
                             fmt(s["gpu_util"], ".0f")))
    return rows


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("case", "measurement", "rows/s", "ratio", "vs N thr", "busy", "rows/call", "GPU %")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print("ratio: to in-process, 1 thread, same round; vs N thr: to in-process with as many threads as instances;\n"
          "busy: model-call seconds per wall second, all instances and processes (1.00 = one call always running);\n"
          "config PxI: P teacher processes with --instances I.  Medians over the rounds.")


def teacher_has_instances() -> bool:
    from zdistill.teacher.server import build_parser

    return "--instances" in build_parser()._option_string_actions


def machine(gpu: GpuMonitor) -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {
        "gpu": gpu.name or (torch.cuda.get_device_name() if torch.cuda.is_available() else None),
        "driver": gpu.driver, "nvml_error": gpu.error, "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "numpy": np.__version__, "commit": commit,
        "load_before": os.getloadavg(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The cases, what is measured and how: see the module docstring "
                                       "(bench/bench_gpu.py) and bench/README.md.")
    p.add_argument("--quick", action="store_true", help="one short round of everything (about 2 minutes on a GPU)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {sorted(CASES)} (default: all)")
    p.add_argument("--configs", default="1x1,1x2",
                   help="teacher configurations PROCESSESxINSTANCES, comma list (default 1x1,1x2; 2x1 is two "
                        "processes); those needing --instances are skipped where the teacher lacks it")
    p.add_argument("--batches", default="32,64,256", help="DistillReader batch sizes (default 32,64,256)")
    p.add_argument("--repeats", type=int, help="rounds (default 3; 1 with --quick or on a CPU)")
    p.add_argument("--seconds", type=float, help="length of one measurement (default 2; 1.5 quick; 0.3 on a CPU)")
    p.add_argument("--size", choices=("full", "tiny"),
                   help="model sizes (default: full with CUDA, tiny without: a smoke run of seconds)")
    p.add_argument("--out", default=str(RESULTS / "gpu.json"), help="where to write the JSON results")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        p.error(f"--cases: unknown {unknown}; choose from {sorted(CASES)}")
    try:
        args.configs = list(dict.fromkeys(Config.parse(c) for c in args.configs.split(",") if c.strip()))
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except (argparse.ArgumentTypeError, ValueError) as exc:
        p.error(str(exc))
    if not args.configs or any(not 1 <= b <= MAX_BATCH for b in args.batches):
        p.error(f"--configs needs at least one configuration; --batches must lie in 1..{MAX_BATCH}")
    args.cases = cases
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and bad flags need no torch
    import torch

    size = args.size or ("full" if torch.cuda.is_available() else "tiny")
    os.environ["ZDISTILL_TORCH_TEACHER_SIZE"] = size  # read by the example modules, here and in the teachers
    plan = SMOKE if size == "tiny" else QUICK if args.quick else FULL
    plan = Plan(args.repeats or plan.repeats, args.seconds or plan.seconds, plan.warm_seconds)
    configs: list[Config] = args.configs
    skipped = [c.name for c in configs if c.instances > 1 and not teacher_has_instances()]
    if skipped:
        print(f"this zdistill-teacher has no --instances: skipping {', '.join(skipped)}", flush=True)
        configs = [c for c in configs if c.name not in skipped]
    if not configs:
        print("no teacher configuration left to run", file=sys.stderr)
        return 2
    if size == "tiny":
        print("tiny models on the CPU: a smoke run of the script, not a measurement", flush=True)
    started = time.perf_counter()
    with GpuMonitor() as gpu, tempfile.TemporaryDirectory(prefix="zd-bench-gpu-") as folder:
        results: dict[str, Any] = {
            "machine": machine(gpu), "size": size, "plan": asdict(plan), "max_batch": MAX_BATCH,
            "configs": [c.name for c in configs], "skipped_configs": skipped, "batches": args.batches,
        }
        from zdistill.student.options import PipelineOptions

        results["pipeline_options"] = asdict(PipelineOptions())
        print(f"device: {results['machine']['gpu'] or 'CPU'}; {plan.repeats} round(s) of {plan.seconds} s; "
              f"configurations {', '.join(results['configs'])}; reader batches {args.batches}", flush=True)
        results["cases"] = {name: run_case(name, configs, args.batches, plan, gpu, Path(folder)) for name in args.cases}
    results["seconds"] = time.perf_counter() - started
    rows = table_rows(results)
    results["table"] = [list(r) for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print_table(rows)
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
