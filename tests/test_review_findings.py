"""Review findings of issue #22, each pinned by a test against the moto server (or pure arithmetic)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from prefect import flow
from prefect_aws import AwsCredentials
from pydantic import SecretStr

from blocks.catalogue import gpu_instances
from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from tasks.core.aws import Aws, aws_client
from tasks.core.naming import resource_name
from tasks.core.secrets import ensure_secret
from tasks.core.state import Endpoint, StackState, save_state
from tasks.targets.ecs import batch_job as ecs_batch
from tasks.targets.ecs import gpu_hosts
from tasks.targets.ecs import service as ecs_service

pytestmark = pytest.mark.integration
REGION = "us-east-1"


def _client_error(code: str, op: str = "DescribeServices") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"injected {code}"},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, op)


# ------------------------------------------------------------ finding 1: the adapter roll names the service


def test_roll_service_updates_the_stacks_service(local_aws, bucket):
    from flows.adapters import _roll_service

    stack = "rollsvc"
    ecs = aws_client("ecs", region=REGION)
    cluster = resource_name(stack, "cluster")
    ecs.create_cluster(clusterName=cluster)
    td = ecs.register_task_definition(family=resource_name(stack, "server"), containerDefinitions=[
        {"name": "vllm", "image": "x", "memory": 512}])["taskDefinition"]["taskDefinitionArn"]
    ecs.create_service(cluster=cluster, serviceName=resource_name(stack, "service"), taskDefinition=td, desiredCount=0)
    state = StackState(stack=stack, target="ecs", settings={"region": REGION, "cluster": None, "desired_count": 2})
    _roll_service(ModelStore(bucket_name=bucket), state)  # ServiceNotFoundException before the fix


# ------------------------------------- finding 5: the API key is read with the ModelStore block's credentials


@pytest.fixture()
def block_only_credentials(local_aws, bucket, monkeypatch):
    """The blocks hold the credentials; the environment has none (no keys, no files, no instance role)."""
    creds = AwsCredentials(aws_access_key_id="testing", aws_secret_access_key=SecretStr("testing"), region_name=REGION)
    store = ModelStore(bucket_name=bucket, credentials=creds)
    arn = ensure_secret("blockcreds", "api-key", SecretStr("sk-block"), creds, REGION)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(NoCredentialsError):  # the environment's credentials cannot read it
        aws_client("secretsmanager", region=REGION).get_secret_value(SecretId=arn)
    return store, arn


def test_batch_reads_api_key_with_block_credentials(block_only_credentials):
    from flows.batch import _endpoint_resolver

    store, arn = block_only_credentials
    assert _endpoint_resolver(store, None, "http://x", arn)() == ("http://x", "sk-block")
    state = StackState(stack="blockcreds", target="ecs", status="running",
                       endpoint=Endpoint(url="http://y", served_model_name="m", api_key_secret=arn))
    save_state(store, state, None)
    assert _endpoint_resolver(store, "blockcreds", None, None)() == ("http://y", "sk-block")


def test_validate_reads_api_key_with_block_credentials(block_only_credentials, monkeypatch):
    import flows.validate as validate_mod

    store, arn = block_only_credentials
    state = StackState(stack="blockcreds", target="ecs", status="running",
                       endpoint=Endpoint(url="http://y", served_model_name="m", api_key_secret=arn))
    save_state(store, state, None)
    seen = {}

    def fake_validate_endpoint(url, api_key, name, **kw):
        seen["key"] = api_key
        raise RuntimeError("stop here")

    monkeypatch.setattr(validate_mod, "load_config", lambda cls, name=None: store)
    monkeypatch.setattr(validate_mod, "validate_endpoint", fake_validate_endpoint)
    with pytest.raises(RuntimeError, match="stop here"):
        flow(name="t-validate")(validate_mod.validate.fn)(stack="blockcreds")
    assert seen["key"] == "sk-block"


def test_update_adapters_reads_api_key_with_block_credentials(block_only_credentials, monkeypatch):
    import flows.adapters as adapters_mod
    from blocks.model_source import ModelSource
    from tasks.core.state import ModelRef

    store, arn = block_only_credentials
    ref = ModelRef(repo_id="a/b", sha="0" * 40, s3_uri=f"s3://{store.bucket_name}/m")
    state = StackState(stack="blockcreds", target="local", status="running", model=ref, adapters={"ad": ref},
                       settings={"enable_lora": True, "max_lora_rank": 16},
                       endpoint=Endpoint(url="http://y", served_model_name="m", api_key_secret=arn))
    save_state(store, state, None)
    seen = {}
    monkeypatch.setattr(adapters_mod, "load_config", lambda cls, name=None: store if cls is ModelStore else ModelSource())
    monkeypatch.setattr(adapters_mod, "unload_adapter", lambda url, key, name: seen.setdefault("key", key) and True)
    monkeypatch.setattr(adapters_mod, "served_models", lambda url, key: ["m"])
    monkeypatch.setattr(adapters_mod, "create_markdown_artifact", lambda *a, **kw: None)
    flow(name="t-adapters")(adapters_mod.update_adapters.fn)(stack="blockcreds", remove=["ad"])
    assert seen["key"] == "sk-block"


def test_local_target_reads_api_key_with_given_credentials(block_only_credentials, monkeypatch):
    import tasks.targets.local.server as lt

    store, arn = block_only_credentials
    seen = {}

    def fake_start(stack, settings, model_uri, api_key, adapters, index, port=None):
        seen["key"] = api_key
        return 1, "http://127.0.0.1:1", "/tmp/log"

    monkeypatch.setattr(lt, "start_server", fake_start)
    from tasks.core.state import ModelRef

    model = ModelRef(repo_id="a/b", sha="0" * 40, s3_uri=f"s3://{store.bucket_name}/m")
    flow(name="t-local")(lt.start_local_server.fn)("blockcreds", VllmServerSettings(served_model_name="m"), model, arn,
                                                   credentials=store.credentials)
    assert seen["key"] == "sk-block"


# ------------------------------------------- finding 6: a shared cluster's providers and strategy are kept


def _cluster_with_other_provider(stack: str) -> tuple[str, str]:
    aws = Aws(region=REGION)
    ecs, asg = aws.client("ecs"), aws.client("autoscaling")
    cluster = resource_name(stack, "cluster")
    ecs.create_cluster(clusterName=cluster)
    ec2 = aws.client("ec2")
    ec2.create_launch_template(LaunchTemplateName=f"{stack}-other", LaunchTemplateData={"ImageId": "ami-12345678",
                                                                                       "InstanceType": "t3.micro"})
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    for name in (f"{stack}-other", f"{stack}-ours"):
        asg.create_auto_scaling_group(AutoScalingGroupName=name, MinSize=0, MaxSize=1,
                                      LaunchTemplate={"LaunchTemplateName": f"{stack}-other"}, VPCZoneIdentifier=subnet)
    other_arn = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[f"{stack}-other"])["AutoScalingGroups"][0]["AutoScalingGroupARN"]
    ecs.create_capacity_provider(name=f"{stack}-other", autoScalingGroupProvider={"autoScalingGroupArn": other_arn})
    ecs.put_cluster_capacity_providers(cluster=cluster, capacityProviders=[f"{stack}-other"],
                                       defaultCapacityProviderStrategy=[{"capacityProvider": f"{stack}-other", "weight": 3, "base": 1}])
    ours = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[f"{stack}-ours"])["AutoScalingGroups"][0]["AutoScalingGroupARN"]
    return cluster, ours


def test_shared_cluster_strategy_kept_on_deploy_and_teardown(local_aws):
    stack = "sharedcl"
    aws = Aws(region=REGION)
    cluster, asg_arn = _cluster_with_other_provider(stack)
    other = {"capacityProvider": f"{stack}-other", "weight": 3, "base": 1}
    gpu_hosts.ensure_capacity_provider(aws, stack, asg_arn, cluster)
    found = aws.client("ecs").describe_clusters(clusters=[cluster])["clusters"][0]
    assert sorted(found["capacityProviders"]) == sorted([f"{stack}-other", resource_name(stack, "gpu")])
    assert found["defaultCapacityProviderStrategy"] == [other]

    gpu_hosts.delete_capacity_provider(aws, resource_name(stack, "gpu"), cluster)
    found = aws.client("ecs").describe_clusters(clusters=[cluster])["clusters"][0]
    assert found["capacityProviders"] == [f"{stack}-other"]
    assert found["defaultCapacityProviderStrategy"] == [other]


def test_own_cluster_gets_our_default_strategy_and_loses_only_ours(local_aws):
    stack = "owncl"
    aws = Aws(region=REGION)
    cluster, asg_arn = _cluster_with_other_provider(stack)
    aws.client("ecs").put_cluster_capacity_providers(  # a shared cluster with no default strategy
        cluster=cluster, capacityProviders=[f"{stack}-other"], defaultCapacityProviderStrategy=[])
    gpu_hosts.ensure_capacity_provider(aws, stack, asg_arn, cluster)
    ours = resource_name(stack, "gpu")
    found = aws.client("ecs").describe_clusters(clusters=[cluster])["clusters"][0]
    assert [s["capacityProvider"] for s in found["defaultCapacityProviderStrategy"]] == [ours]
    gpu_hosts.delete_capacity_provider(aws, ours, cluster)
    found = aws.client("ecs").describe_clusters(clusters=[cluster])["clusters"][0]
    assert found["capacityProviders"] == [f"{stack}-other"]
    assert found.get("defaultCapacityProviderStrategy", []) == []


# ------------------- finding 7: the model cache is a host folder, kept across task starts on the host

REPO = Path(__file__).resolve().parent.parent
_ROLE = "arn:aws:iam::123456789012:role/"


def _service_td(**kw) -> dict:
    return ecs_service.task_definition("cachevol", VllmServerSettings(served_model_name="m"), EcsGpuCapacity(), "g6.xlarge",
                                       "img", "s3://b/m", _ROLE + "e", _ROLE + "t", {}, **kw)


def _batch_td() -> dict:
    job = ecs_batch.EcsBatchJob(cluster="c", image_uri="img", capacity_provider="p", execution_role_arn=_ROLE + "e",
                                task_role_arn=_ROLE + "t")
    return ecs_batch.task_definition("cachevol", job, VllmServerSettings(served_model_name="m"), "s3://b/m")


def test_task_definitions_mount_the_host_model_cache(local_aws):
    """The service and the offline batch task mount the host's cache folder where the entrypoint caches
    (MODEL_CACHE_DIR), so a restart, a rollout or the batch task beside the service finds the copy."""
    for td in (_service_td(), _batch_td()):
        assert td["volumes"] == [{"name": "model-cache", "host": {"sourcePath": "/var/lib/vllm-pipeline/models"}}]
        container = td["containerDefinitions"][0]
        env = {e["name"]: e["value"] for e in container["environment"]}
        assert container["mountPoints"] == [{"sourceVolume": "model-cache", "containerPath": env["MODEL_CACHE_DIR"],
                                             "readOnly": False}]
    # registered as given; a change of the host folder alone makes a new revision, the same definition none
    aws = Aws(region=REGION)
    wanted = _service_td()
    elsewhere = json.loads(json.dumps(wanted))
    elsewhere["volumes"][0]["host"]["sourcePath"] = "/mnt/elsewhere"
    ecs_service.register_task_definition(aws, elsewhere)
    arn, created = ecs_service.register_task_definition(aws, wanted)
    assert created
    assert aws.client("ecs").describe_task_definition(taskDefinition=arn)["taskDefinition"]["volumes"] == wanted["volumes"]
    assert ecs_service.register_task_definition(aws, wanted) == (arn, False)


def test_gpu_host_disk_and_user_data_hold_the_model_cache():
    """The root EBS volume (where Docker's images and the cache folder live) holds two copies of the
    model (the one served and the next revision, or the batch task's model) plus the OS and two images;
    the block's root_volume_gib is the floor. User data makes the folder, owned by the image's user."""
    small = _lt_data("disk", cache_bytes=270_000_000)  # SmolLM2-135M: the block's 200 GiB holds it
    assert small["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 200
    # a 70B model in bf16 (140 GB = 130.4 GiB): 2 copies (261 GiB) + 60 GiB for the OS and two vLLM images
    assert _lt_data("disk", cache_bytes=140 * 10**9)["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 321
    user = re.search(r"^USER (\d+):(\d+)$", (REPO / "images" / "vllm" / "Dockerfile").read_text(), re.M)
    assert f"install -d -m 0755 -o {user[1]} -g {user[2]} /var/lib/vllm-pipeline/models" in \
        base64.b64decode(small["UserData"]).decode()


def test_deploy_sizes_the_host_disk_from_the_staged_model(local_aws, bucket, monkeypatch):
    """The deploy reads the staged manifests (model and adapters) and sizes the launch template's disk for them."""
    from test_ecs_target import stage_fake

    import flows.deploy as deploy_mod

    model = stage_fake(bucket, "acme/big", {}, [100 * 10**9, 40 * 10**9])
    adapter = stage_fake(bucket, "acme/adapter", {}, [2 * 10**9])
    seen = {}

    def capture(aws, stack, data):
        seen["size"] = data["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
        raise RuntimeError("stop here")

    monkeypatch.setattr(gpu_hosts, "ensure_launch_template", capture)
    monkeypatch.setattr(deploy_mod, "rollback", lambda *a, **kw: [])
    monkeypatch.setattr(deploy_mod, "plan_task", lambda *a, **kw: None)
    monkeypatch.setattr(deploy_mod, "choose_instance", lambda plan, cap, s: ("g6.xlarge", s, 1.0))
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/vllm-pipeline/vllm@sha256:" + "ab" * 32
    with pytest.raises(RuntimeError, match="stop here"):
        flow(name="t-disk")(deploy_mod.deploy_to_ecs)("cachedisk", ModelStore(bucket_name=bucket),
                                                      VllmServerSettings(served_model_name="m"), EcsGpuCapacity(), model,
                                                      image, adapters={"ad": adapter})
    assert seen["size"] == 325  # 142 GB = 132.25 GiB: 2 copies (265 GiB) + 60 GiB


@pytest.fixture()
def small_staged(bucket, tmp_path):
    """A three-file model staged by its manifest: enough to count what a start downloads."""
    from test_entrypoint import _stage

    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    _stage(bucket, folder, "models/acme/small/abc")
    return f"s3://{bucket}/models/acme/small/abc", folder


def _counting_s3():
    gets: list[str] = []
    s3 = aws_client("s3")
    s3.meta.events.register("before-parameter-build.s3.GetObject",
                            lambda params, **_: gets.append(params["Key"].rsplit("/", 1)[-1]))
    return s3, gets


def _files(gets: list[str]) -> list[str]:
    return sorted(g for g in gets if g != "_manifest.json")


def test_entrypoint_reuses_the_hosts_copy_and_refetches_a_damaged_file(small_staged, tmp_path):
    from test_entrypoint import _load_entrypoint

    uri, folder = small_staged
    cache = tmp_path / "host-models"
    s3, gets = _counting_s3()
    target = _load_entrypoint().fetch(uri, cache, s3)
    assert _files(gets) == ["config.json", "model.safetensors", "tokenizer.json"]
    gets.clear()
    assert _load_entrypoint().fetch(uri, cache, s3) == target  # the next task on this host: nothing downloaded
    assert _files(gets) == []
    time.sleep(0.05)  # the kernel's file clock is coarse (a few ms): the damage below is a later write
    weights = target / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, other bytes
    (target / "tokenizer.json").write_text("{")  # truncated
    gets.clear()
    _load_entrypoint().fetch(uri, cache, s3)
    assert _files(gets) == ["model.safetensors", "tokenizer.json"]  # only the damaged files again
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (target / name).read_bytes() == (folder / name).read_bytes()
    gets.clear()
    _load_entrypoint().fetch(uri, cache, s3)
    assert _files(gets) == []


_TWO_STARTS = """
import importlib.util, json, sys, time
from pathlib import Path
import boto3
spec = importlib.util.spec_from_file_location("entrypoint", sys.argv[1])
ep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ep)
s3, gets = boto3.client("s3"), []
def slow(params, **_):  # every GET takes 0.3 s: the two starts overlap for sure
    gets.append(params["Key"].rsplit("/", 1)[-1])
    time.sleep(0.3)
s3.meta.events.register("before-parameter-build.s3.GetObject", slow)
Path(sys.argv[4]).touch()
while not Path(sys.argv[5]).exists():
    time.sleep(0.005)
print(json.dumps({"target": str(ep.fetch(sys.argv[2], Path(sys.argv[3]), s3)), "gets": gets}))
"""


def test_two_entrypoints_on_one_host_fetch_once(small_staged, tmp_path):
    """Two tasks starting together on one host (the batch task beside the service, a rollout): one
    fetches, the other waits for its lock and uses the verified copy; neither damages the other's."""
    from test_entrypoint import ENTRYPOINT, _load_entrypoint

    uri, folder = small_staged
    cache, go = tmp_path / "host-models", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_STARTS, str(ENTRYPOINT), uri, str(cache), str(tmp_path / f"ready{i}"),
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    results = [json.loads(out) for out, _ in outs]
    assert results[0]["target"] == results[1]["target"]
    assert _files(results[0]["gets"] + results[1]["gets"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert any("waiting" in err for _, err in outs)  # they did overlap: one waited for the other's fetch
    target = Path(results[0]["target"])
    for p in folder.iterdir():
        assert (target / p.name).read_bytes() == p.read_bytes()
    s3, gets = _counting_s3()
    _load_entrypoint().fetch(uri, cache, s3)  # and the copy they left is verified: the next start fetches nothing
    assert _files(gets) == []


def test_model_cache_makes_room_from_the_least_recently_used_models(tmp_path):
    """A host keeps what it served until the disk is short: then the least recently used other models go,
    never the one being fetched and never one another task is fetching (holds its lock)."""
    import fcntl

    from test_entrypoint import _load_entrypoint

    entry = _load_entrypoint()
    cache = tmp_path / "models"
    keys = ["b/models/busy/1", "b/models/old/1", "b/models/new/1", "b/models/wanted/1"]
    for age, key in enumerate(keys):
        (cache / key).mkdir(parents=True)
        (cache / key / "model.safetensors").write_bytes(b"x" * 10)
        with entry.cache_lock(cache, key, f"s3://{key}"):
            pass
        os.utime(entry.lock_path(cache, key), (1_000_000 + age, 1_000_000 + age))  # busy oldest, wanted newest

    def free() -> int:
        return entry.RESERVE_BYTES + sum(10 for k in keys if not (cache / k).exists())

    with open(entry.lock_path(cache, keys[0])) as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)  # another task is fetching it right now
        assert entry.make_room(cache, 10, keep=keys[3], free=free) == [keys[1]]
        assert [k for k in keys if (cache / k).exists()] == [keys[0], keys[2], keys[3]]
        # more than can be freed: everything else evictable goes, the wanted and the busy one stay
        assert entry.make_room(cache, 30, keep=keys[3], free=free) == [keys[2]]
        assert [k for k in keys if (cache / k).exists()] == [keys[0], keys[3]]
    assert entry.make_room(cache, 0, keep=keys[3], free=free) == []  # room enough: nothing goes


def test_model_cache_never_deletes_a_model_a_server_on_the_host_started_with(tmp_path):
    """A server holds its model's "in use" lock from its start to its end (the entrypoint's descriptor
    survives exec): make_room passes over that model, however old, while the server lives."""
    import subprocess
    import sys

    from test_entrypoint import ENTRYPOINT, _load_entrypoint

    entry = _load_entrypoint()
    cache = tmp_path / "models"
    keys = ["b/models/serving/1", "b/models/idle/1", "b/models/wanted/1"]
    for age, key in enumerate(keys):
        (cache / key).mkdir(parents=True)
        (cache / key / "model.safetensors").write_bytes(b"x" * 10)
        with entry.cache_lock(cache, key, f"s3://{key}"):
            pass
        os.utime(entry.lock_path(cache, key), (1_000_000 + age, 1_000_000 + age))
    # a "server": holds the in-use lock, then execs a process that keeps running (as the entrypoint execs vLLM)
    server = subprocess.Popen([sys.executable, "-c", (
        "import importlib.util, os, sys, pathlib; spec = importlib.util.spec_from_file_location('e', sys.argv[1]); "
        "e = importlib.util.module_from_spec(spec); spec.loader.exec_module(e); "
        "e.hold_in_use(pathlib.Path(sys.argv[2]), sys.argv[3]); print('held', flush=True); "
        "os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)'])"),
        str(ENTRYPOINT), str(cache), keys[0]], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "held"

        def free() -> int:
            return entry.RESERVE_BYTES + sum(10 for k in keys if not (cache / k).exists())

        assert entry.make_room(cache, 30, keep=keys[2], free=free) == [keys[1]]  # the serving one stays
        assert (cache / keys[0]).exists()
    finally:
        server.kill()
        server.wait()
    assert entry.make_room(cache, 30, keep=keys[2], free=free) == [keys[0]]  # its server gone: it may go


def test_unwritable_cache_folder_falls_back_inside_the_container(tmp_path, capfd):
    """A host folder the image's user cannot write (a shared cluster's hosts without our user data: Docker
    makes the folder root's) costs the warm cache, not the start; the log says what to fix."""
    from test_entrypoint import _load_entrypoint

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    root = _load_entrypoint().usable_cache_root(blocked / "models")
    assert root != blocked / "models" and root.is_dir() and os.access(root, os.W_OK)
    err = capfd.readouterr().err
    assert "not writable" in err and "/var/lib/vllm-pipeline/models" in err


# ------------------------------- finding 8: only "not found" means no previous task definition


class _Ecs:
    def __init__(self, exc):
        self.exc = exc

    def describe_services(self, **_):
        raise self.exc


class _FakeAws:
    def __init__(self, exc):
        self.ecs = _Ecs(exc)

    def client(self, _service):
        return self.ecs


@pytest.mark.parametrize("code", ["ThrottlingException", "AccessDeniedException"])
def test_service_task_definition_propagates_other_errors(code):
    from tasks.targets.ecs.deploy import _service_task_definition

    with pytest.raises(ClientError, match=code):
        _service_task_definition(_FakeAws(_client_error(code)), "c", "s")


def test_service_task_definition_none_when_no_cluster(local_aws):
    from tasks.targets.ecs.deploy import _service_task_definition

    assert _service_task_definition(Aws(region=REGION), "no-such-cluster-xyz", "s") is None


# ------------------------------------------------------------------ finding 9: the deploy lock's length


def test_deploy_lock_outlasts_the_deploy_timeout():
    from flows.deploy import _refuse_if_busy, lock
    from tasks.core.errors import PipelineInputError

    state = StackState(stack="locked", target="ecs")
    lock(state, ready_timeout_s=1800)
    # 50 minutes later, the deploy still waiting for its service (up to 30 min of creates + 30 of wait)
    shift = timedelta(minutes=50)
    state.updated_at = (datetime.fromisoformat(state.updated_at) - shift).isoformat()
    state.lock_until = (datetime.fromisoformat(state.lock_until) - shift).isoformat()
    with pytest.raises(PipelineInputError, match="deploying"):
        _refuse_if_busy(state, "locked", "ecs")
    # and a dead run's lock does expire
    state.lock_until = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    state.updated_at = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
    _refuse_if_busy(state, "locked", "ecs")


def test_deploy_to_ecs_records_a_lock_covering_its_timeout(local_aws, bucket, monkeypatch):
    """What deploy_to_ecs writes before its first resource holds the lock for at least ready_timeout_s."""
    import flows.deploy as deploy_mod
    from tasks.core.state import load_state

    seen = {}

    def stop(*a, **kw):
        state, _ = load_state(ModelStore(bucket_name=bucket), "lockrec")
        seen["state"] = state
        raise RuntimeError("stop here")

    monkeypatch.setattr(deploy_mod, "deploy_ecs", stop)
    monkeypatch.setattr(deploy_mod, "rollback", lambda *a, **kw: [])
    monkeypatch.setattr(deploy_mod, "plan_task", lambda *a, **kw: None)
    monkeypatch.setattr(deploy_mod, "choose_instance", lambda plan, cap, s: ("g6.xlarge", s, 1.0))
    model = deploy_mod.ModelRef(repo_id="a/b", sha="0" * 40, s3_uri=f"s3://{bucket}/m")
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/vllm-pipeline/vllm@sha256:" + "ab" * 32
    with pytest.raises(RuntimeError, match="stop here"):
        flow(name="t-lock")(deploy_mod.deploy_to_ecs)("lockrec", ModelStore(bucket_name=bucket),
                                                      VllmServerSettings(served_model_name="m"), EcsGpuCapacity(), model,
                                                      image, ready_timeout_s=3600)
    until = datetime.fromisoformat(seen["state"].lock_until)
    assert until - datetime.now(timezone.utc) > timedelta(seconds=3600)


# ------------------------- finding 10: the batch task fits beside the service on a host with GPUs to spare


def test_batch_and_service_reservations_fit_one_host():
    job_kw = dict(cluster="c", image_uri="i", capacity_provider="p", execution_role_arn="arn:aws:iam::123456789012:role/e",
                  task_role_arn="arn:aws:iam::123456789012:role/t")
    checked = 0
    for name, inst in gpu_instances().items():
        for tp_service in range(1, inst.gpus + 1):
            service = ecs_service.task_definition(
                "fit", VllmServerSettings(served_model_name="m", tensor_parallel_size=tp_service), EcsGpuCapacity(),
                name, "img", "s3://b/m", "arn:aws:iam::123456789012:role/e", "arn:aws:iam::123456789012:role/t", {})
            s_gpus = int(service["containerDefinitions"][0]["resourceRequirements"][0]["value"])
            assert int(service["cpu"]) <= inst.vcpus * 1024
            assert int(service["memory"]) <= inst.memory_gib * 1024 * 0.9 + 1
            for tp_batch in range(1, inst.gpus - s_gpus + 1):
                batch = ecs_batch.task_definition("fit", ecs_batch.EcsBatchJob(instance_type=name, **job_kw),
                                                  VllmServerSettings(served_model_name="m", tensor_parallel_size=tp_batch),
                                                  "s3://b/m")
                b_gpus = int(batch["containerDefinitions"][0]["resourceRequirements"][0]["value"])
                assert s_gpus + b_gpus <= inst.gpus, name
                # what ECS registers for the host: all its CPU units; memory less the OS's share (0.9 is safe)
                assert int(service["cpu"]) + int(batch["cpu"]) <= inst.vcpus * 1024, (name, tp_service, tp_batch)
                assert int(service["memory"]) + int(batch["memory"]) <= inst.memory_gib * 1024 * 0.9 + 1, (name, tp_service, tp_batch)
                checked += 1
    assert checked > 0  # the catalogue has multi-GPU instances


# ------------------------------------------ finding 11: any launch-template change makes a new version


def _lt_data(stack, **change):
    cap = EcsGpuCapacity(**change.pop("capacity", {}))
    kw = dict(ami="ami-12345678", cluster="c", profile_arn="arn:aws:iam::123456789012:instance-profile/p",
              host_sg="sg-1", instance_type="g6.xlarge", stack=stack, cache_bytes=270_000_000)
    kw.update(change)
    return gpu_hosts.launch_template_data(cap, **kw)


@pytest.mark.parametrize("change", [
    {"profile_arn": "arn:aws:iam::123456789012:instance-profile/other"},
    {"host_sg": "sg-2"},
    {"cluster": "other-cluster"},  # the user data
    {"capacity": {"root_volume_gib": 300}},
])
def test_launch_template_new_version_on_any_change(local_aws, change):
    stack = "ltv" + str(abs(hash(str(change))) % 10000)
    aws = Aws(region=REGION)
    ec2 = aws.client("ec2")
    lt_id, created = gpu_hosts.ensure_launch_template(aws, stack, _lt_data(stack))
    assert created
    gpu_hosts.ensure_launch_template(aws, stack, _lt_data(stack))  # unchanged: no new version
    assert len(ec2.describe_launch_template_versions(LaunchTemplateId=lt_id)["LaunchTemplateVersions"]) == 1
    gpu_hosts.ensure_launch_template(aws, stack, _lt_data(stack, **change))
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id)["LaunchTemplateVersions"]
    assert len(versions) == 2
    default = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id, Versions=["$Default"])["LaunchTemplateVersions"][0]
    assert default["VersionNumber"] == 2
