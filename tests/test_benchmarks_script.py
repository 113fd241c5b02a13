"""tools/benchmarks.sh and BENCHMARKS.md agree, checked without running a benchmark.

Every section of BENCHMARKS.md names the script section that reproduces it
(`tools/benchmarks.sh NAME`) and the script has exactly those sections; a section's commands in
the script are the commands its BENCHMARKS.md section shows (all of them; a section still
waiting for its table, marked by an HTML comment, may run more); every ``fedsparse`` command
in the script parses with the CLI's own parser, every tool it calls exists; and an unknown
section name is refused with one line, before anything runs.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "benchmarks.sh"
DOC = ROOT / "BENCHMARKS.md"
OUT = "runs/benchmarks"  # the script's default $OUT, as BENCHMARKS.md writes it


def joined_lines(text: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def words(command: str) -> tuple[str, ...]:
    """A command's words, the script's ``$OUT`` written as BENCHMARKS.md writes it."""
    return tuple(w.replace("$OUT", OUT) for w in shlex.split(command))


def script_sections() -> dict[str, list[tuple[str, ...]]]:
    text = SCRIPT.read_text()
    found = re.findall(r"^section_([a-z]+)\(\) \{\n(.*?)^\}", text, flags=re.S | re.M)
    return {name: [words(c) for c in joined_lines(body)] for name, body in found}


def doc_sections() -> dict[str, tuple[list[tuple[str, ...]], bool]]:
    """Section name -> (the commands of its bash blocks, whether it holds a placeholder)."""
    sections = {}
    for chunk in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        names = re.findall(r"^`tools/benchmarks\.sh ([a-z]+)`", chunk, flags=re.M)
        assert len(names) == 1, f"BENCHMARKS.md section {chunk.splitlines()[0]!r} names {names}, not one section"
        blocks = re.findall(r"^```bash\n(.*?)^```", chunk, flags=re.S | re.M)
        commands = [words(c) for b in blocks for c in joined_lines(b)]
        assert names[0] not in sections, f"two BENCHMARKS.md sections name {names[0]}"
        sections[names[0]] = (commands, "<!--" in chunk)
    return sections


def test_every_section_of_the_doc_is_in_the_script_and_back() -> None:
    doc, script = doc_sections(), script_sections()
    assert len(doc) >= 8, sorted(doc)
    assert sorted(doc) == sorted(script), (sorted(doc), sorted(script))
    listed = re.search(r"^SECTIONS=\((.*)\)$", SCRIPT.read_text(), flags=re.M)
    assert listed and listed.group(1).split() == list(doc), "the script's SECTIONS are not BENCHMARKS.md's, in order"


def test_each_section_runs_the_commands_its_doc_section_shows() -> None:
    script = script_sections()
    for name, (shown, placeholder) in doc_sections().items():
        ran = script[name]
        assert ran, f"section {name} runs nothing"
        missing = [" ".join(c) for c in shown if c not in ran]
        assert not missing, f"BENCHMARKS.md's {name} shows commands the script does not run: {missing}"
        if not placeholder:
            extra = [" ".join(c) for c in ran if c not in shown]
            assert not extra, f"tools/benchmarks.sh {name} runs commands BENCHMARKS.md does not show: {extra}"


def test_every_command_in_the_script_parses() -> None:
    from fedsparse.commands.cli import build_parser

    parser = build_parser()
    seen = 0
    for name, commands in script_sections().items():
        for command in commands:
            if command[0] == "fedsparse":
                try:
                    parser.parse_args(list(command[1:]))
                except SystemExit as exc:  # argparse's error (its line went to stderr)
                    pytest.fail(f"tools/benchmarks.sh {name}: does not parse ({exc}): {' '.join(command)}")
                seen += 1
            elif command[0] == "python":
                assert (ROOT / command[1]).is_file(), f"tools/benchmarks.sh {name}: no {command[1]}"
            else:
                pytest.fail(f"tools/benchmarks.sh {name}: runs neither fedsparse nor a python tool: {' '.join(command)}")
    assert seen >= 8, seen


def test_an_unknown_section_is_one_line_and_runs_nothing(tmp_path: Path) -> None:
    # a copy away from the project (no .venv, no configs): were the name not refused, the
    # first command would fail at once instead of running a benchmark
    copy = tmp_path / "tools" / "benchmarks.sh"
    copy.parent.mkdir()
    copy.write_text(SCRIPT.read_text())
    proc = subprocess.run(["bash", str(copy), "bench", "no-such-section"], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) == 1, lines
    assert "no-such-section" in lines[0] and all(s in lines[0] for s in script_sections()), lines[0]
    assert not (tmp_path / "out").exists()  # refused before the first section ran
