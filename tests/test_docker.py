"""docker/: what can be checked without a Docker engine (none runs here, so the images are never built).

The Dockerfiles' instructions and the files they copy, their pip commands against pyproject.toml and the
README, and compose.yaml's two nodes: each node's launch line is dry-run to check the two torchruns agree.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
    "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with `\\` continuations joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    lines = [line.strip() for line in joined.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def pip_installs(path: Path) -> list[str]:
    """Each `pip install ...` command in the Dockerfile's RUN lines, whitespace normalised."""
    commands = [part.strip() for name, args in instructions(path) if name == "RUN" for part in args.split("&&")]
    return [" ".join(command.split()) for command in commands if command.startswith("pip install")]


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_instructions_in_order(path):
    steps = instructions(path)
    names = [name for name, _ in steps]
    assert set(names) <= INSTRUCTIONS, set(names) - INSTRUCTIONS
    assert next(n for n in names if n != "ARG") == "FROM" and names[-1] == "CMD"
    copied = []
    for name, args in steps:
        if name == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name} copies {source}, which the repository lacks"
            copied += sources
        if name == "RUN" and "pip install ." in args:
            # `pip install .` needs the metadata (README.md is pyproject's readme) and every package it finds.
            packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
            needed = {"pyproject.toml", PYPROJECT["project"]["readme"], *packages}
            assert needed <= set(copied), f"{path.name} runs pip install . before copying {needed - set(copied)}"
            break
    else:
        pytest.fail(f"{path.name} never runs `pip install .`")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pip_installs_are_pyprojects_dependencies(path):
    dependencies = {requirement_name(d): d for d in PYPROJECT["project"]["dependencies"]}
    commands = pip_installs(path)
    assert commands[-1] == "pip install ."  # the project last: it brings every dependency
    for command in commands[:-1]:
        words = shlex.split(command)[2:]
        requirements = [w for i, w in enumerate(words) if not w.startswith("-") and words[i - 1] != "--index-url"]
        for requirement in requirements:
            # A dependency installed ahead (torch from its CPU index) must carry pyproject's exact specifier,
            # or `pip install .` would replace it with PyPI's build.
            assert dependencies.get(requirement_name(requirement)) == requirement, (command, dependencies)


def test_cpu_image_takes_torch_from_the_cpu_index_and_the_cuda_image_from_pypi():
    cpu, cuda = (pip_installs(path) for path in DOCKERFILES)
    torch = next(d for d in PYPROJECT["project"]["dependencies"] if requirement_name(d) == "torch")
    assert cpu == [f'pip install --index-url https://download.pytorch.org/whl/cpu "{torch}"', "pip install ."]
    assert cuda == ["pip install ."]  # PyPI's Linux torch is the CUDA build, with NCCL as a pip dependency


def test_readme_uses_the_same_pip_commands():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not written yet")
    text = " ".join(readme.read_text().split())
    for command in {c for path in DOCKERFILES for c in pip_installs(path)}:
        assert command in text, f"README.md should show the images' install command: {command}"


# ---- compose.yaml ------------------------------------------------------------------------------------


def parse_yaml(text: str):
    """Block-style YAML as compose.yaml uses it: mappings, `- item` lists, scalars, `>-` folded strings.

    Strict: anything outside that subset raises, so the file cannot drift into YAML this test misreads.
    """
    lines = []
    for raw in text.splitlines():
        body = "" if raw.lstrip().startswith("#") else raw.split(" #", 1)[0].rstrip()
        if body:
            lines.append((len(body) - len(body.lstrip()), body.strip()))
    value, end = _yaml_block(lines, 0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"cannot read {lines[end][1]!r}")
    return value


def _yaml_block(lines, i, indent):
    if lines[i][1].startswith("- "):
        items = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            items.append(_yaml_scalar(lines[i][1][2:]))
            i += 1
        return items, i
    mapping = {}
    while i < len(lines) and lines[i][0] == indent:
        key, colon, rest = lines[i][1].partition(":")
        rest = rest.strip()
        if not colon or key in mapping or rest.startswith(("[", "{", "&", "*", "|")):
            raise ValueError(f"cannot read {lines[i][1]!r}")
        i += 1
        if rest in (">", ">-"):
            start = i
            while i < len(lines) and lines[i][0] > indent:
                i += 1
            mapping[key] = " ".join(text for _, text in lines[start:i])
        elif rest:
            mapping[key] = _yaml_scalar(rest)
        elif i < len(lines) and lines[i][0] > indent:
            mapping[key], i = _yaml_block(lines, i, lines[i][0])
        else:
            mapping[key] = None
    return mapping, i


def _yaml_scalar(text: str) -> str:
    if text[:1] in "'\"":
        if len(text) < 2 or text[-1] != text[0]:
            raise ValueError(f"unterminated quote in {text!r}")
        return text[1:-1]
    return text


COMPOSE = parse_yaml((ROOT / "docker" / "compose.yaml").read_text())


def test_compose_matches_pyyaml_when_installed():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; the subset parser above stands alone")
    assert yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text()) == COMPOSE


def test_compose_builds_from_the_repository():
    services = COMPOSE["services"]
    assert sorted(services) == ["node0", "node1"]
    for service in services.values():
        context = (ROOT / "docker" / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()
        assert set(service.get("depends_on", [])) <= set(services)


@pytest.mark.skipif(
    not os.access(os.path.join(os.path.dirname(sys.executable), "torchrun"), os.X_OK),
    reason="no torchrun beside this Python to dry-run the nodes' launch lines: pip install torch",
)
def test_compose_nodes_run_one_torchrun_each_that_meet():
    lines = {}
    for service in COMPOSE["services"].values():
        # Compose fills ${VAR:-default} from the environment; with TRAIN_ARGS unset that is the default.
        words = shlex.split(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", service["command"]))
        assert words[:3] == ["python", "-m", "launch"]
        split = words.index("--")
        argv = [sys.executable, *words[1:split], "--dry-run", *words[split:]]
        result = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        torchrun = shlex.split(result.stdout)
        options = dict(zip(torchrun[1::2], torchrun[2::2]))
        assert torchrun[-2:] == ["-m", "distrib.train"], torchrun
        lines[service["hostname"]] = (options, int(words[words.index("-n") + 1]))
    (first, n), (second, _) = lines.values()
    assert first["--nnodes"] == second["--nnodes"] == str(len(lines))
    assert first["--rdzv-backend"] == second["--rdzv-backend"] == "c10d"
    assert first["--rdzv-endpoint"] == second["--rdzv-endpoint"]
    assert first["--rdzv-endpoint"].split(":")[0] in lines  # the rendezvous is on one of the nodes
    assert int(first["--nproc-per-node"]) + int(second["--nproc-per-node"]) == n
