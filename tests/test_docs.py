"""The commands in README.md and the docs/ pages work as written.

The certificate and key commands of docs/deployment.md run verbatim in a temporary folder;
every flag the documents give ``flower-superlink``, ``flower-supernode``, ``flwr`` or
``fedsparse`` appears in that command's ``--help`` (or parser); the documented way to stop
the managed local SuperLink stops the caller's own process and no other; and no document
advises ``pkill -f`` (or ``killall``), which would stop other people's processes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "docs" / "deployment.md"
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
FLOWER = ("flower-superlink", "flower-supernode", "flwr")


def blocks(doc: Path, lang: str = "bash") -> list[str]:
    """The fenced ``lang`` blocks of ``doc``, dedented (README nests some in lists)."""
    text = doc.read_text()
    found = re.findall(rf"^( *)```{lang}\n(.*?)^\1```", text, flags=re.S | re.M)
    return ["\n".join(line[len(indent):] for line in body.splitlines()) for indent, body in found]


def commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" # ")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


def all_commands(*docs: Path) -> list[str]:
    return [c for doc in docs for b in blocks(doc) for c in commands(b)]


def inline_fedsparse_commands(doc: Path) -> list[str]:
    """``fedsparse ...`` written in the prose as inline code, e.g. `fedsparse keys`."""
    return re.findall(r"`(fedsparse [a-z][a-z-]*(?: [^`]*)?)`", doc.read_text())  # not `fedsparse run: ...` output


def argv_of(command: str) -> list[str]:
    """The first program of a command line and its arguments (env assignments and a
    ``.venv/bin/`` prefix dropped; a pipeline cut at its first ``|``)."""
    words = shlex.split(command.split(" | ")[0].split(" && ")[-1])
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words:
        words[0] = Path(words[0]).name
    return words


@lru_cache(maxsize=None)
def help_text(*program: str) -> str:
    exe = BIN / program[0]
    if not exe.exists():
        pytest.skip(f"{program[0]} not installed next to {sys.executable}")
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb", "FLWR_HOME": "/nonexistent-flwr-home"}
    proc = subprocess.run([str(exe), *program[1:], "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"{' '.join(program)} --help failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def flwr_subcommand(words: list[str]) -> tuple[str, ...]:
    """``flwr supernode register keys/x.pub conn`` -> ("flwr", "supernode", "register")."""
    groups = {"supernode", "app", "federation", "config"}
    if len(words) > 2 and words[1] in groups:
        return tuple(words[:3])
    return tuple(words[:2])


def test_no_document_advises_pkill_or_killall() -> None:
    for doc in DOCS:
        text = doc.read_text()
        assert "pkill" not in text and "killall" not in text, f"{doc.name} advises stopping processes by name"


def test_certificate_commands_run_verbatim(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    (block,) = [b for b in blocks(DEPLOYMENT) if "openssl req" in b]
    for command in commands(block):  # only file-making commands: safe to run anywhere
        assert argv_of(command)[0] in ("mkdir", "openssl", "printf"), command
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    certs = tmp_path / "certs"
    for name in ("ca.crt", "ca.key", "server.key", "server.pem"):
        assert (certs / name).stat().st_size > 0, name
    verify = subprocess.run(["openssl", "verify", "-CAfile", "certs/ca.crt", "certs/server.pem"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", "certs/server.pem", "-noout", "-text"], cwd=tmp_path,
                          capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in text, text


def test_supernode_key_commands_run_verbatim(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    (block,) = [b for b in blocks(DEPLOYMENT) if "ssh-keygen" in b]
    local = [c for c in commands(block) if argv_of(c)[0] in ("mkdir", "ssh-keygen")]
    assert len(local) == 2, local  # the folder, then the key pair
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(local)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "keys" / "node1").is_file()
    assert (tmp_path / "keys" / "node1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_every_flower_flag_is_in_its_help() -> None:
    checked = {}
    for doc, command in ((d, c) for d in DOCS for c in all_commands(d)):
        words = argv_of(command)
        if not words or words[0] not in FLOWER:
            continue
        program = flwr_subcommand(words) if words[0] == "flwr" else (words[0],)
        help_ = help_text(*program)
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_), \
                f"{doc.name}: `{' '.join(program)}` has no {flag}: {command}"
            checked[doc.name] = checked.get(doc.name, 0) + 1
    assert checked.get("deployment.md", 0) >= 20 and checked.get("running.md", 0) >= 3, checked


def test_every_flag_the_deployment_prose_names_exists() -> None:
    """Flags named in the text (``--root-certificates``, ``--enable-supernode-auth``, ...)."""
    helps = "\n".join(help_text(*p) for p in [("flower-superlink",), ("flower-supernode",), ("flwr", "run")])
    from fedsparse.commands.cli import build_parser

    ours = _fedsparse_flags(build_parser())
    flags = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", DEPLOYMENT.read_text())))
    assert len(flags) >= 10, flags  # the page names a dozen and more: an empty loop checks nothing
    for flag in flags:
        in_flower = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps)
        in_flwr_subcommand = flag in ("--format", "--run-id", "--name", "--location")  # flwr ls / supernode register
        assert in_flower or in_flwr_subcommand or flag in ours, flag


def _fedsparse_flags(parser) -> set[str]:
    flags = set(parser._option_string_actions)
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for sub in action.choices.values():
            flags |= set(sub._option_string_actions)
    return flags


def test_every_fedsparse_command_parses() -> None:
    from fedsparse.commands.cli import build_parser

    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    seen = 0
    written = [(d, c) for d in DOCS for c in [*all_commands(d), *inline_fedsparse_commands(d)]]
    for doc, command in written:
        words = argv_of(command)
        if not words or words[0] != "fedsparse":
            continue
        assert words[1] in subcommands, f"{doc.name}: no command `fedsparse {words[1]}`: {command}"
        actions = subcommands[words[1]]._option_string_actions
        for flag in (w.split("=")[0].strip("[]") for w in words[2:] if w.lstrip("[").startswith("--")):
            assert flag in actions, f"{doc.name}: fedsparse {words[1]} has no {flag}: {command}"
            assert actions[flag].help != argparse.SUPPRESS, \
                f"{doc.name}: fedsparse {words[1]} {flag} is a deprecated alias (see its --help): {command}"
        seen += 1
    assert seen >= 20, seen


def test_managed_superlink_stop_line_stops_only_the_callers_own(tmp_path: Path) -> None:
    """The documented stop line, run verbatim, ends the process that logs into *this*
    ``FLWR_HOME`` and leaves one that logs elsewhere running."""
    lines = {c for doc in DOCS for c in all_commands(doc) if c.startswith("pgrep ")}
    assert len(lines) == 1, lines  # the same line wherever it is given
    (line,) = lines
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    procs = {
        name: subprocess.Popen([*sleeper, "--log-file", str(home / "local-superlink" / "superlink.log")])
        for name, home in (("mine", mine), ("theirs", theirs))
    }
    try:
        time.sleep(0.5)
        env = {**os.environ, "FLWR_HOME": str(mine)}
        proc = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert procs["mine"].wait(timeout=10) == -signal.SIGTERM
        assert procs["theirs"].poll() is None, "the stop line ended someone else's SuperLink"
        again = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 0, again.stderr  # nothing left to stop is no error
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
