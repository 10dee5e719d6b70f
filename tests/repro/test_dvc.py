"""dvc.yaml generation (fast, unit level) and DVC's behaviour on a tiny copy of the project (slow).

The slow tests share one project reproduced once (tests/project_copy.py); each makes one edit,
runs `dvc repro` and checks which stages ran, from DVC's "Running stage 'x'" lines.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft_pipeline.common.config import DataConfig
from sft_pipeline.data import sources
from sft_pipeline.repro import dvc_stages
from sft_pipeline.repro.dvc_stages import CodeGraph, ConfigFile, DvcGenerationError, Project
from tests import project_copy as pc

# ---------------------------------------------------------------------------------------------
# Import graph on a small fake package

FAKE_PACKAGE = {
    "__init__.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fakepkg.heavy import X\n"
    ),
    "config.py": "import json\n",
    "heavy.py": "",
    "deep.py": "",
    "alpha.py": "from fakepkg import config\nfrom .shared import helper\n",
    "shared.py": "def helper():\n    from fakepkg.deep import thing\n",
    "beta.py": "import fakepkg.config\n",
    "io.py": "from fakepkg import atomic\n",
    "atomic.py": "",
    "settings.py": "",
    "pipelines/__init__.py": "",
    "pipelines/p/__init__.py": "from .pipeline import create_pipeline\n",
    "pipelines/p/pipeline.py": "from fakepkg.pipelines.p import nodes\n",
    "pipelines/p/nodes.py": (
        "from fakepkg import config as C\n"
        "def _common():\n    from fakepkg.deep import thing\n"
        "def node_a(x):\n    from fakepkg.alpha import run\n    return run(x)\n"
        "def node_b(x):\n    from fakepkg import beta\n    _common()\n"
    ),
}
NODES_MODULE = "fakepkg.pipelines.p.nodes"


@pytest.fixture
def fake_src(tmp_path: Path) -> Path:
    for rel, text in FAKE_PACKAGE.items():
        path = tmp_path / "src" / "fakepkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "src"


def fake_func(name: str):
    def func(*args):
        return None

    func.__module__, func.__name__ = NODES_MODULE, name
    return func


def test_node_code_follows_its_own_imports_only(fake_src: Path) -> None:
    graph = CodeGraph(fake_src, "fakepkg")
    a = dvc_stages.node_modules(graph, fake_func("node_a"))
    b = dvc_stages.node_modules(graph, fake_func("node_b"))
    # node_a: its lazy import, transitively (a relative import, an import inside a function).
    assert a == {"fakepkg", "fakepkg.config", "fakepkg.alpha", "fakepkg.shared", "fakepkg.deep",
                 NODES_MODULE}  # fmt: skip
    # node_b: `from pkg import module`, and a same-module helper it calls.
    assert b == {"fakepkg", "fakepkg.config", "fakepkg.beta", "fakepkg.deep", NODES_MODULE}
    # Never: an `if TYPE_CHECKING:` import, the pipeline wiring, another node's imports.
    assert "fakepkg.heavy" not in a | b
    assert not any(m.startswith("fakepkg.pipelines.p.pipeline") for m in a | b)


def _fake_project(fake_src: Path, **overrides) -> Project:
    root = fake_src.parent
    (root / "data" / "01_raw").mkdir(parents=True)
    for name in ("a.jsonl", "b.jsonl"):
        (root / "data" / "01_raw" / name).write_text("{}\n")
    (root / "requirements.lock").write_text("x==1\n")
    catalog = {
        name: {"type": "fakepkg.io.FileDataset", "filepath": f"data/{name}.json"}
        for name in ("raw", "clean", "metrics", "training_history", "adapter")
    }
    # DVC roles come from the catalog's metadata, next to the kedro-viz layer.
    catalog["metrics"]["metadata"] = {"kedro-viz": {"layer": "x"}, "dvc": {"role": "metrics"}}
    catalog["training_history"]["metadata"] = {"dvc": {"role": "plot", "x": "step", "y": "loss"}}
    fields = dict(
        root=root,
        package="fakepkg",
        source_dir=fake_src,
        env="ci",
        catalog=catalog,
        params={"data": {"path": "data/01_raw/*.jsonl"}, "training": {"output_dir": "ckpt"}},
        param_files=[
            ConfigFile("conf/base/parameters.yml", {"data": {"path": "x"}, "training": {}}),
            ConfigFile("conf/ci/parameters.yml", {"training": {"max_steps": 2}}),
        ],
        catalog_files=[ConfigFile("conf/base/catalog.yml", catalog)],
        file_params=[],  # this package's readers are not in the fake package
    )
    fields.update(overrides)
    return Project(**fields)


def _node(name: str, func: str, inputs: list[str], outputs: list[str]):
    return SimpleNamespace(name=name, func=fake_func(func), inputs=inputs, outputs=outputs)


def test_stages_have_exact_params_deps_and_outs(fake_src: Path) -> None:
    project = _fake_project(fake_src)
    pipeline = SimpleNamespace(
        nodes=[
            _node("read", "node_a", ["params:data"], ["raw"]),
            _node(
                "train_adapter",
                "node_b",
                ["raw", "params:training"],
                ["metrics", "training_history", "adapter"],
            ),
        ]
    )
    stages = dvc_stages.build_dvc_yaml(pipeline, project)["stages"]
    read, train = stages["read"], stages["train_adapter"]
    assert read["cmd"] == "kedro run --pipelines=sft --nodes=read --env=ci"
    # The override file sets no `data` key, so only the base file lists it (DVC fails on a
    # listed key that a file lacks).
    assert read["params"][0] == {"conf/base/parameters.yml": ["data"]}
    assert train["params"][:2] == [
        {"conf/base/parameters.yml": ["training"]},
        {"conf/ci/parameters.yml": ["training"]},
    ]
    assert {"conf/base/catalog.yml": ["raw.type"]} in read["params"]
    # Dataset class module (and what it imports) and settings.py are code every node runs.
    for stage in (read, train):
        assert {"src/fakepkg/io.py", "src/fakepkg/atomic.py", "src/fakepkg/settings.py"} <= set(
            stage["deps"]
        )
        assert "requirements.lock" in stage["deps"]
    assert "src/fakepkg/alpha.py" in read["deps"] and "src/fakepkg/alpha.py" not in train["deps"]
    assert "data/raw.json" in train["deps"]
    assert read["outs"] == ["data/raw.json"]
    assert train["metrics"] == ["data/metrics.json"]
    assert train["plots"] == [{"data/training_history.json": {"x": "step", "y": "loss"}}]
    # The checkpoints folder (training.output_dir) is no out: a fresh clone never has it.
    assert train["outs"] == ["data/adapter.json"]


def test_an_unknown_dvc_role_in_the_catalog_is_an_error(fake_src: Path) -> None:
    project = _fake_project(fake_src)
    project.catalog["raw"]["metadata"] = {"dvc": {"role": "metric"}}
    pipeline = SimpleNamespace(nodes=[_node("read", "node_a", ["params:data"], ["raw"])])
    with pytest.raises(DvcGenerationError, match=r"'raw'.*metadata\.dvc\.role.*metrics"):
        dvc_stages.build_dvc_yaml(pipeline, project)


def test_files_named_by_params_are_deps_of_the_node_that_reads_them(fake_src: Path) -> None:
    # `data.path` is read by the node whose code runs the ingestion module.
    (fake_src / "fakepkg" / "data").mkdir()
    (fake_src / "fakepkg" / "data" / "__init__.py").write_text("")
    (fake_src / "fakepkg" / "data" / "ingestion.py").write_text("")
    (fake_src / "fakepkg" / "alpha.py").write_text("from fakepkg.data import ingestion\n")
    # The real resolver of `data.path`, standing in for the fake package's reader.
    reader = dvc_stages.FileParam(
        "data", DataConfig, sources.local_data_files, reader="fakepkg.data.ingestion"
    )
    project = _fake_project(fake_src, file_params=[reader])
    pipeline = SimpleNamespace(
        nodes=[
            _node("read", "node_a", ["params:data"], ["raw"]),
            _node("other", "node_b", ["raw", "params:data"], ["clean"]),
        ]
    )
    stages = dvc_stages.build_dvc_yaml(pipeline, project)["stages"]
    assert stages["read"]["deps"][:2] == ["data/01_raw/a.jsonl", "data/01_raw/b.jsonl"]
    assert not any(d.startswith("data/01_raw") for d in stages["other"]["deps"])


def test_a_reader_module_that_no_longer_exists_fails_generation(fake_src: Path) -> None:
    # A renamed or deleted reader must not silently drop its files from the deps.
    gone = dvc_stages.FileParam(
        "data", DataConfig, sources.local_data_files, reader="fakepkg.renamed_away"
    )
    project = _fake_project(fake_src, file_params=[gone])
    pipeline = SimpleNamespace(nodes=[_node("read", "node_a", ["params:data"], ["raw"])])
    with pytest.raises(DvcGenerationError, match=r"'data'.*fakepkg\.renamed_away.*no source"):
        dvc_stages.build_dvc_yaml(pipeline, project)


def test_every_reader_of_the_real_project_is_a_module_its_node_runs(real_stages) -> None:
    # Each parameter section that names files has a resolver whose module exists and is run by
    # the node reading that section: a rename that broke this would empty the deps silently.
    pipeline, _stages = real_stages
    from sft_pipeline.repro.code_graph import node_modules, package_graph

    graph = package_graph()
    runs = {n.name: node_modules(graph, n.func) for n in pipeline.nodes}
    readers = {
        "data": "ingest_records",
        "template": "render_conversations",
        "model": "prepare_base_model",
        "evaluation": "evaluate_model",
    }
    for fp in dvc_stages.FILE_PARAMS:
        assert graph.module_file(fp.module) is not None, fp.module
        assert fp.module in runs[readers[fp.section]], (fp.section, fp.module)


def test_a_local_model_folder_is_a_dep_of_prepare_base_model(tmp_path: Path) -> None:
    from sft_pipeline.repro.dvc_check import load_project

    root = pc.make_project(tmp_path / "project", with_model=False)
    (root / pc.TINY_MODEL).mkdir(parents=True)
    (root / pc.TINY_MODEL / "config.json").write_text("{}")
    pipeline, project = load_project(root, pc.TINY_ENV)
    stages = dvc_stages.build_dvc_yaml(pipeline, project)["stages"]
    owners = {name for name, s in stages.items() if pc.TINY_MODEL in s["deps"]}
    assert owners == {"prepare_base_model"}


def test_benchmark_task_and_data_files_are_deps_of_evaluate_model_only(real_stages) -> None:
    _pipeline, stages = real_stages
    files = ("conf/base/benchmarks/sft_probe.yaml", "conf/base/benchmarks/data/probe.jsonl")
    for path in files:
        assert {n for n, s in stages.items() if path in s["deps"]} == {"evaluate_model"}, path


def test_memory_dataset_between_nodes_is_an_error(fake_src: Path) -> None:
    project = _fake_project(fake_src)
    pipeline = SimpleNamespace(nodes=[_node("read", "node_a", ["params:data"], ["in_memory"])])
    with pytest.raises(DvcGenerationError, match=r"in_memory.*filepath"):
        dvc_stages.build_dvc_yaml(pipeline, project)


# ---------------------------------------------------------------------------------------------
# The real project


@pytest.fixture(scope="module")
def real_stages() -> dict:
    from sft_pipeline.repro.dvc_check import load_project

    pipeline, project = load_project(pc.PROJECT_ROOT, "base")
    return pipeline, dvc_stages.build_dvc_yaml(pipeline, project)["stages"]


def test_committed_dvc_yaml_is_current() -> None:
    # `kedro dvc check` regenerates dvc.yaml and fails, with a diff, when it differs.
    pc.run(["kedro", "dvc", "check"], pc.PROJECT_ROOT, timeout=120)


def test_real_stages_match_the_pipeline(real_stages) -> None:
    pipeline, stages = real_stages
    assert list(stages) == [n.name for n in pipeline.nodes]
    for node in pipeline.nodes:
        stage = stages[node.name]
        assert stage["cmd"] == f"kedro run --pipelines=sft --nodes={node.name} --env=base"
        sections = {i.removeprefix("params:") for i in node.inputs if i.startswith("params:")}
        listed = [
            key
            for entry in stage.get("params", [])
            for key in entry.get("conf/base/parameters_sft.yml", [])
        ]
        assert set(listed) == sections, node.name
        # Shared code is a dep of every stage.
        for shared in (
            "common/config.py",
            "artifact_io.py",
            "common/atomic.py",
            "pipelines/sft/nodes.py",
        ):
            assert f"src/sft_pipeline/{shared}" in stage["deps"], (node.name, shared)
    # A node's own library module is a dep of that node only.
    # A library module is a dep of the nodes whose code imports it, and of no other.
    expected = {
        "data/ingestion.py": {"ingest_records"},
        "evaluation/evaluate.py": {"evaluate_model"},
        "evaluation/metrics.py": {"evaluate_model", "report_run"},  # the report lists its names
        "evaluation/report.py": {"report_run"},
        # The page it renders, a file beside it: a change to it re-runs the report.
        "evaluation/report.html.jinja": {"report_run"},
        # The report draws its plots without loading a model: no trainer code in its deps.
        "trainer/loss.py": {"train_adapter", "evaluate_model"},
    }
    for module, nodes in expected.items():
        owners = {n for n, s in stages.items() if f"src/sft_pipeline/{module}" in s["deps"]}
        assert owners == nodes, module
    assert "data/01_raw/demo_sft.jsonl" in stages["ingest_records"]["deps"]
    assert "src/sft_pipeline/data/templates" in stages["render_conversations"]["deps"]
    assert all("checkpoints" not in str(out) for out in stages["train_adapter"]["outs"])


# ---------------------------------------------------------------------------------------------
# DVC on a tiny copy of the project


@pytest.fixture
def project(tmp_path_factory):
    root, _, _ = pc.reproduced_project(tmp_path_factory)
    with pc.restored(root):
        yield root


def repro(root: Path) -> set[str]:
    return pc.ran_stages(pc.run(["dvc", "repro"], root))


DOWNSTREAM_OF_TRAINING = {
    "train_adapter",
    "merge_adapter",
    "evaluate_model",
    "export_model",
    "report_run",
}
FROM_TOKENIZATION = {"tokenize_conversations", *DOWNSTREAM_OF_TRAINING}
FROM_RENDERING = {"render_conversations", *FROM_TOKENIZATION}


@pytest.mark.slow
@pytest.mark.long
def test_full_repro_then_nothing_to_do(tmp_path_factory) -> None:
    root, first, _ = pc.reproduced_project(tmp_path_factory)
    assert pc.ran_stages(first) == set(pc.STAGES)
    second = pc.run(["dvc", "repro"], root)
    assert pc.ran_stages(second) == set(), second
    assert "Data and pipelines are up to date" in second
    assert (root / "dvc.lock").is_file()


def _changed_stages(root: Path) -> set[str]:
    return set(json.loads(pc.run(["dvc", "status", "--json"], root)))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("section", "key", "value", "stage"),
    [
        ("tokenization", "batch_size", 7, "tokenize_conversations"),
        ("evaluation", "max_new_tokens", 5, "evaluate_model"),
        # Read by ingestion only: the merge's model card shows other data keys.
        ("data", "chunk_rows", 7, "ingest_records"),
    ],
)
def test_a_parameter_invalidates_exactly_the_node_that_reads_it(
    project: Path, section: str, key: str, value: int, stage: str
) -> None:
    # conf/base lists every key a node reads (an override file lists only the keys it sets).
    base = pc.params_path(project, "base")
    before = base.read_text()  # the project fixture starts reproduced: nothing changed
    pc.set_params(project, {section: {key: value}}, env="base")
    try:
        assert _changed_stages(project) == {stage}
    finally:
        base.write_text(before)
    assert _changed_stages(project) == set()


@pytest.mark.slow
def test_replacing_a_local_model_folders_weights_invalidates_prepare_base_model(
    project: Path,
) -> None:
    weights = project / pc.TINY_MODEL / "model.safetensors"
    original = weights.read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 0x01  # one bit of the last tensor's data
    weights.write_bytes(bytes(changed))
    try:
        assert "prepare_base_model" in _changed_stages(project)
    finally:
        weights.write_bytes(original)
    assert _changed_stages(project) == set()


@pytest.mark.slow
def test_a_repro_with_a_stale_dvc_yaml_stops_before_running_old_deps(project: Path) -> None:
    # data.path moves to another file, and nobody regenerates dvc.yaml: the old file would
    # stay the dep, so a later edit of the new one would never re-run anything.
    other = project / "data" / "01_raw" / "other.jsonl"
    shutil.copy(project / pc.RAW_DATA, other)
    base = pc.params_path(project, "base")
    before = base.read_text()
    records = _md5s(project, "data/02_intermediate/records.parquet")
    lock = (project / "dvc.lock").read_text()
    pc.set_params(project, {"data": {"path": "data/01_raw/other.jsonl"}}, env="base")
    try:
        proc = subprocess.run(
            ["dvc", "repro"], cwd=project, env=pc.env(), capture_output=True, text=True
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output
        assert "dvc.yaml is stale" in output and "kedro dvc generate --env tiny" in output
        assert "Traceback" not in output
        # Nothing was recorded: DVC removed the stage's out before its command, which stopped
        # at once; the lock still holds the last good run, whose out the cache restores.
        assert (project / "dvc.lock").read_text() == lock
    finally:
        base.write_text(before)
        other.unlink()
    pc.run(["dvc", "checkout"], project)
    assert _md5s(project, "data/02_intermediate/records.parquet") == records
    assert _changed_stages(project) == set()


@pytest.mark.slow
def test_max_seq_length_reruns_from_tokenization(project: Path) -> None:
    stats = pc.read_json(project, "data/08_reporting/token_stats.json")
    longest = max(s["input_length"]["max"] for s in stats["splits"].values())
    # One token shorter than the longest row: that row is truncated, so the tokens change.
    pc.set_params(project, {"tokenization": {"max_seq_length": longest - 1}})
    before = pc.file_bytes(project, "data/05_model_input/train_tokens")
    before |= pc.file_bytes(project, "data/05_model_input/eval_tokens")
    # Tokenization re-runs and its outputs change, which invalidates every stage after it
    # (the raw-data test and the learning-rate experiment show those re-running for real).
    ran = pc.ran_stages(
        pc.run(["dvc", "repro", "--single-item", "tokenize_conversations"], project)
    )
    assert ran == {"tokenize_conversations"}
    after = pc.file_bytes(project, "data/05_model_input/train_tokens")
    after |= pc.file_bytes(project, "data/05_model_input/eval_tokens")
    assert after != before
    assert _changed_stages(project) == {"train_adapter", "evaluate_model", "report_run"}


CUSTOM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + ' VERB\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant VERB\\n' }}{%- endif -%}"
)


@pytest.mark.slow
def test_chat_template_param_and_file_rerun_from_rendering(project: Path) -> None:
    template = project / "conf" / pc.TINY_ENV / "chat_template.jinja"
    template.write_text(CUSTOM_TEMPLATE.replace("VERB", "says"))
    pc.set_params(project, {"template": {"chat_template": "conf/tiny/chat_template.jinja"}})
    pc.run(["kedro", "dvc", "generate", "--env", pc.TINY_ENV], project)  # a new file dep
    # The parameter invalidates rendering, the merge (whose tokenizer carries the template) and
    # the evaluation (benchmarks are prompted as training rendered); downstream follows once
    # rendering's outputs change, as the full repro below shows...
    reading_it = {"render_conversations", "merge_adapter", "evaluate_model"}
    assert _changed_stages(project) == reading_it
    # ...and the file it names invalidates rendering too.
    pc.run(["dvc", "commit", "-f", "render_conversations"], project)
    assert _changed_stages(project) == {"merge_adapter", "evaluate_model"}
    template.write_text(CUSTOM_TEMPLATE.replace("VERB", "writes"))
    assert _changed_stages(project) == reading_it
    # Rendering re-runs and its texts change, which invalidates tokenization in turn (the
    # raw-data test shows the data half's chain re-running for real).
    before = pc.file_bytes(project, "data/04_feature/train_texts.jsonl")
    ran = pc.ran_stages(pc.run(["dvc", "repro", "--single-item", "render_conversations"], project))
    assert ran == {"render_conversations"}
    assert pc.file_bytes(project, "data/04_feature/train_texts.jsonl") != before
    # The report counts a mixture's rendered rows, so it reads the texts too.
    readers = {"tokenize_conversations", "report_run"}
    assert _changed_stages(project) == {*readers, "merge_adapter", "evaluate_model"}


@pytest.mark.slow
def test_a_benchmark_item_edit_invalidates_the_evaluation_only(project: Path) -> None:
    probe = project / "conf/base/benchmarks/data/probe.jsonl"
    with probe.open("a") as f:
        f.write(
            '{"id": "extra", "question": "What is 1 + 1?", "choices": ["2", "3"], "answer": 0}\n'
        )
    assert _changed_stages(project) == {"evaluate_model"}


@pytest.mark.slow
def test_raw_data_edit_reruns_from_ingestion(project: Path) -> None:
    extra = (pc.PROJECT_ROOT / pc.RAW_DATA).read_text().splitlines()[100:106]
    with (project / pc.RAW_DATA).open("a") as f:
        f.write("\n".join(extra) + "\n")
    assert _changed_stages(project) == {"ingest_records"}
    # The data half re-runs for real, each stage because the one before changed its output;
    # the tokens then invalidate training and what reads them (the learning-rate experiment
    # shows training and everything after it re-running for real).
    data_half = {
        "ingest_records",
        "validate_records",
        "split_records",
        "render_conversations",
        "tokenize_conversations",
    }
    before = pc.file_bytes(project, "data/05_model_input/train_tokens")
    ran = pc.ran_stages(pc.run(["dvc", "repro", "tokenize_conversations"], project))
    assert ran == data_half
    assert pc.file_bytes(project, "data/05_model_input/train_tokens") != before
    assert _changed_stages(project) == {"train_adapter", "evaluate_model", "report_run"}


@pytest.mark.slow
def test_library_source_edit_reruns_that_node_and_downstream_only(project: Path) -> None:
    # splitting.py is imported by split_records' code only.
    with (project / "src/sft_pipeline/data/splitting.py").open("a") as f:
        f.write("\n# an edit\n")
    status = json.loads(pc.run(["dvc", "status", "--json"], project))
    assert set(status) == {"split_records"}, status
    ran = repro(project)
    # Downstream stages re-run when the node's outputs change; splitting is deterministic, so a
    # comment leaves them byte-identical and DVC stops there.
    assert "split_records" in ran and ran <= {"split_records", *FROM_RENDERING}, ran


def _md5s(root: Path, relpath: str) -> dict[str, str]:
    return {k: hashlib.md5(v).hexdigest() for k, v in pc.file_bytes(root, relpath).items()}


@pytest.mark.slow
def test_deleted_outputs_are_restored_from_cache_without_rerunning(project: Path) -> None:
    targets = ["data/03_primary/train_records.parquet", "data/05_model_input/train_tokens"]
    before = {t: _md5s(project, t) for t in targets}
    (project / targets[0]).unlink()
    shutil.rmtree(project / targets[1])
    out = pc.run(["dvc", "repro"], project)
    assert pc.ran_stages(out) == set(), out
    assert {t: _md5s(project, t) for t in targets} == before


@pytest.mark.slow
def test_same_params_give_byte_identical_data_artifacts(tmp_path: Path, tmp_path_factory) -> None:
    # A second, clean copy run by `kedro run` (not DVC): same bytes as the first `dvc repro`,
    # so the data half is deterministic and Kedro and DVC write the same artifacts.
    shared, _, snapshot = pc.reproduced_project(tmp_path_factory)
    root = pc.make_project(tmp_path / "again", model_dir=shared / pc.TINY_MODEL)
    pc.run(
        ["kedro", "run", "--pipelines=sft", "--to-nodes=tokenize_conversations", "--env=tiny"],
        root,
    )
    again = {k: v for a in pc.DATA_ARTIFACTS for k, v in pc.file_bytes(root, a).items()}
    assert sorted(again) == sorted(snapshot)
    differ = [k for k in snapshot if again[k] != snapshot[k]]
    assert not differ, f"not byte-identical: {differ}"


@pytest.mark.slow
def test_each_source_of_a_mixture_is_its_own_dep_and_an_edit_names_only_its_file(
    project: Path,
) -> None:
    import yaml

    from tests.data.test_mixture import _write_sources

    mixture = _write_sources(project / "data" / "01_raw")
    for source in mixture:
        source["path"] = Path(source["path"]).relative_to(project).as_posix()
    pc.set_params(project, {"data": {"sources": mixture}})
    pc.run(["kedro", "dvc", "generate", "--env", pc.TINY_ENV], project)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    raw = [d for d in stages["ingest_records"]["deps"] if d.startswith("data/01_raw/")]
    assert raw == [source["path"] for source in mixture]  # and not data.path's file
    ran = pc.ran_stages(pc.run(["dvc", "repro", "--single-item", "ingest_records"], project))
    assert ran == {"ingest_records"}
    edited = mixture[2]["path"]
    with (project / edited).open("a") as f:
        f.write(json.dumps({"question": "One more?", "reply": "Yes."}) + "\n")
    status = json.loads(pc.run(["dvc", "status", "--json", "ingest_records"], project))
    assert status == {"ingest_records": [{"changed deps": {edited: "modified"}}]}, status
