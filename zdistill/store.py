"""The Redis records of dynamic teachers: one key schema, and every operation on it.

Redis is where the control plane's state lives, so that any daemon can die and its
successor carries on.  Each key has exactly one writer:

| key (P: prefix, ``zdistill``)   | type   | TTL          | writer           | value                                   |
|---------------------------------|--------|--------------|------------------|-----------------------------------------|
| ``P:teacher:{service}:{ip:port}`` | string | ``--ttl``  | register daemon  | JSON TeacherRecord: address, service,   |
|                                 |        |              |                  | feeds, fetches, max_batch_size, device, |
|                                 |        |              |                  | ttl_ms, token, host, pid, registered_at |
| ``P:leader``                    | string | leader lease | leading balancer | JSON LeaderRecord: token, server        |
|                                 |        |              |                  | (ROUTER address), pub (PUB endpoint)    |
| ``P:epoch``                     | string | none         | leading balancer | random id of this assignment history:   |
|                                 |        |              |                  | versions restart only when it changes   |
| ``P:students``                  | hash   | none         | leading balancer | field = student id, value = JSON        |
|                                 |        |              |                  | StudentRecord: service, max_teachers,   |
|                                 |        |              |                  | version, teachers                       |

Why these shapes:

- A teacher record is written by one ``SET key value PX ttl`` (with ``GET`` to learn
  whether the key had been lost): there is no moment at which the key exists without
  its TTL, unlike EDL's ``HMSET`` then ``EXPIRE``.  Refreshing writes the whole record
  again, so a lost key (Redis restarted, key evicted) comes back at the next refresh.
  Removal compares the record's random ``token`` first, so a stopping register never
  deletes a newer register's record for the same address.
- Teacher keys carry service and address in their name, so a keyspace notification
  (``__keyspace@db__:P:teacher:svc:ip:port`` + ``set``/``del``/``expired``) says what
  changed without another read, and one ``SCAN`` lists every service.
- The leader lease is ``SET NX PX`` and is refreshed and released by compare-and-set
  scripts.  Every write to ``P:students``/``P:epoch`` is a script that first checks the
  caller still holds the lease (a fencing check), so a deposed leader writes nothing.
- Students and their assignments share one hash because they change together and
  have one owner; a restarted or new leader reads it back and resumes the same
  assignment, versions included, so students see no churn.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from zdistill.errors import ConfigError

log = logging.getLogger("zdistill.store")

DEFAULT_PREFIX = "zdistill"
SERVICE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]{1,255}:[0-9]{1,5}$")
STUDENT_RE = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
MAX_TEACHERS_LIMIT = 100_000

# Compare-and-delete: only the writer of a value may remove it.
_DELETE_IF = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# Compare-and-extend: a lease is only refreshed by its holder.
_EXTEND_IF = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
# A fenced write of the leader's state: nothing happens unless KEYS[1] still holds ARGV[1].
# ARGV: leader value, epoch ('' = leave it), number of HSET pairs, pairs..., then fields to HDEL.
_FENCED_WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[3], ARGV[2]) end
local n = tonumber(ARGV[3])
local i = 4
for _ = 1, n do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  i = i + 1
end
return 1
"""


def check_service(name: str) -> str:
    if not isinstance(name, str) or not SERVICE_RE.match(name):
        raise ConfigError(f"service name {name!r:.80} must be 1-128 characters of letters, digits, '_', '.', '-'")
    return name


def check_address(address: str) -> str:
    if not isinstance(address, str) or not ADDRESS_RE.match(address):
        raise ConfigError(f"teacher address {address!r:.80} is not IP:PORT")
    return address


def check_student(student_id: str) -> str:
    if not isinstance(student_id, str) or not STUDENT_RE.match(student_id):
        raise ConfigError(f"student id {student_id!r:.80} must be 1-128 characters of letters, digits, '_.:@-'")
    return student_id


# -- connecting ----------------------------------------------------------------


