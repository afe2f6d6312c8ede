"""Every command line in README.md's ```bash blocks, run as a new user would run it (or skipped, with the reason).

Extraction: each ```bash (or sh / shell / console) block of README.md is read in order; ``\\`` continuations are
joined, ``#`` comments dropped, ``NAME=value`` lines set a variable that later lines of the same block expand
(``$P``, ``${P}``); every other line is one command. A command using a variable its block does not set is a README
error (a reader pasting that block would hit it).

How each command runs (``decide``; in README order, one subprocess each, cwd = the repository root, PATH without
``.venv/bin``, as after ``bash setup.sh``; it must exit 0; one selected alone with ``-k`` first runs the
commands writing what it reads, see ``prerequisites``):

* paths: ``/ckpt/...`` and ``/runs/...`` live in one sandbox per test module. ``/ckpt/MiMo-V2-Flash`` is the built-in
  tiny model as a block-FP8 checkpoint like the release (``write_fp8_checkpoint(write_tiny_checkpoint(...))``),
  ``/ckpt/MiMo-V2.5`` the tiny MiMo-V2 family checkpoint (``make_tiny_checkpoint.py --family``'s);
  ``neuron_export plan --config-only`` instead gets a directory holding the released model's config.json (its layout
  flags are for the 309B model; it reads nothing else). ``chat.jsonl`` is the shipped ``data/tiny_sft.jsonl``. Every
  other ``/ckpt`` or ``/runs`` path starts empty, so an output an earlier command writes (``/ckpt/mimo_mcore``,
  ``/runs/lora``, ``/ckpt/mimo_nxdi``) is what later commands read, as in the README. Other absolute paths and ``~``
  are not mapped: a command using one must be skipped by a rule, or the test fails.
* flags and Hydra overrides stay as written. What changes, and why, is in each test's id and shown on failure:
  ``finetune.sh`` whose output a later command reads (the LoRA run, exported next) trains ``--train-iters 2``
  instead of its default 40 / 100 steps; the other ``finetune.sh`` commands get ``--print-config`` (one process
  per rank resolves the flags, the data check and every override, then exits): their training runs are what
  ``test_finetune.py`` runs in full (``test_no_argument_run``: ``bash finetune.sh`` alone, 40 steps;
  ``test_parallel_training_matches_one_process``: ``torchrun --no-python --nproc-per-node 2 finetune.sh`` at EP 2,
  TP 2, PP 2). ``--nproc-per-node N`` above 2 (this machine's cores; a GPU layout) is checked with
  ``--print-config`` and with ``plan_parallelism.py --gpus N`` on the released model (the layout must exist).
* skipped, with the reason in the skip message: ``bash setup.sh`` (it builds the very .venv these tests run in,
  then the ~4-minute demo), the test suite itself, ``neuron_export compile`` and the bundle's scripts (Neuron SDK
  on a trn2 host).
* anything else (a launcher from PATH such as bare ``python`` or ``torchrun``, which setup.sh does not put there, an
  unmapped path) has no decision: ``test_every_command_has_a_decision`` fails and names it. A new README command
  either runs by these rules or gets a decision here.

``EXPECTED`` lists the commands the README holds today; a reshuffle that hides one from the extractor fails
``test_extraction_finds_the_expected_commands``.

Runtime on the 2-core CPU machine: 3.3 minutes measured on a quiet machine, 4.5 while other work shared its cores
(each command is a fresh process; 10-20 s of each is starting Python and importing Megatron); most of it is the
import / generate / export chain and the 2-step LoRA run. The three ``--print-config`` checks take ~55 s together,
where the training runs they stand for would take several minutes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
EXAMPLES = "examples/models/mimo_v2_flash"
TINY_SFT = REPO / EXAMPLES / "data" / "tiny_sft.jsonl"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
LAUNCHERS = {".venv/bin/python", ".venv/bin/torchrun", "bash"}
MAPPED_ROOTS = ("/ckpt/", "/runs/")
RELEASE = "/ckpt/MiMo-V2-Flash"
FAMILY_RELEASE = "/ckpt/MiMo-V2.5"
PREBUILT = (RELEASE, FAMILY_RELEASE)
MACHINE_PROCESSES = 2
TIMEOUT_S = 600

# The commands README.md holds (as ``Command.text``: words after shell quoting, variables not expanded) and what
# ``decide`` does with each.
EXPECTED = {
    "bash setup.sh": "skip",
    ".venv/bin/python -m pytest tests": "skip",
    ".venv/bin/python $P/convert_checkpoints.py import --hf-model /ckpt/MiMo-V2-Flash"
    " --megatron-path /ckpt/mimo_mcore": "run",
    ".venv/bin/python $P/convert_checkpoints.py inspect-fp8 --hf-model /ckpt/MiMo-V2-Flash": "run",
    ".venv/bin/python $P/generate.py --megatron-path /ckpt/mimo_mcore --prompt Hello --max-new-tokens 32": "run",
    ".venv/bin/python $P/convert_checkpoints.py export --hf-model /ckpt/MiMo-V2-Flash --megatron-path /ckpt/mimo_mcore"
    " --hf-path /ckpt/mimo_bf16": "run",
    ".venv/bin/python $P/convert_checkpoints.py export --hf-model /ckpt/MiMo-V2-Flash --megatron-path /ckpt/mimo_mcore"
    " --hf-path /ckpt/mimo_fp8 --dtype fp8": "run",
    ".venv/bin/python $P/convert_checkpoints.py import --hf-model /ckpt/MiMo-V2.5"
    " --megatron-path /ckpt/v25_mcore": "run",
    ".venv/bin/python $P/convert_checkpoints.py inspect-fp8 --hf-model /ckpt/MiMo-V2.5": "run",
    ".venv/bin/python $P/convert_checkpoints.py export --hf-model /ckpt/MiMo-V2.5 --megatron-path /ckpt/v25_mcore"
    " --hf-path /ckpt/v25_fp8 --dtype fp8": "run",
    ".venv/bin/python $P/convert_checkpoints.py export --hf-model /ckpt/MiMo-V2.5 --megatron-path /ckpt/v25_mcore"
    " --hf-path /ckpt/v25_bf16": "run",
    "bash $P/finetune.sh": "config",
    "bash $P/finetune.sh --hf-model /ckpt/MiMo-V2-Flash --data chat.jsonl --output /runs/sft --tp 8 --ep 8"
    " --nproc-per-node 8 --seq-length 4096 --global-batch-size 64": "config",
    "bash $P/finetune.sh --megatron-path /ckpt/mimo_mcore --data chat.jsonl --output /runs/lora --peft lora": "run",
    ".venv/bin/torchrun --no-python --nproc-per-node 2 $P/finetune.sh --ep 2 logger.log_interval=5": "config",
    ".venv/bin/python $P/convert_checkpoints.py export --hf-model /ckpt/MiMo-V2-Flash --megatron-path /runs/lora"
    " --hf-path /ckpt/mimo_lora_merged --adapter-path /ckpt/mimo_lora_adapter": "run",
    ".venv/bin/python -m neuron_export inspect --hf-path /ckpt/MiMo-V2-Flash": "run",
    ".venv/bin/python -m neuron_export plan --hf-path /ckpt/MiMo-V2-Flash --config-only --tp 64 --ep 64 --moe-tp 1"
    " --batch-size 32 --seq-len 8192": "run",
    ".venv/bin/python -m neuron_export prepare --hf-path /ckpt/MiMo-V2-Flash --output /ckpt/mimo_nxdi": "run",
    ".venv/bin/python -m neuron_export compile --prepared /ckpt/mimo_nxdi --compiled-path /ckpt/mimo_nxdi_tp64_ep64"
    " --neuron-python /opt/aws_neuronx_venv_pytorch_2_9_nxd_inference/bin/python"
    " --adapter-src ~/neuronx-distributed-inference/contrib/models/MiMo-V2-Flash/src": "skip",
    "bash /ckpt/mimo_nxdi_tp64_ep64/run_on_trn2.sh": "skip",
    "bash /ckpt/mimo_nxdi_tp64_ep64/serve_vllm.sh": "skip",
}


# --- extraction -------------------------------------------------------------------------------------------------


@dataclass
class Command:
    line: int  # README line the command starts on
    text: str  # its words, variables not expanded
    argv: list[str]  # its words, variables expanded
    undefined: list[str] = field(default_factory=list)  # variables its block does not set


VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
ASSIGNMENT = re.compile(r"([A-Za-z_]\w*)=(.*)")


def _expand(word: str, variables: dict[str, str], undefined: list[str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            undefined.append(name)
            return match.group(0)
        return variables[name]

    return VARIABLE.sub(value, word)


def extract_commands(markdown: str) -> list[Command]:
    """The command lines of ``markdown``'s shell code blocks (see the module docstring)."""
    commands: list[Command] = []
    in_block = shell = False
    variables: dict[str, str] = {}
    pending, start = "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = line.strip().startswith("```")
        if not in_block:
            if fence:
                in_block, variables, pending = True, {}, ""
                shell = line.strip()[3:].strip().lower() in SHELL_LANGUAGES
            continue
        if fence:
            if pending:
                raise ValueError(f"README.md:{start}: a '\\' continuation runs into the end of its code block")
            in_block = False
            continue
        if not shell:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        words = shlex.split(logical, comments=True)
        if not words:
            continue
        assignment = ASSIGNMENT.fullmatch(words[0])
        if len(words) == 1 and assignment:
            variables[assignment.group(1)] = _expand(assignment.group(2), variables, [])
            continue
        undefined: list[str] = []
        argv = [_expand(word, variables, undefined) for word in words]
        commands.append(Command(start, " ".join(words), argv, undefined))
    return commands


COMMANDS = extract_commands(README.read_text())


# --- decisions --------------------------------------------------------------------------------------------------


@dataclass
class Decision:
    action: str  # "run" (as written, plus `extra`), "config" (--print-config check), "skip", "undecided"
    reason: str  # why (skip / undecided), or what changed (run / config)
    extra: list[str] = field(default_factory=list)  # flags added before the Hydra overrides
    layout_check: list[str] = field(default_factory=list)  # plan_parallelism.py arguments, for "config"


def _flag(argv: list[str], name: str) -> str | None:
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _script_index(argv: list[str], suffix: str) -> int | None:
    return next((i for i, word in enumerate(argv) if word.endswith(suffix)), None)


def _paths(argv: list[str]) -> list[str]:
    values = [word.split("=", 1)[1] if word.startswith("--") and "=" in word else word for word in argv]
    return [value for value in values if value.startswith(("/", "~"))]


def _read_later(path: str, later: list[Command]) -> bool:
    return any(path in command.argv for command in later)


def _finetune_decision(command: Command, later: list[Command]) -> Decision:
    argv = command.argv
    script = _script_index(argv, "finetune.sh")
    args = argv[script + 1 :]
    if "--print-config" in args:
        return Decision("run", "")
    nproc = int(_flag(argv, "--nproc-per-node") or 1)
    if nproc > MACHINE_PROCESSES:
        layout = [f"--{name}" for name in ("tp", "pp", "ep", "etp")]
        plan = [item for name in layout for item in (name, _flag(args, name) or "1")] + ["--gpus", str(nproc)]
        return Decision(
            "config",
            f"{nproc} processes (this machine has {MACHINE_PROCESSES} cores): --print-config, and "
            f"plan_parallelism.py checks the layout on {nproc} GPUs",
            ["--print-config"],
            plan,
        )
    output = _flag(args, "--output")
    if output is not None and _read_later(output, later):
        extra = [] if _flag(args, "--train-iters") else ["--train-iters", "2"]
        return Decision(
            "run",
            f"a later command reads {output}: {' '.join(extra) or 'as written'} (default: 40 / 100 steps)",
            extra,
        )
    return Decision(
        "config",
        "--print-config (flags, data check, overrides); its training run is test_finetune.py's "
        "(test_no_argument_run, test_parallel_training_matches_one_process)",
        ["--print-config"],
    )


def decide(command: Command, later: list[Command]) -> Decision:
    """What the test does with ``command``; ``later``: the README's commands after it."""
    argv = command.argv
    if command.undefined:
        return Decision("undecided", f"uses ${', $'.join(command.undefined)}, which its code block does not set")
    if argv[0] == "bash" and len(argv) > 1 and Path(argv[1]).name == "setup.sh":
        reason = "setup.sh builds the .venv these tests run in, then the ~4-minute demo (the install is "
        return Decision("skip", reason + "test_install.py's, the demo's steps are the commands below)")
    if "pytest" in argv[:3]:
        return Decision("skip", "the test suite itself")
    if argv[1:4] == ["-m", "neuron_export", "compile"]:
        return Decision("skip", "needs the Neuron SDK on a trn2 host (without it, compile writes the bundle and "
                                "exits 2: test_neuron_export.py::test_compile_without_sdk_writes_bundle)")  # fmt: skip
    if argv[0] == "bash" and len(argv) > 1 and Path(argv[1]).name in {"run_on_trn2.sh", "serve_vllm.sh"}:
        return Decision("skip", "runs on the trn2 host, from compile's bundle (Neuron SDK, NxDI, vllm-neuron)")
    if argv[0] not in LAUNCHERS:
        return Decision("undecided", f"{argv[0]!r} is not a launcher a new user has after setup.sh "
                                     f"(one of {sorted(LAUNCHERS)})")  # fmt: skip
    unmapped = [path for path in _paths(argv) if not path.startswith(MAPPED_ROOTS)]
    if unmapped:
        return Decision("undecided", f"paths outside {' '.join(MAPPED_ROOTS)}: {' '.join(unmapped)}")
    if _script_index(argv, "finetune.sh") is not None:
        return _finetune_decision(command, later)
    return Decision("run", "")


DECISIONS = [decide(command, COMMANDS[i + 1 :]) for i, command in enumerate(COMMANDS)]


def _sandbox_paths(command: Command) -> set[str]:
    """The /ckpt and /runs paths ``command`` names, but the prebuilt release."""
    return {
        path
        for path in _paths(command.argv)
        if path.startswith(MAPPED_ROOTS) and not any(path == p or path.startswith(p + "/") for p in PREBUILT)
    }


def prerequisites(index: int) -> list[int]:
    """The commands writing what command ``index`` reads, and theirs, in README order: the first "run" command
    naming a path is the one that writes it (the README's order: an output, then its readers)."""
    writer: dict[str, int] = {}
    for i in range(index):
        if DECISIONS[i].action == "run":
            for path in _sandbox_paths(COMMANDS[i]):
                writer.setdefault(path, i)
    needed: set[int] = set()
    todo = [index]
    while todo:
        for path in _sandbox_paths(COMMANDS[todo.pop()]):
            source = writer.get(path)
            if source is not None and source not in needed and source != index:
                needed.add(source)
                todo.append(source)
    return sorted(needed)


def _name(command: Command, decision: Decision) -> str:
    argv = command.argv
    parts = [Path(argv[0]).name]
    script = next((i for i, word in enumerate(argv) if word.endswith((".py", ".sh"))), None)
    if argv[1:2] == ["-m"]:
        script = 2
    if script is not None:
        parts.append(Path(argv[script]).name)
        if script + 1 < len(argv) and re.fullmatch(r"[a-z][a-z0-9-]*", argv[script + 1]):
            parts.append(argv[script + 1])
    return f"L{command.line}-{decision.action}-{'-'.join(parts)}"


# --- running ----------------------------------------------------------------------------------------------------


@dataclass
class Sandbox:
    root: Path
    release: Path  # the tiny FP8 checkpoint standing for /ckpt/MiMo-V2-Flash
    released_config: Path  # a directory holding the released model's config.json
    family: Path  # the tiny MiMo-V2 family checkpoint standing for /ckpt/MiMo-V2.5
    done: dict[int, str] = field(default_factory=dict)  # command index -> "ok" or the failure

    def path(self, word: str, config_only: bool) -> str:
        if word == "chat.jsonl":
            return str(TINY_SFT)
        if word == RELEASE or word.startswith(RELEASE + "/"):
            base = self.released_config if config_only else self.release
            return str(base) + word[len(RELEASE) :]
        if word == FAMILY_RELEASE or word.startswith(FAMILY_RELEASE + "/"):
            return str(self.family) + word[len(FAMILY_RELEASE) :]
        if word.startswith(MAPPED_ROOTS):
            return str(self.root) + word
        return word

    def argv(self, command: Command, decision: Decision) -> list[str]:
        config_only = "neuron_export" in command.argv and "--config-only" in command.argv
        argv = []
        for word in command.argv:
            if word.startswith("--") and "=" in word:
                name, value = word.split("=", 1)
                argv.append(f"{name}={self.path(value, config_only)}")
            else:
                argv.append(self.path(word, config_only))
        if decision.extra:
            overrides = [i for i, word in enumerate(argv) if "=" in word and not word.startswith("-") and i > 1]
            at = overrides[0] if overrides else len(argv)
            argv[at:at] = decision.extra
        return argv


def _environment() -> dict[str, str]:
    """This environment without ``.venv/bin`` on PATH: what a shell has after ``bash setup.sh``."""
    venv_bin = (REPO / ".venv" / "bin").resolve()
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return {**env, "PATH": os.pathsep.join(path)}


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if re.match(r"\s*(\S+: )?(error|finetune|\w*Error)\b", line)]
        raise AssertionError(
            f"{what}\nran: {shlex.join(argv)}\nexit code {result.returncode}; error lines:\n"
            + "\n".join(errors[:10])
            + f"\noutput ends:\n{output[-3000:]}"
        )


def _execute(sandbox: Sandbox, index: int) -> None:
    command, decision = COMMANDS[index], DECISIONS[index]
    what = f"README.md:{command.line}: {command.text}" + (f"\n({decision.reason})" if decision.reason else "")
    try:
        _run(sandbox.argv(command, decision), what)
        if decision.layout_check:
            _run([sys.executable, str(REPO / EXAMPLES / "plan_parallelism.py"), *decision.layout_check], what)
    except Exception as error:
        sandbox.done[index] = f"{type(error).__name__}: {error}".splitlines()[0]
        raise
    sandbox.done[index] = "ok"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    sys.path.insert(0, str(REPO / "tests" / "unit_tests" / "neuron_export"))
    from ne_helpers import REAL_CONFIG  # the released model's config.json

    from mimo_v2_flash.tiny_checkpoint import write_fp8_checkpoint, write_tiny_checkpoint
    from mimo_v2_flash.tiny_family_checkpoint import family_tiny_config, write_family_checkpoint

    root = tmp_path_factory.mktemp("readme")
    for top in MAPPED_ROOTS:
        (root / top.strip("/")).mkdir()
    release = root / RELEASE.lstrip("/")
    write_fp8_checkpoint(write_tiny_checkpoint(root / "tiny_source"), release)
    released_config = root / "released_config"
    released_config.mkdir()
    (released_config / "config.json").write_text(json.dumps(REAL_CONFIG, indent=2))
    family_fp8 = write_fp8_checkpoint(write_tiny_checkpoint(root / "family_source", family_tiny_config()), root / "f8")
    family = write_family_checkpoint(family_fp8, root / FAMILY_RELEASE.lstrip("/"))
    return Sandbox(root, release, released_config, family)


# --- tests ------------------------------------------------------------------------------------------------------


def test_extractor_reads_blocks_continuations_variables_and_comments():
    markdown = "\n".join(
        [
            "```bash",
            "P=examples/x",
            ".venv/bin/python $P/a.py --flag 1 \\",
            '    --prompt "Hello there"   # a comment',
            "# only a comment",
            "bash ${P}/b.sh key.name=5",
            "```",
            "```",
            ".venv/bin/python not_shell.py",
            "```",
            "```bash",
            "bash $P/c.sh",
            "```",
        ]
    )
    commands = extract_commands(markdown)
    assert [(c.line, c.argv, c.undefined) for c in commands] == [
        (3, [".venv/bin/python", "examples/x/a.py", "--flag", "1", "--prompt", "Hello there"], []),
        (6, ["bash", "examples/x/b.sh", "key.name=5"], []),
        (12, ["bash", "$P/c.sh"], ["P"]),  # a block does not see another block's variables
    ]
    assert decide(commands[2], []).action == "undecided"
    with pytest.raises(ValueError, match="continuation"):
        extract_commands("```bash\nbash a.sh \\\n```")


