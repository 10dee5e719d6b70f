"""A throw-away copy of this project with a tiny configuration, for DVC, kedro-viz and notebook
tests: tests edit parameters, sources and data there and never touch the working tree."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY_ENV = "tiny"
TINY_MODEL = "models/tiny-llama"
RAW_DATA = "data/01_raw/demo_sft.jsonl"
DATA_LAYERS = (
    "01_raw",
    "02_intermediate",
    "03_primary",
    "04_feature",
    "05_model_input",
    "06_models",
    "07_model_output",
    "08_reporting",
)
# Small enough for seconds per stage on 2 CPU cores; full precision LoRA (4-bit on CPU is slower).
TINY_PARAMS = {
    "data": {"eval_fraction": 0.25},
    "model": {"name_or_path": TINY_MODEL},
    "quantization": {"load_in_4bit": False},
    "lora": {"r": 4, "alpha": 8},
    "tokenization": {"max_seq_length": 256},
    "training": {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "save_steps": 1000,
        "precision": "fp32",
    },
    "evaluation": {"max_samples": 2, "max_new_tokens": 8, "batch_size": 2},
}
_RUNNING = re.compile(r"Running stage '([^']+)'")


def env() -> dict[str, str]:
    """The environment for subprocesses: this venv first on PATH (DVC runs `kedro` from it)."""
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "KEDRO_DISABLE_TELEMETRY": "1",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # A copy has no tools/ of its own: its GGUF exports are checked by this checkout's
        # llama.cpp client (`make llamacpp`), as the project's own runs are.
        "SFT_PIPELINE_LLAMACPP": str(PROJECT_ROOT / "tools" / "llamacpp"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def run(
    args: list[str], cwd: Path, timeout: float = 900, extra_env: dict[str, str] | None = None
) -> str:
    """Run a command (with `extra_env` added to `env()`); on failure, fail with its whole
    output (the useful part is at the end)."""
    proc = subprocess.run(
        args,
        cwd=cwd,
        env={**env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"`{' '.join(args)}` failed ({proc.returncode}):\n{output[-6000:]}")
    return output


def kedro(project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m kedro ARGS` in `project` with `env()`; the caller checks how it ended."""
    return subprocess.run(
        [sys.executable, "-m", "kedro", *args],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ran_stages(dvc_output: str) -> set[str]:
    """Stages DVC executed, from its "Running stage 'x'" lines."""
    return set(_RUNNING.findall(dvc_output))


def make_project(
    dst: Path, *, records: int = 16, model_dir: Path | None = None, with_model: bool = True
) -> Path:
    """Copy the project's code and config into `dst` with `records` demo records and the tiny
    configuration as Kedro environment `tiny`; `model_dir` is reused instead of a new model."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".ipynb_checkpoints")
    shutil.copytree(PROJECT_ROOT / "src", dst / "src", ignore=ignore)
    shutil.copytree(PROJECT_ROOT / "conf", dst / "conf", ignore=shutil.ignore_patterns("local"))
    (dst / "conf" / "local").mkdir()
    for name in ("pyproject.toml", "requirements.lock", ".dvcignore", ".gitignore"):
        if (PROJECT_ROOT / name).is_file():
            shutil.copy2(PROJECT_ROOT / name, dst / name)
    for layer in DATA_LAYERS:
        (dst / "data" / layer).mkdir(parents=True)
    lines = (PROJECT_ROOT / RAW_DATA).read_text(encoding="utf-8").splitlines()[:records]
    (dst / RAW_DATA).write_text("\n".join(lines) + "\n", encoding="utf-8")
    set_params(dst, TINY_PARAMS)
    if model_dir is not None:
        shutil.copytree(model_dir, dst / TINY_MODEL)
    elif with_model:
        from tests.conftest import save_tiny_model

        save_tiny_model(dst / TINY_MODEL)
    return dst


def params_path(root: Path, env: str = TINY_ENV) -> Path:
    return root / "conf" / env / "parameters_sft.yml"


def set_params(root: Path, values: dict, env: str = TINY_ENV) -> None:
    """Deep-merge `values` into conf/<env>/parameters_sft.yml."""
    path = params_path(root, env)
    current = yaml.safe_load(path.read_text()) if path.is_file() else {}

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(current, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(current, sort_keys=False))


def init_repo(root: Path) -> None:
    """git + DVC, with everything committed (`dvc exp run` needs a HEAD commit)."""
    run(["git", "init", "-q", "-b", "main"], root)
    run(["dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "project"], root)


def read_json(root: Path, relpath: str):
    return json.loads((root / relpath).read_text(encoding="utf-8"))


# One tiny project with a complete `dvc repro`, shared by the slow tests of a session (building
# it is the expensive part). The DVC tests edit it, and each leaves it reproduced again.
_SHARED: dict[str, object] = {}

STAGES = (
    "ingest_records",
    "validate_records",
    "split_records",
    "prepare_base_model",
    "render_conversations",
    "tokenize_conversations",
    "train_adapter",
    "merge_adapter",
    "evaluate_model",
    "export_model",
    "report_run",
)
DATA_ARTIFACTS = (
    "data/02_intermediate/records.parquet",
    "data/03_primary/valid_records.parquet",
    "data/03_primary/train_records.parquet",
    "data/03_primary/eval_records.parquet",
    "data/04_feature/train_texts.jsonl",
    "data/04_feature/eval_texts.jsonl",
    "data/05_model_input/train_tokens",
    "data/05_model_input/eval_tokens",
)


def file_bytes(root: Path, relpath: str) -> dict[str, bytes]:
    """{relative file path: bytes} of a file or of every file under a folder."""
    path = root / relpath
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def reproduced_project(tmp_path_factory) -> tuple[Path, str, dict[str, bytes]]:
    """(project, output of its first full `dvc repro`, data artifact bytes right after it).

    Built once per test session, by whichever worker needs it first (the others wait for it),
    then copied: each worker's tests edit a copy of their own.
    """
    import pickle

    from filelock import FileLock

    if "project" not in _SHARED:
        base = tmp_path_factory.getbasetemp()
        # xdist workers' temp folders sit side by side in the session's folder.
        session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        built, facts = session / "dvc-reproduced" / "project", session / "dvc-reproduced.pickle"
        with FileLock(str(session / "dvc-reproduced.lock")):
            if not facts.is_file():
                make_project(built)
                run(["kedro", "dvc", "generate", "--env", TINY_ENV], built)
                init_repo(built)
                output = run(["dvc", "repro"], built)
                snapshot = {k: v for a in DATA_ARTIFACTS for k, v in file_bytes(built, a).items()}
                facts.write_bytes(pickle.dumps((output, snapshot)))
        root = tmp_path_factory.mktemp("dvc") / "project"
        shutil.copytree(built, root, symlinks=True)
        output, snapshot = pickle.loads(facts.read_bytes())
        _SHARED.update(project=root, output=output, snapshot=snapshot)
    return _SHARED["project"], _SHARED["output"], _SHARED["snapshot"]  # type: ignore[return-value]


# What a test may edit in the shared project, and the training checkpoints (no DVC out, so
# `dvc checkout` cannot restore them); everything else is a cached DVC output.
EDITABLE = ("conf", "data/01_raw", "src", "dvc.yaml", "dvc.lock", "data/06_models/checkpoints")


@contextlib.contextmanager
def restored(root: Path):
    """Run a test's edits on the shared project, then put it back as it was: the edited files
    from a copy, and the outputs its dvc.lock names from DVC's cache (`dvc checkout`), so the
    next test starts from a reproduced project without re-running a stage."""
    import tempfile

    with tempfile.TemporaryDirectory() as keep:
        saved = Path(keep)
        for rel in EDITABLE:
            source = root / rel
            if source.is_dir():
                shutil.copytree(source, saved / rel)
            else:
                (saved / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, saved / rel)
        try:
            yield root
        finally:
            for rel in EDITABLE:
                target = root / rel
                if target.is_dir():
                    shutil.rmtree(target)
                    shutil.copytree(saved / rel, target)
                else:
                    shutil.copy2(saved / rel, target)
            run(["dvc", "checkout", "--force"], root)