def describe(endpoint: str) -> str:
    """``endpoint`` fit for a log line: whatever precedes an ``@`` (a password) is masked.

    Also without a scheme (``:pw@host:port`` is a typo, not a URL, and still a secret).
    """
    endpoint = endpoint.strip()
    creds, at, host = endpoint.rpartition("@")
    if not at:
        return endpoint
    scheme = _SCHEME_RE.match(creds)
    prefix = scheme.group(0) if scheme else ""
    userinfo = creds[len(prefix):]
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{prefix}{user}:***@{host}"


def _port(text: str, endpoint: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ConfigError(f"--db_endpoints {describe(endpoint)!r:.200}: the port must be 1..65535")
    return int(text)


def connect(endpoint: str, password: str | None = None, timeout: float = 2.0) -> redis.Redis:
    """A Redis client for ``HOST:PORT`` (plus ``password``) or a redis://, rediss://, unix:// URL.

    Commands fail fast (no hidden retries, short socket timeouts): each daemon has its
    own retry loop and must stay responsive while Redis is away.  The password is
    handed to redis-py only; nothing here logs it, and every error names the endpoint
    through :func:`describe`.  A malformed endpoint raises :class:`ConfigError`.
    """
    endpoint = endpoint.strip()
    shown = describe(endpoint)
    if "," in endpoint:
        raise ConfigError(f"--db_endpoints takes one Redis endpoint, got {shown!r:.200}")
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"--db_endpoints {shown!r:.200}: the scheme must be redis://, rediss:// or unix://")
        if parts.scheme != "unix":
            if not parts.hostname:
                raise ConfigError(f"--db_endpoints {shown!r:.200} names no host")
            netloc_port = parts.netloc.rpartition("@")[2].rpartition("]")[2]
            if ":" in netloc_port:
                _port(netloc_port.rpartition(":")[2], endpoint)
        if parts.password and password:
            raise ConfigError("the Redis password is given twice: in the --db_endpoints URL and in --db_passwd, "
                              "--db_passwd_file or $ZDISTILL_DB_PASSWD; give it once")
        if password:
            common["password"] = password
        try:
            return redis.Redis.from_url(endpoint, **common)
        except ValueError as exc:
            raise ConfigError(f"--db_endpoints {shown!r:.200} is not a Redis URL ({type(exc).__name__})") from None
    if "@" in endpoint:
        raise ConfigError(f"--db_endpoints {shown!r:.200}: a password goes in a redis:// URL "
                          "(redis://:PASSWORD@HOST:PORT), or better in --db_passwd_file")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--db_endpoints must be HOST:PORT or a redis:// URL, got {shown!r:.200}")
    return redis.Redis(host=host.strip("[]"), port=_port(port, endpoint), password=password or None, **common)


# -- records -------------------------------------------------------------------


@dataclass
class TeacherRecord:
    """What ``zdistill-register`` knows about a teacher, from the teacher's own ``meta``."""

    address: str
    service: str
    feeds: list[dict[str, Any]] = field(default_factory=list)
    fetches: list[dict[str, Any]] = field(default_factory=list)
    max_batch_size: int = 0
    device: str = ""
    description: str = ""
    ttl_ms: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    registered_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TeacherRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("teacher record is not a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        rec = cls(**known)
        check_address(rec.address)
        check_service(rec.service)
        return rec


@dataclass
class StudentRecord:
    """A student as the leader keeps it: what it asked for and what it was given."""

    student_id: str
    service: str
    max_teachers: int
    version: int = 0
    teachers: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = {"service": self.service, "max_teachers": self.max_teachers, "version": self.version,
                "teachers": self.teachers}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, student_id: str, text: str) -> StudentRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("student record is not a JSON object")
        teachers = data.get("teachers", [])
        if not isinstance(teachers, list) or not all(isinstance(t, str) for t in teachers):
            raise ValueError("student record's teachers is not a list of addresses")
        return cls(check_student(student_id), check_service(data["service"]), int(data["max_teachers"]),
                   int(data.get("version", 0)), list(teachers))


