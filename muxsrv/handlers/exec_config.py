"""The exec handler's options: declared, checked, turned into an :class:`ExecConfig`.

Every check that can fail at start-up does, with one line naming the option
(``ConfigError``: exit status 2), rather than on the first command.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..handler import ConfigError
from ..options import parse_size, positive_int, seconds

__all__ = ["ExecConfig", "add_arguments", "child_environment", "from_options", "is_loopback"]

#: The commands' PATH unless the operator sets one: system directories only.
DEFAULT_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
#: Copied from the server's environment by default: who and where, never secrets.
PASSED_THROUGH: Final = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
#: Largest --exec-max-output: a reply must fit a length frame (2^31-1) with room to spare.
MAX_OUTPUT_LIMIT: Final = 1 << 30


@dataclass(frozen=True)
class ExecConfig:
    timeout: float
    max_output: int
    max_procs: int
    #: Allowed programs (argv[0] exactly); None: every command line runs with /bin/sh -c.
    allowed: frozenset[str] | None
    cwd: str
    env: Mapping[str, str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "exec handler", "run each message as a command; this is remote code execution by design"
    )
    add = group.add_argument
    add("--exec-timeout", type=seconds, default=10.0, metavar="SECONDS",
        help="kill a command's process group after this long (default: 10)")
    add("--exec-max-output", type=_max_output, default=8 << 20, metavar="BYTES",
        help="stdout and stderr together; past it the command is killed and its reply "
             "truncated (default: 8M)")
    add("--exec-max-procs", type=positive_int, default=16, metavar="N",
        help="commands running at once, over all connections; the rest wait (default: 16)")
    add("--exec-allow", action="append", metavar="PROGRAM",
        help="allowlist mode (repeatable): split the command line with shlex and run it "
             "without a shell, only if its program is PROGRAM exactly; others get exit code 127")
    add("--exec-cwd", metavar="DIR",
        help="the commands' working directory (default: the server's)")
    add("--exec-env", action="append", default=[], metavar="NAME=VALUE",
        help="set a variable in the commands' environment (repeatable); a bare NAME copies "
             f"the server's. Default environment: PATH={DEFAULT_PATH} and the server's "
             f"{', '.join(PASSED_THROUGH)}, nothing else")
    add("--exec-inherit-env", action="store_true",
        help="start from the server's whole environment instead (secrets included)")
    add("--allow-remote-exec", action="store_true",
        help="allow --host to be a non-loopback address (needs --auth-token-file or "
             "--tls-client-ca): anyone holding a token or a client certificate runs commands")


def from_options(options: argparse.Namespace) -> ExecConfig:
    """Check the parsed options against each other and the system; ConfigError if wrong."""
    if not options.exec_timeout > 0:
        raise ConfigError("--exec-timeout must be above 0 seconds")
    if options.framing != "length":
        raise ConfigError(
            f"the exec handler needs --framing length (its replies carry binary output), "
            f"not --framing {options.framing}"
        )
    authenticated = (getattr(options, "auth_token_file", None) is not None
                     or getattr(options, "tls_client_ca", None) is not None)
    if options.allow_remote_exec and not authenticated:
        raise ConfigError(
            "--allow-remote-exec needs authentication: give --auth-token-file FILE or "
            "--tls-client-ca FILE as well (anyone holding a token or a client certificate "
            "can run commands here)"
        )
    if not options.allow_remote_exec and not is_loopback(options.host):
        raise ConfigError(
            f"refusing to run the exec handler on --host {options.host}: it is not a loopback "
            "address, and anyone who can connect could run commands here "
            "(give --allow-remote-exec with --auth-token-file or --tls-client-ca to require "
            "authentication)"
        )
    if not options.allow_remote_exec and getattr(options, "proxy_protocol", False):
        raise ConfigError(
            "refusing to run the exec handler with --proxy-protocol: its clients come through "
            "a load balancer, from anywhere it accepts them, and could run commands here "
            "(give --allow-remote-exec with --auth-token-file to require a token)"
        )
    cwd = os.path.abspath(options.exec_cwd or os.getcwd())
    if not os.path.isdir(cwd):
        raise ConfigError(f"--exec-cwd {options.exec_cwd}: not a directory")
    env = child_environment(os.environ, options.exec_inherit_env, options.exec_env)
    allowed = None
    if options.exec_allow is not None:
        allowed = frozenset(options.exec_allow)
        for program in sorted(allowed):
            _check_program(program, cwd, env.get("PATH", ""))
    return ExecConfig(
        timeout=options.exec_timeout,
        max_output=options.exec_max_output,
        max_procs=options.exec_max_procs,
        allowed=allowed,
        cwd=cwd,
        env=env,
    )


def child_environment(
    server_env: Mapping[str, str], inherit: bool, settings: Sequence[str]
) -> dict[str, str]:
    """The commands' environment: a minimal one (or the server's), then ``--exec-env``."""
    if inherit:
        env = dict(server_env)
    else:
        env = {"PATH": DEFAULT_PATH}
        env.update((name, server_env[name]) for name in PASSED_THROUGH if name in server_env)
    for setting in settings:
        name, eq, value = setting.partition("=")
        if not name or "\0" in setting:
            raise ConfigError(f"--exec-env {setting!r}: expected NAME=VALUE or NAME")
        if eq:
            env[name] = value
        elif name in server_env:
            env[name] = server_env[name]
        else:
            raise ConfigError(f"--exec-env {name}: not set in the server's environment")
    return env


def is_loopback(host: str) -> bool:
    """Does every address ``host`` resolves to (as the server binds it) stay on this machine?"""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback for info in infos
    )


def _check_program(program: str, cwd: str, path: str) -> None:
    if "/" in program:
        found = os.access(os.path.join(cwd, program), os.X_OK)
    else:
        found = shutil.which(program, path=path) is not None
    if not program or not found:
        raise ConfigError(
            f"--exec-allow {program!r}: no such executable program "
            f"(looked in PATH={path} from --exec-cwd {cwd})"
        )


def _max_output(text: str) -> int:
    value = parse_size(text)
    if not 0 <= value <= MAX_OUTPUT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_OUTPUT_LIMIT} (1G) bytes")
    return value
