"""Optional ZeroMQ CURVE for the sockets that cross machines (teachers and balancers).

Off by default.  When on, a server has a key pair and clients must know its public
key; an allow-list (a folder of client public keys) can shut out every other client.
Keys live in files in pyzmq's certificate format, never on a command line:

- ``python -m zdistill.security keygen DIR NAME`` writes ``DIR/NAME.key`` (public,
  to hand out) and ``DIR/NAME.key_secret`` (keep it private);
- a server takes ``--curve-secret-key DIR/server.key_secret`` and optionally
  ``--curve-allow DIR_OF_CLIENT_PUBLIC_KEYS``;
- a client (the student's workers, ``zdistill-register``, the discovery client) reads
  ``ZDISTILL_CURVE_SERVER_KEY`` (the server's public key file) and, with an allow-list,
  ``ZDISTILL_CURVE_CLIENT_KEY`` (its own secret key file) from the environment.

A client without the right keys gets nothing through: the handshake fails and no
message reaches the server's code.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from zdistill.errors import ConfigError

ENV_SERVER_KEY = "ZDISTILL_CURVE_SERVER_KEY"
ENV_CLIENT_KEY = "ZDISTILL_CURVE_CLIENT_KEY"

_authenticators: dict[int, ThreadAuthenticator] = {}
_auth_lock = threading.Lock()


def _load(path: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise ConfigError(f"CURVE key file {path!r} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path!r} is not a CURVE key file: {exc}") from None
    if need_secret and not secret:
        raise ConfigError(f"{path!r} holds no secret key (use the .key_secret file)")
    return public, secret


@dataclass(frozen=True)
class ServerKeys:
    """A server's CURVE identity and, optionally, the folder of client keys it lets in."""

    secret_file: str
    allow_dir: str | None = None

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server; call before bind."""
        if not zmq.has("curve"):
            raise ConfigError("this libzmq was built without CURVE support")
        public, secret = _load(self.secret_file, need_secret=True)
        if self.allow_dir is not None:
            if not os.path.isdir(self.allow_dir):
                raise ConfigError(f"CURVE allow-list folder {self.allow_dir!r} does not exist")
            _authenticator(sock.context).configure_curve(domain="*", location=self.allow_dir)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs to reach a CURVE server: its public key, and maybe our own pair."""

    server_public_file: str
    client_secret_file: str | None = None

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client; call before connect."""
        server_public, _ = _load(self.server_public_file, need_secret=False)
        if self.client_secret_file:
            public, secret = _load(self.client_secret_file, need_secret=True)
        else:
            public, secret = zmq.curve_keypair()  # an ephemeral identity: enough without an allow-list
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret


def _authenticator(ctx: zmq.Context) -> ThreadAuthenticator:
    """One ZAP handler per context: it checks client keys against the allow-list."""
    with _auth_lock:
        auth = _authenticators.get(id(ctx))
        if auth is None:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            _authenticators[id(ctx)] = auth
        return auth


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the context's ZAP handler, if any: its socket would keep ``ctx.term()`` waiting."""
    with _auth_lock:
        auth = _authenticators.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def server_keys(secret_file: str | None, allow_dir: str | None) -> ServerKeys | None:
    """Server keys from daemon flags (None: CURVE off)."""
    if secret_file == "" or allow_dir == "":  # `--curve-secret-key "$UNSET"`: never quietly plaintext
        raise ConfigError("--curve-secret-key and --curve-allow need a path, got an empty one")
    if allow_dir and not secret_file:
        raise ConfigError("--curve-allow needs --curve-secret-key")
    return ServerKeys(secret_file, allow_dir) if secret_file else None


def client_keys_from_env() -> ClientKeys | None:
    """Client keys from ``ZDISTILL_CURVE_SERVER_KEY`` / ``ZDISTILL_CURVE_CLIENT_KEY`` (None: CURVE off).

    A variable set but empty (``ZDISTILL_CURVE_SERVER_KEY=$UNSET``) raises: it meant keys,
    and without them the client would take a plaintext server's answers as a keyed one's.
    """
    for name in (ENV_SERVER_KEY, ENV_CLIENT_KEY):
        if os.environ.get(name) == "":
            raise ConfigError(f"{name} is set but empty: give it a key file's path, or unset it for no CURVE")
    server = os.environ.get(ENV_SERVER_KEY)
    if not server:
        if os.environ.get(ENV_CLIENT_KEY):
            raise ConfigError(f"{ENV_CLIENT_KEY} is set but {ENV_SERVER_KEY} is not")
        return None
    return ClientKeys(server, os.environ.get(ENV_CLIENT_KEY))


def secure_client(sock: zmq.Socket, keys: ClientKeys | None) -> zmq.Socket:
    if keys is not None:
        keys.apply(sock)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zdistill.security", description="Make CURVE key pairs.")
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="write DIR/NAME.key (public) and DIR/NAME.key_secret")
    keygen.add_argument("directory")
    keygen.add_argument("name")
    args = parser.parse_args(argv)
    os.makedirs(args.directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.directory, args.name)
    os.chmod(secret, 0o600)
    sys.stdout.write(f"public key: {public}\nsecret key: {secret} (keep it private)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