@dataclass(frozen=True)
class LeaderRecord:
    """Who leads: ``server`` is the ROUTER address students use, ``pub`` its PUB endpoint."""

    token: str
    server: str
    pub: str
    since: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LeaderRecord:
        data = json.loads(text)
        return cls(str(data["token"]), str(data["server"]), str(data["pub"]), float(data["since"]))


# -- the store -----------------------------------------------------------------


class Store:
    """Every read and write of zdistill's Redis keys.  Redis errors propagate as
    :class:`redis.RedisError`; callers decide whether to retry."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.r = client
        self.prefix = prefix
        self._delete_if = client.register_script(_DELETE_IF)
        self._extend_if = client.register_script(_EXTEND_IF)
        self._fenced_write = client.register_script(_FENCED_WRITE)

    @classmethod
    def open(cls, endpoint: str, password: str | None = None, prefix: str = DEFAULT_PREFIX,
             timeout: float = 2.0) -> Store:
        return cls(connect(endpoint, password, timeout), prefix)

    def close(self) -> None:
        self.r.close()

    def ping(self) -> bool:
        return bool(self.r.ping())

    # keys
    def teacher_key(self, service: str, address: str) -> str:
        return f"{self.prefix}:teacher:{service}:{address}"

    @property
    def teacher_pattern(self) -> str:
        return f"{self.prefix}:teacher:*"

    @property
    def leader_key(self) -> str:
        return f"{self.prefix}:leader"

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}:epoch"

    @property
    def students_key(self) -> str:
        return f"{self.prefix}:students"

    def parse_teacher_key(self, key: str) -> tuple[str, str] | None:
        """``P:teacher:svc:ip:port`` -> ``(svc, "ip:port")``, or None for any other key."""
        head = f"{self.prefix}:teacher:"
        if not key.startswith(head):
            return None
        service, sep, address = key[len(head):].partition(":")
        if not sep or not SERVICE_RE.match(service) or not ADDRESS_RE.match(address):
            return None
        return service, address

    # -- teachers (written by zdistill-register) --------------------------------

    def register_teacher(self, record: TeacherRecord, ttl: float) -> bool:
        """Write ``record`` with its TTL in one command; True if the key already existed.

        ``False`` on a refresh means the record had been lost (expired while the teacher
        was unhealthy, or Redis restarted) and this call put it back.
        """
        ttl_ms = max(1, int(ttl * 1000))
        record.ttl_ms = ttl_ms
        record.registered_at = time.time()
        key = self.teacher_key(check_service(record.service), check_address(record.address))
        old = self.r.set(key, record.to_json(), px=ttl_ms, get=True)
        return old is not None

    def unregister_teacher(self, record: TeacherRecord) -> bool:
        """Remove the record at once if it is still ours (same token); True if removed."""
        key = self.teacher_key(record.service, record.address)
        current = self.r.get(key)
        if current is None:
            return False
        try:
            token = json.loads(current).get("token")
        except (ValueError, AttributeError):
            return False
        if token != record.token:
            return False
        return bool(self._delete_if(keys=[key], args=[current]))

    def get_teacher(self, service: str, address: str) -> TeacherRecord | None:
        text = self.r.get(self.teacher_key(service, address))
        if text is None:
            return None
        try:
            return TeacherRecord.from_json(text)
        except (ValueError, TypeError, KeyError, ConfigError):
            log.warning("ignoring a malformed record for teacher %s of %s", address, service)
            return None

    def all_teachers(self) -> dict[str, dict[str, TeacherRecord]]:
        """Every live teacher: service -> address -> record.  One SCAN plus MGETs."""
        keys = [k for k in self.r.scan_iter(match=self.teacher_pattern, count=1000) if self.parse_teacher_key(k)]
        found: dict[str, dict[str, TeacherRecord]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            for key, text in zip(chunk, self.r.mget(chunk), strict=True):
                if text is None:
                    continue  # expired between SCAN and MGET
                service, address = self.parse_teacher_key(key) or ("", "")
                try:
                    rec = TeacherRecord.from_json(text)
                except (ValueError, TypeError, KeyError, ConfigError):
                    log.warning("ignoring a malformed teacher record at %s", key)
                    continue
                if rec.service != service or rec.address != address:
                    log.warning("ignoring teacher record at %s: it names %s of %s", key, rec.address, rec.service)
                    continue
                found.setdefault(service, {})[address] = rec
        return found

    def list_teachers(self, service: str) -> list[str]:
        """Addresses of the live teachers of one service, sorted."""
        return sorted(self.all_teachers().get(check_service(service), {}))

    def enable_keyspace_events(self) -> bool:
        """Ask Redis to publish changes of our keys; False where CONFIG SET is refused.

        Needs ``K`` (keyspace channel), ``g`` (del), ``$`` (set) and ``x`` (expired);
        flags already set by others are kept.
        """
        try:
            current = self.r.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
            flags = set(current)
            if "A" in flags:
                flags |= set("g$x")
            wanted = flags | set("Kg$x")
            if wanted != flags:
                self.r.config_set("notify-keyspace-events", "".join(sorted(wanted)))
            return True
        except redis.ResponseError as exc:
            log.info("keyspace notifications unavailable (%s); relying on periodic resync", exc)
            return False

    def keyspace_channel_pattern(self) -> str:
        db = self.r.connection_pool.connection_kwargs.get("db", 0) or 0
        return f"__keyspace@{db}__:{self.prefix}:teacher:*"

    def key_from_channel(self, channel: str) -> str:
        return channel.split("__:", 1)[1] if "__:" in channel else ""

    # -- leader lease (balancers) ------------------------------------------------

    def acquire_leader(self, record: LeaderRecord, lease: float) -> bool:
        return bool(self.r.set(self.leader_key, record.to_json(), nx=True, px=max(1, int(lease * 1000))))

    def refresh_leader(self, record: LeaderRecord, lease: float) -> bool:
        return bool(self._extend_if(keys=[self.leader_key], args=[record.to_json(), max(1, int(lease * 1000))]))

    def release_leader(self, record: LeaderRecord) -> bool:
        return bool(self._delete_if(keys=[self.leader_key], args=[record.to_json()]))

    def get_leader(self) -> LeaderRecord | None:
        text = self.r.get(self.leader_key)
        if text is None:
            return None
        try:
            return LeaderRecord.from_json(text)
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring a malformed leader record")
            return None

    # -- students and assignments (leader only, fenced) ------------------------

    def get_epoch(self) -> str | None:
        return self.r.get(self.epoch_key)

    def load_students(self) -> dict[str, StudentRecord]:
        students: dict[str, StudentRecord] = {}
        for sid, text in self.r.hgetall(self.students_key).items():
            try:
                students[sid] = StudentRecord.from_json(sid, text)
            except (ValueError, TypeError, KeyError, ConfigError):
                log.warning("ignoring a malformed student record %r", sid[:80])
        return students

    def write_students(self, leader: LeaderRecord, put: Iterable[StudentRecord] = (),
                       remove: Iterable[str] = (), epoch: str | None = None) -> bool:
        """Save changed students and drop removed ones, only while ``leader`` holds the lease.

        Returns False (and writes nothing) when the lease is someone else's.
        """
        args: list[Any] = [leader.to_json(), epoch or ""]
        pairs: list[str] = []
        for rec in put:
            pairs += [rec.student_id, rec.to_json()]
        args.append(len(pairs) // 2)
        args += pairs
        args += list(remove)
        keys = [self.leader_key, self.students_key, self.epoch_key]
        return bool(self._fenced_write(keys=keys, args=args))


def students_by_service(students: Mapping[str, StudentRecord]) -> dict[str, dict[str, StudentRecord]]:
    grouped: dict[str, dict[str, StudentRecord]] = {}
    for sid, rec in students.items():
        grouped.setdefault(rec.service, {})[sid] = rec
    return grouped
