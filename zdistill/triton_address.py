"""The address of a model on a Triton Inference Server: ``triton://HOST:PORT/MODEL[/VERSION]``.

PORT is the server's gRPC port (8001 by default in Triton).  Without a VERSION, Triton
serves the model's latest ready version.  Parsed here, on the ground floor, because
every place that takes a teacher address (the reader, ``zdistill-register``, the
store's records, ``zdistill ping``) must accept it, and say why one is malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zdistill.errors import ConfigError

SCHEME = "triton://"
FORM = "triton://HOST:PORT/MODEL[/VERSION] (PORT: the server's gRPC port)"
_RE = re.compile(
    r"^triton://(?P<host>[A-Za-z0-9_.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):(?P<port>[0-9]{1,5})"
    r"/(?P<model>[A-Za-z0-9_.\-]{1,128})(?:/(?P<version>[0-9]{1,18}))?/?$",
    re.IGNORECASE,
)


def is_triton(address: object) -> bool:
    """Whether ``address`` names the Triton scheme (well-formed or not: :meth:`TritonAddress.parse` says)."""
    return isinstance(address, str) and address.strip().lower().startswith(SCHEME)


@dataclass(frozen=True)
class TritonAddress:
    """One model (and maybe one version of it) on one Triton server."""

    host: str  # a name, an IPv4 or a bracketed IPv6 address
    port: int
    model: str
    version: str = ""  # "": the latest version Triton has ready

    @classmethod
    def parse(cls, address: str) -> TritonAddress:
        """The parts of a ``triton://`` address; ConfigError naming it and the form otherwise."""
        given = address.strip() if isinstance(address, str) else ""
        found = _RE.match(given)
        if found is None or not 0 < int(found["port"]) <= 65535:
            raise ConfigError(f"Triton teacher address {address!r:.200} is not {FORM}")
        version = found["version"] or ""
        if version and int(version) < 1:
            raise ConfigError(f"Triton teacher address {address!r:.200}: a model version is 1 or more")
        return cls(found["host"], int(found["port"]), found["model"], str(int(version)) if version else "")

    @property
    def url(self) -> str:
        """``HOST:PORT``, as tritonclient's gRPC client takes it."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{SCHEME}{self.host}:{self.port}/{self.model}" + (f"/{self.version}" if self.version else "")
