"""README and CI must not drift apart: CI runs exactly the test command the README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) >= 2, "README must open with an install-and-run command and a test command"
    test_command = blocks[1].strip()
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == test_command


DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_link_in_the_readme_and_the_manual_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken


def test_every_fedclip_command_the_docs_name_exists():
    from fedclip.cli import build_parser
    from simulations.commands import add_app_commands

    commands = set(build_parser((add_app_commands,))._subparsers._group_actions[0].choices)
    named = set()
    for doc in DOCS:
        # as typed: after .venv/bin/, at the start of a code line, or opening inline code
        named |= set(re.findall(r"(?:\.venv/bin/|`|^\s*)fedclip ([a-z][a-z-]+)", doc.read_text(), flags=re.M))
    assert named and named <= commands, sorted(named - commands)


def test_every_docs_path_the_code_names_exists():
    missing = []
    for path in [*ROOT.glob("fedclip/**/*.py"), *ROOT.glob("simulations/**/*"), *ROOT.glob("tests/**/*.py")]:
        if path.is_file() and path.suffix in (".py", ".toml"):
            missing += [
                f"{path.relative_to(ROOT)}: {m}"
                for m in re.findall(r"docs/[\w-]+\.md", path.read_text())
                if not (ROOT / m).is_file()
            ]
    assert not missing


def test_every_run_config_key_the_docs_set_is_a_key():
    from simulations.hospital_clip.config import SimulationConfig

    known = set(SimulationConfig().to_run_config())
    named = set()
    for doc in DOCS:
        for value in re.findall(r'--run-config "([^"]*)"', doc.read_text()):
            named |= {item.split("=", 1)[0] for item in value.split() if "=" in item}
    named.discard("k")  # the placeholder "k=v"
    assert named and named <= known, sorted(named - known)