def test_extraction_finds_the_expected_commands():
    """Every command in EXPECTED is extracted and gets the action EXPECTED names."""
    found = {command.text: decision.action for command, decision in zip(COMMANDS, DECISIONS, strict=True)}
    missing = [text for text in EXPECTED if text not in found]
    assert not missing, (
        "README commands the extractor no longer finds (moved out of a ```bash block, or changed?):\n"
        + ("\n".join(missing))
    )
    assert {text: found[text] for text in EXPECTED} == EXPECTED


def test_every_command_has_a_decision():
    """Each extracted command is run, checked with --print-config, or skipped with a reason; none is dropped."""
    assert len(COMMANDS) == len(DECISIONS) >= len(EXPECTED)
    undecided = [
        f"README.md:{c.line}: {c.text}\n    {d.reason}"
        for c, d in zip(COMMANDS, DECISIONS, strict=True)
        if d.action == "undecided"
    ]
    assert not undecided, "README commands with no rule in test_readme_commands.decide:\n" + "\n".join(undecided)
    assert all(d.reason for d in DECISIONS if d.action in ("skip", "config"))


@pytest.mark.parametrize(
    "index", range(len(COMMANDS)), ids=[_name(c, d) for c, d in zip(COMMANDS, DECISIONS, strict=True)]
)
def test_readme_command(index, sandbox):
    """Runs the README's command ``index``, after the earlier commands that write what it reads (``prerequisites``)."""
    command, decision = COMMANDS[index], DECISIONS[index]
    if decision.action == "skip":
        pytest.skip(f"README.md:{command.line}: {decision.reason}")
    if decision.action == "undecided":
        pytest.fail(f"README.md:{command.line}: {command.text}: no rule: {decision.reason}")
    for earlier in prerequisites(index):
        if earlier not in sandbox.done:
            _execute(sandbox, earlier)
        if sandbox.done[earlier] != "ok":
            pytest.fail(f"README.md:{COMMANDS[earlier].line}, which writes what this command reads, failed")
    _execute(sandbox, index)
