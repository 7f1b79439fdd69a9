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

Redis is shared, so nothing read from it is trusted: every record is checked (JSON
object, field types and ranges, at most :data:`MAX_RECORD_BYTES`) before use, and a
bad one is skipped with a log line at most once a minute per key
(:class:`~zdistill.errors.RecordError`).  A key of the wrong type raises
:class:`~zdistill.errors.WrongTypeError` naming it; the leader replaces its own keys
(``P:students``, ``P:epoch``) when they are of the wrong type, and a ``P:leader`` that
no balancer can have written (wrong type, or no TTL) is removed before taking the lease.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from zdistill.errors import ConfigError, RecordError, WrongTypeError
from zdistill.triton_address import TritonAddress, is_triton

log = logging.getLogger("zdistill.discovery.store")

DEFAULT_PREFIX = "zdistill"
SERVICE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]{1,255}:[0-9]{1,5}$")
STUDENT_RE = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
EPOCH_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_TEACHERS_LIMIT = 100_000
MAX_RECORD_BYTES = 1 << 20  # a student's list of 100,000 teachers fits; a teacher record is a few KB
MAX_SPECS = 1024  # feeds or fetches of one teacher
MAX_TEXT = 4096  # description, device, host, token
BAD_RECORD_LOG_EVERY = 60.0  # seconds between two log lines about the same bad key

# Compare-and-delete: only the writer of a value may remove it.  (TYPE first: GET on
# a key of another type is an error, and a hash there is nobody's value anyway.)
_DELETE_IF = """
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Compare-and-extend: a lease is only refreshed by its holder.
_EXTEND_IF = """
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Take the lease if free: 1, or 2 after removing a value no balancer can have written
# (another type, or no TTL: every lease is written with one); 0 if someone holds it.
_ACQUIRE = """
local cleared = 0
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and (kind ~= 'string' or redis.call('PTTL', KEYS[1]) < 0) then
  redis.call('DEL', KEYS[1])
  cleared = 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 + cleared end
return 0
"""
# A fenced write of the leader's state: nothing happens unless KEYS[1] still holds ARGV[1].
# ARGV: leader value, epoch ('' = leave it), '1' to replace the whole hash (else update it),
# number of HSET pairs, pairs..., then fields to HDEL.  Returns 1 when written, 0 when the
# lease is not the caller's, -1 when an update finds the hash key of another type.
_FENCED_WRITE = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local kind = redis.call('TYPE', KEYS[2]).ok
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[2])
elseif kind ~= 'hash' and kind ~= 'none' then
  return -1
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[3], ARGV[2]) end
local n = tonumber(ARGV[4])
local i = 5
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


def is_address(address: object) -> bool:
    """``IP:PORT`` (or ``host:PORT``, ``[v6]:PORT``) with a port of 1..65535, or a model on Triton
    (``triton://HOST:PORT/MODEL[/VERSION]``, in its normal form)."""
    if is_triton(address):
        try:
            return str(TritonAddress.parse(address)) == address  # type: ignore[arg-type]
        except ConfigError:
            return False
    if not isinstance(address, str) or not ADDRESS_RE.match(address):
        return False
    return 0 < int(address.rsplit(":", 1)[1]) <= 65535


def check_address(address: str) -> str:
    if not is_address(address):
        raise ConfigError(f"teacher address {address!r:.80} is not IP:PORT with a port of 1..65535, "
                          "nor triton://HOST:PORT/MODEL[/VERSION]")
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


def parse_json(text: str, what: str) -> dict[str, Any]:
    """A record's JSON object, or :class:`RecordError`: too big, too deep, not JSON, not an object."""
    if len(text) > MAX_RECORD_BYTES:
        raise RecordError(f"{what} is {len(text)} bytes, over the limit of {MAX_RECORD_BYTES}")
    try:
        data = json.loads(text)
    except RecursionError:
        raise RecordError(f"{what} nests too deep") from None
    except ValueError as exc:
        raise RecordError(f"{what} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{what} is not a JSON object")
    return data


