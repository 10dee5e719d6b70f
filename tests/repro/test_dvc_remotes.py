"""A run shared through DVC remotes: pushed from one clone and pulled (or an experiment applied) in
a fresh one with nothing to run, through a folder remote and a real S3-compatible server (moto,
in server mode on loopback) with the credentials of conf/local/credentials.yml given to DVC by
`kedro dvc credentials`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import project_copy as pc

pytestmark = pytest.mark.slow


BUCKET = "sft-runs"
POLICY = (
    '{"Version": "2012-10-17", "Statement": '
    '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'
)


@pytest.fixture(scope="module")
def s3_server():
    """(endpoint URL, access key id, secret key) of a moto server that checks credentials."""
    pytest.importorskip(
        "dvc_s3", reason="DVC's S3 plugin is the `s3` extra (make setup installs it)"
    )
    pytest.importorskip("moto", reason="moto (the loopback S3 server) is a dev dependency")
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Authentication is on after the first four requests, which set up a user and the bucket.
    env = {**pc.env(), "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        setup = dict(
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="ci")
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        iam.put_user_policy(UserName="ci", PolicyName="s3", PolicyDocument=POLICY)
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.kill()
        server.wait()


def write_credentials(project: Path, key_id: str, secret: str) -> None:
    entry = {"storage": {"access_key_id": key_id, "secret_access_key": secret}}
    (project / "conf/local").mkdir(parents=True, exist_ok=True)
    (project / "conf/local/credentials.yml").write_text(yaml.safe_dump({"dvc_remotes": entry}))


def test_a_run_pushed_to_s3_is_pulled_into_a_fresh_clone_with_nothing_to_run(
    s3_server, tmp_path_factory, tmp_path
):
    url, key_id, secret = s3_server
    shared, _, _ = pc.reproduced_project(tmp_path_factory)
    a = tmp_path / "a"
    shutil.copytree(shared, a, symlinks=True)
    pc.run(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/cache"], a)
    pc.run(["dvc", "remote", "modify", "storage", "endpointurl", url], a)
    pc.run(["git", "add", "-A"], a)
    pc.run(["git", "commit", "-q", "-m", "run, with its remote"], a)
    write_credentials(a, key_id, secret)
    out = pc.run(["kedro", "dvc", "credentials"], a)
    assert "credentials of storage written to .dvc/config.local and checked" in out
    # The secret stays out of the committed configuration.
    assert secret not in (a / ".dvc/config").read_text()
    pc.run(["dvc", "push"], a)

    b = tmp_path / "b"
    pc.run(["git", "clone", "-q", str(a), str(b)], tmp_path)
    write_credentials(b, key_id, secret)
    pc.run(["kedro", "dvc", "credentials"], b)
    pc.run(["dvc", "pull"], b)
    # Clone B is fresh: it never ran a stage and has no checkpoints folder.
    assert not (b / "data/06_models/checkpoints").exists()
    assert json.loads(pc.run(["dvc", "status", "--json"], b)) == {}
    assert pc.ran_stages(pc.run(["dvc", "repro"], b)) == set()
    # The pulled model answers.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("What is the capital of France?") + "\n")
    answers = tmp_path / "answers.jsonl"
    model = ["--model", "data/06_models/merged", "--max-new-tokens", "4"]
    pc.run(["kedro", "sft", "generate", *model, "--prompts", str(prompts), "-o", str(answers)], b)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["num_tokens"] >= 1


def test_a_wrong_credential_is_one_clear_error_naming_the_remote(s3_server, tmp_path):
    url, key_id, _ = s3_server
    project = pc.make_project(tmp_path / "project")
    pc.init_repo(project)
    pc.run(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/cache"], project)
    pc.run(["dvc", "remote", "modify", "storage", "endpointurl", url], project)
    write_credentials(project, key_id, "not-the-secret")
    proc = subprocess.run(
        ["kedro", "dvc", "credentials"], cwd=project, env=pc.env(), capture_output=True, text=True
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"DVC remote 'storage' (s3://{BUCKET}/cache) refused the credentials" in output
    assert "conf/local/credentials.yml: dvc_remotes.storage" in output
    assert "Traceback" not in output
    # A typo in the remote's name names the nearest one.
    entry = {"storag": {"access_key_id": key_id, "secret_access_key": "x"}}
    (project / "conf/local/credentials.yml").write_text(yaml.safe_dump({"dvc_remotes": entry}))
    proc = subprocess.run(
        ["kedro", "dvc", "credentials"], cwd=project, env=pc.env(), capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "no DVC remote 'storag' (did you mean 'storage'?)" in proc.stdout + proc.stderr


def pushed_clone(tmp_path_factory, tmp_path) -> tuple[Path, Path]:
    """(clone A, its git origin): the reproduced project with its run committed and pushed, the
    git history to a bare repository, the artifacts to a DVC remote folder."""
    shared, _, _ = pc.reproduced_project(tmp_path_factory)
    a = tmp_path / "a"
    shutil.copytree(shared, a, symlinks=True)
    origin = tmp_path / "origin.git"
    pc.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    pc.run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], a)
    pc.run(["git", "remote", "add", "origin", str(origin)], a)
    pc.run(["git", "add", "-A"], a)
    pc.run(["git", "commit", "-q", "-m", "run"], a)
    pc.run(["git", "push", "-q", "origin", "main"], a)
    pc.run(["dvc", "push"], a)
    return a, origin


@pytest.mark.slow
@pytest.mark.long
def test_an_experiment_pushed_from_one_clone_applies_in_another_with_nothing_to_run(
    tmp_path_factory, tmp_path
) -> None:
    a, origin = pushed_clone(tmp_path_factory, tmp_path)
    # A parameter of the evaluation: the experiment re-runs it and the report, and what it
    # produced must arrive in clone B without a stage running there.
    params = f"{pc.params_path(Path())}:evaluation.max_new_tokens=3"  # the stages' environment
    pc.run(["dvc", "exp", "run", "-n", "short-answers", "-S", params], a)
    metrics = "data/08_reporting/metrics.json"
    produced = (a / metrics).read_bytes()
    assert pc.read_json(a, metrics)["tuned/mean_generated_tokens"] <= 3
    pc.run(["dvc", "exp", "push", "origin", "short-answers"], a)  # git refs and DVC cache
    b = tmp_path / "b"
    pc.run(["git", "clone", "-q", str(origin), str(b)], tmp_path)
    pc.run(["dvc", "exp", "pull", "origin", "short-answers"], b)
    pc.run(["dvc", "exp", "apply", "short-answers"], b)
    pc.run(["dvc", "pull"], b)
    assert json.loads(pc.run(["dvc", "status", "--json"], b)) == {}
    assert pc.ran_stages(pc.run(["dvc", "repro"], b)) == set()
    assert (b / metrics).read_bytes() == produced
    assert "max_new_tokens: 3" in pc.params_path(b).read_text()
