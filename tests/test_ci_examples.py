"""The example workflows a model team copies must parse and call the harness's real commands."""
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "ci").glob("*.yml"))


def _commands(doc):
    for job in doc["jobs"].values():
        for step in job["steps"]:
            if "run" in step:
                yield step["run"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_workflow_parses(path):
    doc = yaml.safe_load(path.read_text())
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as True
    assert triggers and doc["jobs"], path
    for job in doc["jobs"].values():
        assert job["steps"] and "runs-on" in job and job.get("timeout-minutes")


def test_pr_gate_runs_the_readme_test_command():
    doc = yaml.safe_load((ROOT / "examples/ci/pr-gate.yml").read_text())
    commands = "\n".join(_commands(doc))
    assert "pytest -n auto" in commands and "invariants check" in commands
    assert "constraints.txt" in commands
    assert "pull_request" in doc.get("on", doc.get(True))


def test_gpu_job_regenerates_only_cuda_keys_and_uploads_artifacts():
    doc = yaml.safe_load((ROOT / "examples/ci/golden-gpu-regenerate.yml").read_text())
    commands = "\n".join(_commands(doc))
    assert "invariants golden --device cuda --update" in commands
    assert "--device cpu" not in commands
    triggers = doc.get("on", doc.get(True))
    assert "workflow_dispatch" in triggers and "schedule" in triggers
    uploads = [s for j in doc["jobs"].values() for s in j["steps"]
               if s.get("uses", "").startswith("actions/upload-artifact")]
    paths = uploads[0]["with"]["path"]
    assert "golden/*/cuda-*.json" in paths and "golden-obtained/" in paths