def _int(data: Mapping[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = data.get(name, default)
    if type(value) is not int or not low <= value <= high:  # exact: True is not a count
        raise RecordError(f"{name} must be an integer {low}..{high}, got {_show(value)}")
    return value


def _text(data: Mapping[str, Any], name: str, default: str = "", limit: int = MAX_TEXT) -> str:
    value = data.get(name, default)
    if not isinstance(value, str) or len(value) > limit:
        raise RecordError(f"{name} must be a string of at most {limit} characters, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    """A value in an error message: its type, and its text cut short (a record may be hostile)."""
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _specs(data: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """Feeds or fetches: ``[{"name", "dtype", "shape"}]`` as a teacher's ``meta`` describes them."""
    specs = data.get(name, [])
    if not isinstance(specs, list) or len(specs) > MAX_SPECS:
        raise RecordError(f"{name} must be a list of at most {MAX_SPECS} tensor specs, got {_show(specs)}")
    for spec in specs:
        if not isinstance(spec, dict):
            raise RecordError(f"{name} must hold objects, got {_show(spec)}")
        _text(spec, "name", limit=256)
        _text(spec, "dtype", limit=32)
        shape = spec.get("shape")
        if not isinstance(shape, list) or len(shape) > 32 or not all(type(d) is int and d >= -1 for d in shape):
            raise RecordError(f"{name}: shape must be a list of sizes (-1: any), got {_show(shape)}")
    return specs


def teacher_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a teacher record from the teacher's own ``meta`` reply, checked.

    The register writes what a teacher says about itself into Redis, where every
    balancer and ``zdistill status`` reads it: a teacher with odd meta must be refused
    here, not crash its readers.  A long description is cut, not refused.
    """
    description = meta.get("description") or ""
    if not isinstance(description, str):
        raise RecordError(f"description must be a string, got {_show(description)}")
    return {
        "feeds": _specs(meta, "feeds"),
        "fetches": _specs(meta, "fetches"),
        "max_batch_size": _int(meta, "max_batch_size", 1, 2**31 - 1),
        "device": _text(meta, "device", limit=256),
        "description": description[:MAX_TEXT],
    }


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
        """The record, every field checked; :class:`RecordError` names the first bad one."""
        data = parse_json(text, "teacher record")
        address, service = data.get("address"), data.get("service")
        if not is_address(address):
            raise RecordError(f"address must be IP:PORT with a port of 1..65535, got {_show(address)}")
        if not isinstance(service, str) or not SERVICE_RE.match(service):
            raise RecordError(f"service must be 1-128 of [A-Za-z0-9_.-], got {_show(service)}")
        registered_at = data.get("registered_at", 0.0)
        if type(registered_at) not in (int, float) or not 0 <= registered_at < 1e11:
            raise RecordError(f"registered_at must be a time in seconds, got {_show(registered_at)}")
        return cls(
            address, service, _specs(data, "feeds"), _specs(data, "fetches"),
            _int(data, "max_batch_size", 0, 2**31 - 1, 0), _text(data, "device", limit=256),
            _text(data, "description"), _int(data, "ttl_ms", 0, 2**31 - 1, 0), _text(data, "token", limit=128),
            _text(data, "host", limit=255), _int(data, "pid", 0, 2**31 - 1, 0), float(registered_at),
        )


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
        """The record, every field checked; :class:`RecordError` names the first bad one."""
        if not isinstance(student_id, str) or not STUDENT_RE.match(student_id):
            raise RecordError(f"student id must be 1-128 of [A-Za-z0-9_.:@-], got {_show(student_id)}")
        data = parse_json(text, "student record")
        service = data.get("service")
        if not isinstance(service, str) or not SERVICE_RE.match(service):
            raise RecordError(f"service must be 1-128 of [A-Za-z0-9_.-], got {_show(service)}")
        teachers = data.get("teachers", [])
        if not isinstance(teachers, list) or len(teachers) > MAX_TEACHERS_LIMIT or not all(map(is_address, teachers)):
            raise RecordError(f"teachers must be a list of IP:PORT addresses, got {_show(teachers)}")
        if len(set(teachers)) != len(teachers):
            raise RecordError("teachers names one teacher twice")
        return cls(student_id, service, _int(data, "max_teachers", 1, MAX_TEACHERS_LIMIT),
                   _int(data, "version", 0, 2**62, 0), list(teachers))


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
        """The record, every field checked; :class:`RecordError` names the first bad one."""
        data = parse_json(text, "leader record")
        server, since = data.get("server"), data.get("since")
        if not is_address(server):
            raise RecordError(f"server must be IP:PORT, got {_show(server)}")
        if type(since) not in (int, float) or not 0 <= since < 1e11:
            raise RecordError(f"since must be a time in seconds, got {_show(since)}")
        return cls(_text(data, "token", limit=128), server, _text(data, "pub", limit=512), float(since))


# -- the store -----------------------------------------------------------------

Problems = MutableMapping[str, str]  # Redis key -> why its record was skipped


class _Throttle:
    """At most one log line per key per period: a bad record is read again every second."""

    def __init__(self, every: float = BAD_RECORD_LOG_EVERY) -> None:
        self.every = every
        self._last: dict[str, float] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            return
        if len(self._last) >= 10_000:  # many distinct bad keys: forget the old ones, stay bounded
            self._last = {k: t for k, t in self._last.items() if now - t < self.every}
        self._last[key] = now
        log.warning(message, *args)


def _is_wrong_type(exc: redis.RedisError) -> bool:
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("WRONGTYPE")


class Store:
    """Every read and write of zdistill's Redis keys.  Redis errors propagate as
    :class:`redis.RedisError`; callers decide whether to retry.  A key of the wrong
    type raises :class:`WrongTypeError` where the caller must know (``P:students``)
    and reads as absent, with a log line, elsewhere."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.r = client
        self.prefix = prefix
        self._delete_if = client.register_script(_DELETE_IF)
        self._extend_if = client.register_script(_EXTEND_IF)
        self._acquire = client.register_script(_ACQUIRE)
        self._fenced_write = client.register_script(_FENCED_WRITE)
        self._throttle = _Throttle()

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
        if not sep or not SERVICE_RE.match(service) or not is_address(address):
            return None
        return service, address

    # -- reading safely ------------------------------------------------------------

    def _skip(self, key: str, why: str, problems: Problems | None) -> None:
        """A record that cannot be used: one log line per key and minute, and the caller's list."""
        self._throttle.warning(key, "ignoring the record at %s: %s", key, why)
        if problems is not None:
            problems[key] = why

    def _wrong_type(self, key: str, expected: str) -> WrongTypeError:
        try:
            kind = self.r.type(key)
        except redis.RedisError:
            kind = "value of another type"
        return WrongTypeError(f"Redis key {key} holds a {kind}, not a {expected}: it was not written by zdistill")

    def _get(self, key: str, problems: Problems | None = None) -> str | None:
        """GET, with a key of another type read as absent (and reported)."""
        try:
            return self.r.get(key)
        except redis.ResponseError as exc:
            if not _is_wrong_type(exc):
                raise
            self._skip(key, str(self._wrong_type(key, "string")), problems)
            return None

    # -- teachers (written by zdistill-register) --------------------------------

    def register_teacher(self, record: TeacherRecord, ttl: float) -> bool:
        """Write ``record`` with its TTL in one command; True if the key already existed.

        ``False`` on a refresh means the record had been lost (expired while the teacher
        was unhealthy, or Redis restarted) and this call put it back.  (``SET`` replaces
        a key of any type, so a stray value at the key is simply overwritten.)
        """
        ttl_ms = max(1, int(ttl * 1000))
        record.ttl_ms = ttl_ms
        record.registered_at = time.time()
        key = self.teacher_key(check_service(record.service), check_address(record.address))
        try:
            old = self.r.set(key, record.to_json(), px=ttl_ms, get=True)
        except redis.ResponseError as exc:  # SET ... GET refuses a key of another type
            if not _is_wrong_type(exc):
                raise
            self._throttle.warning(key, "replacing %s", self._wrong_type(key, "string"))
            self.r.set(key, record.to_json(), px=ttl_ms)
            return False
        return old is not None

    def unregister_teacher(self, record: TeacherRecord) -> bool:
        """Remove the record at once if it is still ours (same token); True if removed."""
        key = self.teacher_key(record.service, record.address)
        current = self._get(key)
        if current is None:
            return False
        try:
            token = parse_json(current, "teacher record").get("token")
        except RecordError:
            return False
        if token != record.token:
            return False
        return bool(self._delete_if(keys=[key], args=[current]))

    def get_teacher(self, service: str, address: str) -> TeacherRecord | None:
        """The record at ``service``/``address``; None if absent or bad (logged)."""
        key = self.teacher_key(service, address)
        text = self._get(key)
        return None if text is None else self._teacher(key, text, service, address, None)

    def _teacher(self, key: str, text: str, service: str, address: str,
                 problems: Problems | None) -> TeacherRecord | None:
        try:
            rec = TeacherRecord.from_json(text)
        except RecordError as exc:
            self._skip(key, str(exc), problems)
            return None
        if rec.service != service or rec.address != address:
            self._skip(key, f"it names {rec.address} of {rec.service}", problems)
            return None
        return rec

    def all_teachers(self, problems: Problems | None = None) -> dict[str, dict[str, TeacherRecord]]:
        """Every live teacher: service -> address -> record.  One SCAN plus MGETs.

        Bad records are skipped (and put in ``problems`` if given).  MGET reads a key of
        another type as missing, the same as one that expired since the SCAN.
        """
        keys = [k for k in self.r.scan_iter(match=self.teacher_pattern, count=1000) if self.parse_teacher_key(k)]
        found: dict[str, dict[str, TeacherRecord]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            for key, text in zip(chunk, self.r.mget(chunk), strict=True):
                if text is None:
                    continue
                service, address = self.parse_teacher_key(key) or ("", "")
                rec = self._teacher(key, text, service, address, problems)
                if rec is not None:
                    found.setdefault(service, {})[address] = rec
        return found

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
        """Take the lease if nobody holds it.  A value at the key that no balancer can
        have written (another type, no TTL) would block every balancer forever: removed."""
        got = self._acquire(keys=[self.leader_key], args=[record.to_json(), max(1, int(lease * 1000))])
        if got == 2:
            log.warning("removed %s: it held no balancer's lease (a value of another type, or without a TTL)",
                        self.leader_key)
        return bool(got)

    def refresh_leader(self, record: LeaderRecord, lease: float) -> bool:
        return bool(self._extend_if(keys=[self.leader_key], args=[record.to_json(), max(1, int(lease * 1000))]))

    def release_leader(self, record: LeaderRecord) -> bool:
        return bool(self._delete_if(keys=[self.leader_key], args=[record.to_json()]))

    def get_leader(self, problems: Problems | None = None) -> LeaderRecord | None:
        text = self._get(self.leader_key, problems)
        if text is None:
            return None
        try:
            return LeaderRecord.from_json(text)
        except RecordError as exc:
            self._skip(self.leader_key, str(exc), problems)
            return None

    # -- students and assignments (leader only, fenced) ------------------------

    def get_epoch(self, problems: Problems | None = None) -> str | None:
        """The assignment history's id; a malformed one reads as none (the leader rewrites it)."""
        text = self._get(self.epoch_key, problems)
        if text is not None and not EPOCH_RE.match(text):
            self._skip(self.epoch_key, f"an epoch is 1-64 of [A-Za-z0-9_-], got {_show(text)}", problems)
            return None
        return text

    def load_students(self, problems: Problems | None = None) -> dict[str, StudentRecord]:
        """Every student record; bad ones skipped.  :class:`WrongTypeError` if the key is no hash."""
        try:
            stored = self.r.hgetall(self.students_key)
        except redis.ResponseError as exc:
            if _is_wrong_type(exc):
                raise self._wrong_type(self.students_key, "hash") from None
            raise
        students: dict[str, StudentRecord] = {}
        for sid, text in stored.items():
            try:
                students[sid] = StudentRecord.from_json(sid, text)
            except RecordError as exc:
                self._skip(f"{self.students_key}[{sid[:128]}]", str(exc), problems)
        return students

    def write_students(self, leader: LeaderRecord, put: Iterable[StudentRecord] = (),
                       remove: Iterable[str] = ()) -> bool:
        """Save changed students and drop removed ones, only while ``leader`` holds the lease.

        Returns False (and writes nothing) when the lease is someone else's; raises
        :class:`WrongTypeError` (writing nothing) when ``P:students`` is not a hash.
        """
        result = self._write(leader, put, remove, None, replace=False)
        if result < 0:
            raise self._wrong_type(self.students_key, "hash")
        return result > 0

    def replace_students(self, leader: LeaderRecord, students: Iterable[StudentRecord], epoch: str) -> bool:
        """Make ``P:students`` hold exactly ``students`` and ``P:epoch`` ``epoch``, fenced.

        Whatever was there goes, a key of another type included: the leader owns both.
        """
        return self._write(leader, students, (), epoch, replace=True) > 0

    def _write(self, leader: LeaderRecord, put: Iterable[StudentRecord], remove: Iterable[str],
               epoch: str | None, replace: bool) -> int:
        args: list[Any] = [leader.to_json(), epoch or "", "1" if replace else "0"]
        pairs: list[str] = []
        for rec in put:
            pairs += [rec.student_id, rec.to_json()]
        args.append(len(pairs) // 2)
        args += pairs
        args += list(remove)
        keys = [self.leader_key, self.students_key, self.epoch_key]
        return int(self._fenced_write(keys=keys, args=args))


def students_by_service(students: Mapping[str, StudentRecord]) -> dict[str, dict[str, StudentRecord]]:
    """Students grouped by service (service -> student id -> record): the balancer and ``status`` agree on it."""
    grouped: dict[str, dict[str, StudentRecord]] = {}
    for sid, rec in students.items():
        grouped.setdefault(rec.service, {})[sid] = rec
    return grouped
