"""kedro-viz: the static site builds offline and shows the `sft` pipeline with its layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests import project_copy as pc

# Kedro's layer convention, in data-flow order; kedro-viz shows them only when the catalog's
# layers form no cycle along the pipeline (otherwise it logs a warning and shows none).
KEDRO_LAYERS = [
    "raw",
    "intermediate",
    "primary",
    "feature",
    "model_input",
    "models",
    "model_output",
    "reporting",
]


@pytest.fixture(scope="module")
def viz_build(tmp_path_factory) -> tuple[Path, str]:
    # A copy, because `kedro viz build` always writes ./build in the project.
    root = pc.make_project(tmp_path_factory.mktemp("viz") / "project", with_model=False)
    output = pc.run(["kedro", "viz", "build"], root, timeout=300)
    return root, output


@pytest.mark.slow
def test_viz_build_lists_every_node_and_dataset_with_its_layer(viz_build) -> None:
    root, output = viz_build
    from sft_pipeline.pipelines.sft.pipeline import create_pipeline

    site = json.loads((root / "build/api/pipelines/sft").read_text())
    by_type: dict[str, dict[str, dict]] = {}
    for node in site["nodes"]:
        by_type.setdefault(node["type"], {})[node["name"]] = node
    pipeline = create_pipeline()
    assert set(by_type["task"]) == {n.name for n in pipeline.nodes}
    params = {i for n in pipeline.nodes for i in n.inputs if i.startswith("params:")}
    assert set(by_type["parameters"]) == params
    # Node parameters are shown on the task nodes.
    assert "training" in by_type["task"]["train_adapter"]["parameters"]

    catalog = yaml.safe_load((root / "conf/base/catalog.yml").read_text())
    layers = {name: entry["metadata"]["kedro-viz"]["layer"] for name, entry in catalog.items()}
    assert {name: by_type["data"][name]["layer"] for name in layers} == layers
    assert set(by_type["data"]) == set(layers)
    assert "circular dependency" not in output, output[-3000:]
    # kedro-viz orders layers topologically; `raw` (the base model's manifest, the only raw
    # catalog entry: raw data files are read through params:data) has no upstream, so it may
    # come before or after `intermediate`. Every other layer keeps Kedro's conventional order.
    assert sorted(site["layers"]) == sorted(set(layers.values()))
    shown = [layer for layer in site["layers"] if layer != "raw"]
    assert shown == [layer for layer in KEDRO_LAYERS if layer in shown]
    assert site["layers"].index("raw") < site["layers"].index("feature")
    assert (root / "build/index.html").is_file()
