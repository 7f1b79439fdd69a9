"""What ``zdistill status`` reports: the system as Redis (and a balancer, if asked) sees it.

Read-only.  Per service: each teacher (address, device, max batch, how long ago its
register last refreshed it, how many students use it) and each student (its
teachers, the version of its list); plus the leading balancer, and the records that
were skipped as malformed (the balancers skip them too).  A heartbeat's age comes
from the record's remaining TTL, so no clock needs to agree with another.

Exit codes (:func:`exit_code`), so that scripts and probes can use it:

- 0: Redis answered (and the balancer asked about with ``--balancer`` too);
- 1: Redis is unreachable or refused the password;
- 2: bad arguments (a malformed ``--db_endpoints``, an unreadable password file);
- 3: Redis answered, but the balancer asked about did not answer as a balancer.
"""

from __future__ import annotations

from typing import Any

import redis

from zdistill.discovery.client import ask_balancer
from zdistill.discovery.messages import StatusReply, StatusRequest
from zdistill.discovery.store import Store, describe, students_by_service
from zdistill.errors import WrongTypeError
from zdistill.wire import ErrorReply

EXIT_OK = 0
EXIT_REDIS_DOWN = 1
EXIT_BALANCER_DOWN = 3
_PROBLEMS_SHOWN = 20


def collect_status(
    endpoint: str, password: str | None, balancer: str | None, timeout: float, now: float
) -> dict[str, Any]:
    """The report as plain data (what ``--json`` prints)."""
    report: dict[str, Any] = {"redis": {"endpoint": describe(endpoint), "ok": False}, "services": {}, "leader": None,
                              "problems": {}}
    store = Store.open(endpoint, password, timeout=timeout)
    problems: dict[str, str] = report["problems"]
    try:
        teachers = store.all_teachers(problems)
        try:
            students = store.load_students(problems)
        except WrongTypeError as exc:
            problems[store.students_key] = str(exc)
            students = {}
        leader = store.get_leader(problems)
        ages = {}
        for service, records in teachers.items():
            for address, rec in records.items():
                left_ms = store.r.pttl(store.teacher_key(service, address))
                ages[(service, address)] = (rec.ttl_ms - left_ms) / 1000 if rec.ttl_ms and left_ms > 0 else None
    except redis.AuthenticationError:
        report["redis"]["error"] = "Redis refused the password (or needs one: --db_passwd_file / $ZDISTILL_DB_PASSWD)"
    except redis.RedisError as exc:
        report["redis"]["error"] = f"Redis unreachable: {type(exc).__name__}: {exc}"
    else:
        report["redis"]["ok"] = True
        if leader is not None:
            report["leader"] = {"server": leader.server, "pub": leader.pub,
                                "leading_for_s": round(now - leader.since, 1)}
        report["services"] = _services(teachers, students, ages)
    finally:
        store.close()
    if balancer:
        report["balancer"] = _ask_balancer(balancer, timeout)
    return report


def _services(teachers: dict, students: dict, ages: dict) -> dict[str, Any]:
    services: dict[str, Any] = {}
    grouped = students_by_service(students)
    for service in sorted(set(teachers) | set(grouped)):
        mine = grouped.get(service, {})
        load: dict[str, int] = {}
        for rec in mine.values():
            for t in rec.teachers:
                load[t] = load.get(t, 0) + 1
        services[service] = {
            "teachers": [
                {
                    "address": address,
                    "device": rec.device,
                    "max_batch_size": rec.max_batch_size,
                    "heartbeat_age_s": None if ages.get((service, address)) is None
                    else round(ages[(service, address)], 2),
                    "students": load.get(address, 0),
                    "host": rec.host,
                }
                for address, rec in sorted(teachers.get(service, {}).items())
            ],
            "students": [
                {"student": sid, "max_teachers": rec.max_teachers, "version": rec.version, "teachers": rec.teachers}
                for sid, rec in sorted(mine.items())
            ],
        }
    return services


def _ask_balancer(address: str, timeout: float) -> dict[str, Any]:

    reply = ask_balancer(address, StatusRequest(id=1), timeout)
    info: dict[str, Any] = {"address": address, "reachable": isinstance(reply, StatusReply)}
    if reply is None:
        info["error"] = f"no answer in {timeout:g} s"
    elif not isinstance(reply, StatusReply):
        said = reply.message if isinstance(reply, ErrorReply) else reply.__struct_config__.tag
        info["error"] = f"answered, but not as a zdistill balancer ({said[:200]})"
    else:
        info.update({k: getattr(reply, k) for k in ("leading", "leader", "epoch", "redis", "students")})
    return info


def exit_code(report: dict[str, Any]) -> int:
    """0 when everything asked about answered; see the module docstring for the others."""
    if not report["redis"]["ok"]:
        return EXIT_REDIS_DOWN
    if "balancer" in report and not report["balancer"]["reachable"]:
        return EXIT_BALANCER_DOWN
    return EXIT_OK


def render_status(report: dict[str, Any]) -> str:
    """The report as text for a person at a shell."""
    lines = [f"Redis {report['redis']['endpoint']}: " + ("ok" if report["redis"]["ok"] else report["redis"]["error"])]
    if "balancer" in report:
        b = report["balancer"]
        lines.append(f"balancer {b['address']}: " + (
            f"{'leading' if b.get('leading') else 'standby'}, {b.get('students')} students, "
            f"redis {'ok' if b.get('redis') else 'unreachable'}" if b["reachable"] else b["error"]))
    if not report["redis"]["ok"]:
        return "\n".join(lines) + "\n"
    leader = report.get("leader")
    lines.insert(1, f"leader balancer: {leader['server']} (for {leader['leading_for_s']} s)" if leader
                 else "leader balancer: none")
    problems = report["problems"]
    if problems:
        lines.append(f"skipped {len(problems)} malformed records (the balancers skip them too):")
        lines += [f"  {key}: {why}" for key, why in list(problems.items())[:_PROBLEMS_SHOWN]]
        if len(problems) > _PROBLEMS_SHOWN:
            lines.append(f"  and {len(problems) - _PROBLEMS_SHOWN} more (--json lists them all)")
    if not report["services"]:
        lines.append("no service has teachers or students")
    for service, info in report["services"].items():
        lines.append("")
        lines.append(f"service {service}: {len(info['teachers'])} teachers, {len(info['students'])} students")
        for t in info["teachers"]:
            age = "?" if t["heartbeat_age_s"] is None else f"{t['heartbeat_age_s']:.1f} s"
            lines.append(f"  teacher {t['address']:<22} {t['device'] or '?':<8} max batch {t['max_batch_size']:<5} "
                         f"heartbeat {age:>7} ago  students {t['students']}")
        for s in info["students"]:
            lines.append(f"  student {s['student']:<30} v{s['version']:<4} teachers "
                         f"{', '.join(s['teachers']) or '-'} (max {s['max_teachers']})")
    return "\n".join(lines) + "\n"
