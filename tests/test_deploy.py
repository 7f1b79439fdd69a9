"""Offline checks of deploy/kubernetes: the schemas, and the command lines against the CLIs.

A manifest is code that first runs on someone's cluster: a misspelt field is
rejected by the API server (or, worse, silently dropped), and a flag a CLI no
longer accepts only shows up as a CrashLoopBackOff. So, with no cluster and no
network, this test

- validates every object against the Kubernetes OpenAPI schemas shipped in the
  ``kubernetes-validate`` package (strict: unknown fields fail), for the oldest
  Kubernetes we document and the newest the package knows;
- runs every zdistill command line in a container's command + args or in an exec
  probe through that CLI's own ``build_parser().parse_args``, with ``$(VAR)``
  references expanded as the kubelet would;
- checks what the schemas cannot: names that must agree across objects (Secrets,
  ConfigMaps, claims, ports, the balancer addresses students dial), that the
  probes really are the zdistill pings, that the teacher asks for a GPU, that
  CURVE is on for every server or none with every key file mounted, and that
  the pods meet the "restricted" Pod Security Standard their namespace enforces.

Each check runs on the base manifests and on every kustomize Component (CURVE)
applied to them, with the Component's JSON 6902 patches applied here, so a patch
whose path drifted from the base fails here instead of in ``kubectl apply -k``.
Where kustomize (or kubectl) is installed, its own rendering is compared with
this one, so the checks are about what would really be applied.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"

# The oldest Kubernetes deploy/README.md promises, and the newest the schemas know.
OLDEST_K8S = "1.29"
K8S_VERSIONS = [OLDEST_K8S, kv.latest_version()]

# Program name (or `python -m` module) -> the module whose build_parser() will parse its arguments.
CLIS = {
    "zdistill-teacher": "zdistill.teacher.server",
    "zdistill-register": "zdistill.discovery.register",
    "zdistill-balancer": "zdistill.discovery.balancer",
    "zdistill": "zdistill.cli",
}

# What $(VAR) becomes when VAR comes from the Downward API or a Secret: realistic, so that
# parsers that look at values (an IP:PORT) see what they will see on a cluster.
FIELD_PLACEHOLDERS = {
    "status.podIP": "10.1.2.3",
    "metadata.name": "pod-0",
    "metadata.namespace": "zdistill",
    "spec.nodeName": "node-1",
}
SECRET_PLACEHOLDER = "secret-from-a-secret"

POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


# -- loading: the base, and the base with each Component -----------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kustomization(folder: Path) -> dict[str, Any]:
    (doc,) = load_docs(folder / "kustomization.yaml")
    return doc


def component_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.glob("*/kustomization.yaml")
                  if kustomization(p.parent).get("kind") == "Component")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]], where: str) -> None:
    """RFC 6902 ``add`` and ``replace``, the ops our Components use, applied in place.

    Stricter than the RFC in one way: ``add`` onto an object member that already
    exists is refused. RFC 6902 would silently replace it, which is how a patch
    written when the base had no ``env`` would later wipe out the base's env.
    """
    for op in ops:
        *parents, last = _pointer(op["path"])
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        kind = op["op"]
        if kind == "add" and isinstance(target, list):
            target.insert(len(target) if last == "-" else int(last), op["value"])
        elif kind == "add":
            assert last not in target, f"{where}: add {op['path']} would replace an existing value"
            target[last] = op["value"]
        elif kind == "replace":
            if isinstance(target, list):
                target[int(last)] = op["value"]
            else:
                assert last in target, f"{where}: replace {op['path']}: nothing there"
                target[last] = op["value"]
        else:
            raise AssertionError(f"{where}: op {kind!r} is not supported by this test")


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (target.get("kind", doc["kind"]) == doc["kind"]
            and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
            and target.get("group", group) == group
            and target.get("version", version) == version)


def render(component: Path | None) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k` would send, less kustomize's name/label transformers."""
    docs = [d for name in kustomization(DEPLOY)["resources"] for d in load_docs(DEPLOY / name)]
    if component is None:
        return docs
    comp = kustomization(component)
    docs += [d for name in comp.get("resources", []) for d in load_docs(component / name)]
    for patch in comp.get("patches", []):
        ops = load_docs(component / patch["path"])[0]
        hits = [d for d in docs if _matches(d, patch["target"])]
        assert len(hits) == 1, f"{component.name}/{patch['path']}: its target {patch['target']} matches {len(hits)}"
        apply_json_patch(hits[0], ops, f"{component.name}/{patch['path']}")
    return docs


RENDERINGS = {"base": None, **{p.name: p for p in component_dirs()}}


