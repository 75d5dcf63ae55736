"""Checks that run before anything starts, so that a mistake costs one clear line and a second, not a
traceback after an engine has loaded for half a minute. Each raises UsageError with the line to print."""
from __future__ import annotations

import difflib
import errno
import os
import socket


class UsageError(Exception):
    """A mistake in how rolloutd was called: the message is the whole story, one line (exit code 2)."""


class Address(str):
    """An address (a str, usable wherever one is) that knows where it came from, so that an error can name
    what to change: "--front", "$ROLLOUTD_ADDRESS", "the default"."""

    def __new__(cls, value: str, source: str):
        self = super().__new__(cls, value)
        self.source = source
        return self

    @property
    def value(self) -> str:
        return str(self)


def address(given: str | None, flag: str, env: str, default: str) -> Address:
    """The address a flag, else the environment variable, else the default names."""
    if given is not None:
        return Address(given, flag)
    if os.environ.get(env):
        return Address(os.environ[env], f"${env}")
    return Address(default, "the default")


def check_model(model: str, builtins: tuple[str, ...]) -> None:
    """A built-in name, or a folder that holds an HF model (its config.json)."""
    if model in builtins:
        return
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UsageError(f"--model {model}: the folder has no config.json (is it a Hugging Face model folder?)")
        return
    close = difflib.get_close_matches(model, builtins, n=1)
    hint = f"did you mean {close[0]}?" if close else f"built-in models: {', '.join(builtins)}"
    what = "no such folder" if os.sep in model or model.startswith(".") else "not a built-in model nor a folder"
    raise UsageError(f"--model {model}: {what}; {hint}")


def check_listen(addr: Address) -> None:
    """An address the broker can listen on: well formed, and (tcp) not in use by another process."""
    scheme, sep, rest = addr.value.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        raise UsageError(f"{addr.value} (from {addr.source}) is not an address: write tcp://HOST:PORT")
    if scheme != "tcp":
        return
    host, _, port = rest.rpartition(":")
    if not host or not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        raise UsageError(f"{addr.value} (from {addr.source}) is not an address: write tcp://HOST:PORT")
    if port == "*":
        return
    host = host.strip("[]")
    bind_host = "" if host in ("*", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq does: a port in TIME_WAIT is free
        try:
            s.bind((bind_host, int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"{addr.value} is in use (set by {addr.source}): another rolloutd may be running "
                                 f"there; stop it or choose another port") from None
            raise UsageError(f"cannot listen on {addr.value} (set by {addr.source}): {e.strerror}") from None


def check_numbers(**values) -> None:
    """Options that must be positive (None: not given)."""
    for name, v in values.items():
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be above 0, got {v:g}")


def unreachable_hint(addr: Address) -> str:
    """What to do when no broker answers at addr."""
    return (f"no broker answers at {addr.value} (from {addr.source}); start one with `rolloutd up`, or point "
            f"--address or $ROLLOUTD_ADDRESS at a running one")