@pytest.fixture(scope="module", params=sorted(RENDERINGS))
def docs(request) -> list[dict[str, Any]]:
    return render(RENDERINGS[request.param])


def label(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(owner, pod template) for every workload."""
    for doc in docs:
        if doc["kind"] in POD_TEMPLATE_KINDS:
            yield doc, doc["spec"]["template"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


# -- the files themselves ----------------------------------------------------


def test_every_manifest_is_listed():
    """A YAML file that no kustomization lists is neither deployed nor checked here."""
    listed = set(kustomization(DEPLOY)["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"listed but missing: {listed - on_disk}; on disk but not listed: {on_disk - listed}"
    for comp in component_dirs():
        k = kustomization(comp)
        listed = set(k.get("resources", [])) | {p["path"] for p in k.get("patches", [])}
        on_disk = {p.name for p in comp.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == on_disk, f"{comp.name}: listed {sorted(listed)}, on disk {sorted(on_disk)}"
    assert RENDERINGS.keys() >= {"base", "curve"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(docs, version):
    """What the API server would check on `kubectl apply`, strictly: an unknown (misspelt) field fails."""
    errors = []
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            errors.append(f"{label(doc)} at {where or '(top)'}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{label(doc)}: no schema ({exc})")
    assert not errors, f"against Kubernetes {version}:\n" + "\n".join(errors)


def kustomize_build(folder: Path) -> list[dict[str, Any]]:
    """``kustomize build`` (or ``kubectl kustomize``), when one is installed."""
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(folder)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(folder)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{shlex.join(cmd)} failed: {out.stderr.strip()}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def comparable(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Objects by kind and name, less what only kustomize's transformers add (labels, image registry)."""
    image = next(i for i in kustomization(DEPLOY).get("images", []) if i["name"] == "zdistill")
    out = {}
    for doc in docs:
        text = yaml.safe_dump(doc, sort_keys=True).replace(image.get("newName", "zdistill") + ":", "zdistill:")
        doc = yaml.safe_load(text)
        doc["metadata"].get("labels", {}).pop("app.kubernetes.io/managed-by", None)
        out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_kustomize_renders_what_this_test_checks(name, tmp_path):
    """The real kustomize agrees with render() above, so the checks here are about what gets applied."""
    base = os.path.relpath(DEPLOY, tmp_path)  # kustomize refuses absolute paths to other kustomizations
    overlay = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [base]}
    if RENDERINGS[name] is not None:
        overlay["components"] = [os.path.relpath(RENDERINGS[name], tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
    built, ours = comparable(kustomize_build(tmp_path)), comparable(render(RENDERINGS[name]))
    assert built.keys() == ours.keys()
    for key, doc in ours.items():
        assert built[key] == doc, f"kustomize renders {key} differently from this test"


# -- command lines -------------------------------------------------------------


def env_values(container: dict[str, Any]) -> dict[str, str]:
    """What each of the container's env vars holds at run time (placeholders for Secrets and fields)."""
    values: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            values[var["name"]] = expand(var["value"], values, f"env {var['name']}")
        elif "fieldRef" in var.get("valueFrom", {}):
            values[var["name"]] = FIELD_PLACEHOLDERS.get(var["valueFrom"]["fieldRef"]["fieldPath"], "field")
        else:
            values[var["name"]] = SECRET_PLACEHOLDER
    return values


def expand(text: str, values: dict[str, str], where: str) -> str:
    """The kubelet's $(VAR) expansion; an undefined VAR is an error here (there it stays literal)."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        assert m.group(1) in values, f"{where}: $({m.group(1)}) is not defined in the container's env"
        return values[m.group(1)]

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def command_lines(docs: list[dict[str, Any]]) -> Iterator[tuple[str, list[str]]]:
    """(where, argv) for each container's command + args and each exec probe or hook."""
    for owner, pod in pod_specs(docs):
        for c in containers(pod):
            where = f"{label(owner)} container {c['name']}"
            values = env_values(c)
            argv = [expand(a, values, where) for a in c.get("command", []) + c.get("args", [])]
            if argv:
                yield where, argv
            execs = [(name, c[name].get("exec")) for name in ("startupProbe", "readinessProbe", "livenessProbe")
                     if name in c]
            execs += [(f"lifecycle.{hook}", h.get("exec")) for hook, h in c.get("lifecycle", {}).items()]
            for name, exe in execs:
                if exe:
                    # exec commands are not expanded by the kubelet: a $(VAR) there stays literal.
                    assert not any("$(" in a for a in exe["command"]), f"{where} {name}: $(VAR) is never expanded here"
                    yield f"{where} {name}", list(exe["command"])


def zdistill_cli(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) if argv runs a zdistill CLI, else None."""
    prog = argv[0].rsplit("/", 1)[-1]
    if prog in CLIS:
        return CLIS[prog], argv[1:]
    if prog.startswith("python") and argv[1:2] == ["-m"] and argv[2:3] and argv[2] in CLIS.values():
        return argv[2], argv[3:]
    return None


def parse(module: str, args: list[str]):
    """``build_parser().parse_args(args)``, turning argparse's exit into an assertion with its message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return importlib.import_module(module).build_parser().parse_args(args)
        except SystemExit as exc:
            message = err.getvalue().strip().splitlines()[-1:] or [f"exit {exc.code}"]
            raise AssertionError(f"{module} rejects {shlex.join(args)!r}: {message[0]}") from None


def test_zdistill_command_lines_parse(docs):
    """Every zdistill command line in the manifests is accepted by its CLI, as written."""
    failures, seen = [], set()
    for where, argv in command_lines(docs):
        cli = zdistill_cli(argv)
        if cli is None:
            continue
        seen.add(cli[0])
        try:
            parse(*cli)
        except AssertionError as exc:
            failures.append(f"{where}: {exc}")
    assert not failures, "\n".join(failures)
    assert seen == set(CLIS.values()), f"expected a command line for each CLI, saw only {sorted(seen)}"


def test_no_password_on_a_command_line(docs):
    """The Redis password reaches the daemons through ZDISTILL_DB_PASSWD, never argv (visible in ps)."""
    for owner, pod in pod_specs(docs):
        for c in containers(pod):
            argv = c.get("command", []) + c.get("args", [])
            where = f"{label(owner)} container {c['name']}"
            for flag in ("--db_passwd", "--db-passwd"):
                assert not any(a == flag or a.startswith(flag + "=") for a in argv), f"{where}: uses {flag}"
            if "--requirepass" in argv:  # Redis itself: only from a Secret, through the kubelet's $(VAR)
                value = argv[argv.index("--requirepass") + 1]
                assert re.fullmatch(r"\$\(\w+\)", value), f"{where}: a literal --requirepass"


# -- cross-object consistency ----------------------------------------------------


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def container_running(docs, module: str) -> list[tuple[dict, dict, dict, Any]]:
    """(owner, pod, container, parsed args) for each container whose command is this CLI."""
    out = []
    for owner, pod in pod_specs(docs):
        for c in pod["spec"]["containers"]:
            argv = [expand(a, env_values(c), c["name"]) for a in c.get("command", []) + c.get("args", [])]
            cli = argv and zdistill_cli(argv)
            if cli and cli[0] == module:
                out.append((owner, pod, c, parse(*cli)))
    return out


def probe_args(container: dict[str, Any], probe: str) -> Any:
    exe = container.get(probe, {}).get("exec")
    assert exe, f"container {container['name']} has no exec {probe}"
    cli = zdistill_cli(exe["command"])
    assert cli and cli[0] == "zdistill.cli", f"{container['name']} {probe} is not a zdistill command"
    return parse(*cli)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_probes_ping_the_daemon_they_guard(docs):
    """Readiness and liveness are `zdistill ping` on the daemon's own port, through localhost."""
    expected = {"zdistill.teacher.server": ("teacher", lambda a: a.port),
                "zdistill.discovery.balancer": ("balancer", lambda a: port_of(a.server))}
    for module, (kind, port) in expected.items():
        running = container_running(docs, module)
        assert running, f"no container runs {module}"
        for owner, _, c, args in running:
            for probe in ("readinessProbe", "livenessProbe"):
                ping = probe_args(c, probe)
                assert (ping.command, ping.kind) == ("ping", kind), f"{label(owner)} {probe}"
                assert ping.address == f"127.0.0.1:{port(args)}", f"{label(owner)} {probe} pings {ping.address}"
                assert c[probe]["timeoutSeconds"] > ping.timeout, f"{label(owner)} {probe}: kubelet gives up first"


def test_ports_and_metrics_are_declared(docs):
    """Every port a daemon listens on is a containerPort; scrape annotations name a metrics port."""
    for owner, pod in pod_specs(docs):
        declared = {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        annotations = pod["metadata"].get("annotations", {})
        if "prometheus.io/port" in annotations:
            assert int(annotations["prometheus.io/port"]) in declared, f"{label(owner)}: scrape port not declared"
    for module in CLIS.values():
        for owner, _, c, args in container_running(docs, module):
            ports = {p["containerPort"] for p in c.get("ports", [])}
            wanted = {getattr(args, "metrics_port", None), getattr(args, "port", None), getattr(args, "pub_port", None)}
            if getattr(args, "server", None) and module == "zdistill.discovery.balancer":
                wanted.add(port_of(args.server))
            missing = {p for p in wanted if p} - ports
            assert not missing, f"{label(owner)} {c['name']}: listens on {sorted(missing)} but does not declare it"
            assert getattr(args, "metrics_port", None), f"{label(owner)} {c['name']}: no --metrics-port"


def test_teacher_gets_a_gpu(docs):
    for owner, _, c, args in container_running(docs, "zdistill.teacher.server"):
        assert str(c["resources"]["limits"].get("nvidia.com/gpu")) == "1", f"{label(owner)}: no GPU limit"
        assert args.gpu_ids == "0", f"{label(owner)}: serve on the one GPU the container sees"


def test_every_container_has_resources(docs):
    for owner, pod in pod_specs(docs):
        for c in containers(pod):
            res = c.get("resources", {})
            assert res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), \
                f"{label(owner)} {c['name']}: memory request and limit"


def test_references_resolve(docs):
    """Secrets, keys, ConfigMaps, claims and Service selectors named in one object exist in another."""
    for owner, pod in pod_specs(docs):
        for c in containers(pod):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = find(docs, "Secret", ref["name"])
                    assert secret, f"{label(owner)}: Secret {ref['name']} is not in the manifests"
                    keys = {**secret.get("data", {}), **secret.get("stringData", {})}
                    assert ref["key"] in keys, f"{label(owner)}: Secret {ref['name']} has no key {ref['key']}"
            mounted = {v["name"] for v in pod["spec"].get("volumes", [])}
            for m in c.get("volumeMounts", []):
                assert m["name"] in mounted, f"{label(owner)} {c['name']}: mounts undefined volume {m['name']}"
        for vol in pod["spec"].get("volumes", []):
            if "secret" in vol:
                secret = find(docs, "Secret", vol["secret"]["secretName"])
                assert secret, f"{label(owner)}: Secret {vol['secret']['secretName']} is not in the manifests"
                keys = {**secret.get("data", {}), **secret.get("stringData", {})}
                for item in vol["secret"].get("items", []):
                    assert item["key"] in keys, f"{label(owner)}: {vol['name']} wants missing key {item['key']}"
                mode = vol["secret"].get("defaultMode", 0o644)
                assert mode & 0o004 or pod["spec"].get("securityContext", {}).get("fsGroup") is not None, \
                    f"{label(owner)}: {vol['name']} is not world-readable, so the pod needs an fsGroup to read it"
            if "configMap" in vol:
                assert find(docs, "ConfigMap", vol["configMap"]["name"]), f"{label(owner)}: no {vol['configMap']}"
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                assert find(docs, "PersistentVolumeClaim", claim), f"{label(owner)}: no claim {claim}"
    templates = [pod["metadata"]["labels"] for _, pod in pod_specs(docs)]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), f"{label(svc)} selects no pod"
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        svc = find(docs, "Service", sts["spec"]["serviceName"])
        assert svc and svc["spec"].get("clusterIP") == "None", f"{label(sts)}: its serviceName must be headless"


def test_students_reach_every_balancer_by_a_stable_name(docs):
    """Students list each balancer replica by its StatefulSet DNS name, and each advertises that name.

    A standby redirects to the leader's advertised address and the leader's PUB
    socket is advertised too, so both must be names a student can dial.
    """
    ((owner, _, _, bal),) = container_running(docs, "zdistill.discovery.balancer")
    assert owner["kind"] == "StatefulSet", "balancers need stable per-pod names (see balancer.yaml)"
    svc, replicas, port = owner["spec"]["serviceName"], owner["spec"]["replicas"], port_of(bal.server)
    raw_args = next(c for c in owner["spec"]["template"]["spec"]["containers"]
                    if "zdistill-balancer" in c.get("command", []))["args"]
    assert raw_args[raw_args.index("--advertise") + 1].startswith(f"$(POD_NAME).{svc}."), "advertise the pod's name"
    expected = {f"{owner['metadata']['name']}-{i}.{svc}:{port}" for i in range(replicas)}
    services = {args.service_name for *_, args in container_running(docs, "zdistill.discovery.register")}
    students = [(o, c) for o, pod in pod_specs(docs) for c in pod["spec"]["containers"]
                if any(v["name"] == "PADDLE_DISTILL_BALANCE_SERVER" for v in c.get("env", []))]
    assert students, "no example student"
    for o, c in students:
        env = env_values(c)
        listed = {a.strip() for a in env["PADDLE_DISTILL_BALANCE_SERVER"].split(",")}
        assert listed == expected, f"{label(o)}: lists {sorted(listed)}, the balancers are {sorted(expected)}"
        assert env["PADDLE_DISTILL_SERVICE_NAME"] in services, f"{label(o)}: no teacher registers that service"


def mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str, docs) -> bool:
    """Whether ``path`` (a file, or a mounted folder) is provided by one of the container's Secret mounts."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for m in container.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/")
        if path != root and not path.startswith(root + "/"):
            continue
        rel, vol = path[len(root) + 1:], volumes.get(m["name"], {})
        if not rel or "secret" not in vol:
            return not rel or "persistentVolumeClaim" in vol
        secret = find(docs, "Secret", vol["secret"]["secretName"]) or {}
        files = ({i["path"] for i in vol["secret"]["items"]} if "items" in vol["secret"]
                 else {**secret.get("data", {}), **secret.get("stringData", {})}.keys())
        return rel in files
    return False


def test_curve_is_all_or_nothing(docs):
    """CURVE on one server needs it on all, and key files on every client.

    A client is given one server public key (ZDISTILL_CURVE_SERVER_KEY) and uses it
    for teachers and balancers alike, so a mixed deployment cannot work; and a
    client without the keys (a probe, the register, a student) is simply never
    answered. Every key path must also be a file some Secret mount provides.
    """
    servers = [hit for m in ("zdistill.teacher.server", "zdistill.discovery.balancer")
               for hit in container_running(docs, m)]
    on = {label(o): bool(a.curve_secret_key) for o, _, _, a in servers}
    assert len(set(on.values())) == 1, f"CURVE on some servers only: {on}"
    clients = []
    for owner, pod in pod_specs(docs):
        for c in pod["spec"]["containers"]:
            argv = c.get("command", []) + c.get("args", [])
            probes = [c[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
                      if "exec" in c.get(p, {})]
            env = {v["name"] for v in c.get("env", [])}
            if "zdistill-register" in argv or "PADDLE_DISTILL_BALANCE_SERVER" in env or any(
                    zdistill_cli(p) for p in probes):
                clients.append((owner, pod, c))
    assert clients
    # With an allow-list, a client's own key pair must be in it: an ephemeral one is refused.
    needed = {"ZDISTILL_CURVE_SERVER_KEY"} if any(on.values()) else set()
    if any(a.curve_allow for *_, a in servers):
        needed.add("ZDISTILL_CURVE_CLIENT_KEY")
    for owner, pod, c in clients:
        env = env_values(c)
        has = {var for var in env if var.startswith("ZDISTILL_CURVE_")}
        assert has == needed, f"{label(owner)} {c['name']}: has {sorted(has)}, needs {sorted(needed)} (servers: {on})"
        for var in ("ZDISTILL_CURVE_SERVER_KEY", "ZDISTILL_CURVE_CLIENT_KEY"):
            if var in env:
                assert mounted_file(pod, c, env[var], docs), f"{label(owner)} {c['name']}: {var}={env[var]} not mounted"
    for owner, pod, c, args in servers:
        for path in filter(None, (args.curve_secret_key, args.curve_allow)):
            assert mounted_file(pod, c, path, docs), f"{label(owner)} {c['name']}: {path} is not mounted"


def test_example_scripts_compile(docs):
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for name, text in cm.get("data", {}).items():
            if name.endswith(".py"):
                compile(text, f"{label(cm)}/{name}", "exec")


def test_pods_meet_the_restricted_pod_security_standard(docs):
    """namespace.yaml enforces "restricted": a pod that does not meet it is refused at creation."""
    ns = next(d for d in docs if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"
    for owner, pod in pod_specs(docs):
        ctx = pod["spec"].get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True, f"{label(owner)}: runAsNonRoot"
        assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label(owner)}: seccomp"
        for c in containers(pod):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{label(owner)} {c['name']}: privilege escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label(owner)} {c['name']}: drop ALL"


def test_the_json_patch_helper_refuses_to_overwrite():
    """The stricter-than-RFC ``add`` above is what keeps Component patches from clobbering the base."""
    doc = {"env": [{"name": "A"}]}
    apply_json_patch(doc, [{"op": "add", "path": "/env/-", "value": {"name": "B"}}], "t")
    assert doc == {"env": [{"name": "A"}, {"name": "B"}]}
    with pytest.raises(AssertionError, match="would replace"):
        apply_json_patch(copy.deepcopy(doc), [{"op": "add", "path": "/env", "value": []}], "t")
