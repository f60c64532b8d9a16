"""A world for running the product's flows under the runner's IAM policy (tests/test_iam_enforced.py, issue #22).

- `EnforcedAws`: a moto server of its own that checks every request against the caller's identity policies
  (INITIAL_NO_AUTH_ACTION_COUNT: the first n requests are the admin's setup, every later one is signature-checked
  and authorized). The user `runner` holds exactly the three managed policies of images/runtime/ (as `for_moto`
  widens them, below); the user `aws-side` (every action) acts for AWS itself: what its services do in the flows'
  world, which moto does not do (ECS placing tasks, CodeBuild pushing, the GPU host's agent).
- `AwsSide`: those acts, hooked after the product's own calls (botocore `after-call` events on its clients):
  CodeBuild's build pushes the image its buildspec names to ECR; ECS places the service (managed scaling launches
  one GPU host, its agent joins the cluster, the task is registered with the target group, the container reads its
  API key from Secrets Manager and starts: `StandInVllm`) and the tool gateway's Fargate service (its task's
  address registered with the gateway's target group; the stand-in answers its /health); a batch task reads its input from S3, writes vLLM's
  batch-runner output and exits 0; a desired count of 0 drains the task (the stand-in answers 503), 1 starts it.
  The server runs with MOTO_ECS_SERVICE_RUNNING=1, moto's own switch for "a service's tasks are running".
- `StandInVllm`: the container behind the load balancer. moto's load balancers have DNS names no one answers, so
  the flows' process gets HTTP_PROXY pointing here (NO_PROXY keeps moto, the Hub and Prefect direct) and this
  answers, for that one DNS name, the part of vLLM's OpenAI API the flows use, as a parrot (the last message's words).

What moto checks, and what the policies are widened to on that account (`for_moto`):
- actions: every service. moto authorizes CloudWatch as `monitoring:*` and the tagging API as `tagging:*` (its
  endpoint names; IAM's prefixes are cloudwatch: and tag:), and HeadBucket as `s3:HeadBucket` (AWS: s3:ListBucket):
  each such action gets moto's name beside it.
- resources: S3 (bucket / object ARNs) and IAM calls naming an existing role (RoleName -> that role's ARN). Every
  other request is evaluated against the resource "*", so the statements of other services get Resource "*";
  IAM statements keep their resources, plus one pattern matching only that unresolved "*" (`UNRESOLVED`), so an
  IAM call on an existing role is still checked against the role path; the instance-profile statements also get
  the stack-role path, since moto resolves AddRoleToInstanceProfile/RemoveRoleFromInstanceProfile (they carry a
  RoleName) to the role's ARN, not the instance profile's.
- conditions: evaluated without request context (tag, boundary, PassedToService conditions pass unchecked), so
  they are kept as written and checked statically (tests/test_iam_policy.py); iam:PassRole is never requested.
- moto's own gaps are patched in its server process by embedded/moto_server.py (the default stand-in runs it too).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import yaml
from iam_actions import RUNNER_POLICIES, load_policy

from embedded.net import free_port, stop_process, wait_for_port

MOTO_SERVER = Path(__file__).resolve().parents[1] / "embedded" / "moto_server.py"

REGION = "us-east-1"
ACCOUNT = "123456789012"
BOUNDARY = json.loads((RUNNER_POLICIES[0].parent / "stack-role-boundary.json").read_text())
DENIED_CODES = ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess",
                "InvalidClientTokenId", "SignatureDoesNotMatch", "NotAuthorized", "InvalidAccessKeyId")
# A Resource entry that, under moto's matcher (`^` + pattern with * -> .* + `$`, unescaped), matches the unresolved
# resource "*" and nothing else an IAM request could name; it passes moto's policy validator as an IAM ARN.
UNRESOLVED = "arn:aws:iam::*:role/moto-unresolved|^[*]"
STACK_ROLES = "arn:aws:iam::*:role/vllm-pipeline/*"
# services moto authorizes under another prefix than IAM's (its endpoint name): IAM prefix -> moto's
MOTO_PREFIX = {"cloudwatch": "monitoring", "tag": "tagging"}
ROLE_NAME_ACTIONS = {"iam:addroletoinstanceprofile", "iam:removerolefrominstanceprofile"}  # moto resolves RoleName



def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def for_moto(policy: dict, bucket: str) -> tuple[dict, list[str]]:
    """The policy with the bucket filled in and its resources widened where moto evaluates none; what was widened."""
    doc = json.loads(json.dumps(policy).replace("MODEL-STORE-BUCKET", bucket))
    widened = []
    for st in doc["Statement"]:
        services = {a.split(":")[0] for a in _as_list(st["Action"])}
        aliases = [f"{MOTO_PREFIX[a.split(':')[0]]}:{a.split(':', 1)[1]}" for a in _as_list(st["Action"])
                   if a.split(":")[0] in MOTO_PREFIX]
        if aliases:
            st["Action"] = _as_list(st["Action"]) + aliases
            widened.append(f"{st.get('Sid')}: + {aliases}")
        if services <= {"s3"}:
            if "s3:ListBucket" in _as_list(st["Action"]):
                st["Action"] = _as_list(st["Action"]) + ["s3:HeadBucket"]
                widened.append(f"{st.get('Sid')}: + s3:HeadBucket")
            continue
        if services <= {"iam"}:
            extra = [UNRESOLVED]
            if ROLE_NAME_ACTIONS & {a.lower() for a in _as_list(st["Action"])}:
                extra.append(STACK_ROLES)
            st["Resource"] = _as_list(st["Resource"]) + extra
            widened.append(f"{st.get('Sid')}: + {extra}")
            continue
        if st["Resource"] != "*":
            assert not services & {"s3", "iam"}, f"statement {st.get('Sid')} mixes services moto checks differently"
            widened.append(f"{st.get('Sid')}: {st['Resource']} -> *")
            st["Resource"] = "*"
    return doc, widened


class Keys:
    def __init__(self, key: dict):
        self.id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]


class EnforcedAws:
    """A moto server enforcing IAM after the admin's setup (`ADMIN_REQUESTS` requests, unchecked)."""

    ADMIN_REQUESTS = 16  # must equal the requests admin_setup makes (checked: the next admin request is refused)

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = "vllm-iam-models-" + os.urandom(3).hex()
        self.other_bucket = "someone-elses-" + os.urandom(3).hex()
        self.widened: list[str] = []

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(self.ADMIN_REQUESTS)
        env["MOTO_ECS_SERVICE_RUNNING"] = "1"  # a service's tasks count as running (moto runs no containers)
        self.proc = subprocess.Popen([sys.executable, str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=60, proc=self.proc)

    def client(self, service: str, keys: Keys | None = None):
        """A plain boto3 client (not the product's factory): the admin's (no keys) or a user's."""
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=keys.id if keys else "admin",
                            aws_secret_access_key=keys.secret if keys else "admin")

    def admin_setup(self) -> tuple[Keys, Keys]:
        """The runner's and aws-side's keys, in exactly ADMIN_REQUESTS requests."""
        s3, iam = self.client("s3"), self.client("iam")
        s3.create_bucket(Bucket=self.bucket)  # 1
        s3.create_bucket(Bucket=self.other_bucket)  # 2
        s3.put_object(Bucket=self.other_bucket, Key="secret.txt", Body=b"not yours")  # 3
        iam.create_user(UserName="runner")  # 4
        for path in RUNNER_POLICIES:  # 5-10
            doc, widened = for_moto(load_policy(path), self.bucket)
            self.widened += widened
            arn = iam.create_policy(PolicyName=path.stem, PolicyDocument=json.dumps(doc))["Policy"]["Arn"]
            iam.attach_user_policy(UserName="runner", PolicyArn=arn)
        iam.create_policy(PolicyName="vllm-pipeline-stack-boundary", Path="/vllm-pipeline/",  # 11
                          PolicyDocument=json.dumps(BOUNDARY))
        runner = Keys(iam.create_access_key(UserName="runner")["AccessKey"])  # 12
        iam.create_user(UserName="aws-side")  # 13
        iam.put_user_policy(UserName="aws-side", PolicyName="aws-itself", PolicyDocument=json.dumps(  # 14
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        aws_side = Keys(iam.create_access_key(UserName="aws-side")["AccessKey"])  # 15
        assert len(iam.list_attached_user_policies(UserName="runner")["AttachedPolicies"]) == 3  # 16
        return runner, aws_side

    def stop(self) -> None:
        stop_process(self.proc)


def refusal(http_status: int, parsed: dict | None, text: str = "") -> str | None:
    """The refusal an AWS answer is, or None. moto answers JSON-protocol services (ECS, Secrets Manager, ...) with
    an XML 403 that botocore cannot parse, so the code is "403" and only the message names the action."""
    err = (parsed or {}).get("Error", {})
    if http_status != 403 and err.get("Code") not in DENIED_CODES:
        return None
    msg = err.get("Message") or text[:300]
    found = re.search(r"not authorized to perform:? ([\w:-]+)", msg or "")
    return f"{found.group(1) if found else err.get('Code') or http_status}: {msg}"


# ------------------------------------------------------------------------------- the vLLM container


def completion(served: str, body: dict, chat: bool) -> dict:
    """A vLLM-shaped (non-streamed) completion from a parrot: the words of the last message (or the prompt), up to
    max_tokens; with ignore_eos, repeated to exactly max_tokens."""
    said = (str((body.get("messages") or [{}])[-1].get("content") or "") if chat else str(body.get("prompt") or "")).split()
    said = said or ["..."]
    limit = body.get("max_tokens") or len(said)
    n = limit if body.get("ignore_eos") else min(limit, len(said))
    text = " ".join(said[i % len(said)] for i in range(n))
    prompt = " ".join(str(m.get("content") or "") for m in body.get("messages", [])) if chat else str(body.get("prompt"))
    usage = {"prompt_tokens": max(1, len(prompt.split())), "completion_tokens": n}
    usage["total_tokens"] = usage["prompt_tokens"] + n
    choice = {"index": 0, "finish_reason": "length" if n >= limit else "stop"}
    choice |= {"message": {"role": "assistant", "content": text, "tool_calls": []}} if chat else {"text": text}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model", served), "choices": [choice], "usage": usage}


class StandInVllm:
    """The vLLM container behind one load balancer's DNS name, reached through HTTP_PROXY (module docstring)."""

    def __init__(self):
        self.host: str | None = None  # the load balancer's DNS name, once ECS placed the service
        self.down = False  # scaled to zero: no task behind the load balancer
        self.api_key = self.served = self.index_uri = None
        self.max_model_len = 0
        self.loaded: set[str] = set()
        self.read_index = lambda uri: {}
        self.requests: list[str] = []  # "METHOD path" of every request it answered
        self.unexpected: list[str] = []  # requests for another host: nothing should go there
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, host: str, api_key: str, served: str, max_model_len: int, adapters: list[str], index_uri: str | None,
              read_index) -> None:
        self.host, self.api_key, self.served, self.max_model_len = host, api_key, served, max_model_len
        self.loaded, self.index_uri, self.read_index = set(adapters), index_uri, read_index

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _model(self, name: str) -> bool:
        """Served: the base, a loaded adapter, or one the adapter index names (vLLM's resolver loads it)."""
        if name == self.served or name in self.loaded:
            return True
        if self.index_uri and name in self.read_index(self.index_uri):
            self.loaded.add(name)
            return True
        return False

    def _handler(self):
        vllm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, content_type: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                if url.hostname != vllm.host:
                    vllm.unexpected.append(f"{method} {self.path}")
                    return self._send(502, {"error": f"nothing answers for {url.hostname}"})
                vllm.requests.append(f"{method} {url.path}")
                if vllm.down:
                    return self._send(503, {"error": "no healthy target"})
                if url.path == "/health":
                    return self._send(200, b"", "text/plain")
                if url.path == "/metrics":
                    gauges = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
                    return self._send(200, "".join(f'{g}{{model_name="{vllm.served}"}} 0.0\n' for g in gauges).encode(),
                                      "text/plain")
                if self.headers.get("Authorization") != f"Bearer {vllm.api_key}":
                    return self._send(401, {"error": "Unauthorized"})
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}") \
                    if method == "POST" else {}
                if url.path == "/v1/models":
                    cards = [{"id": vllm.served, "object": "model", "max_model_len": vllm.max_model_len, "parent": None}]
                    cards += [{"id": a, "object": "model", "parent": vllm.served} for a in sorted(vllm.loaded)]
                    return self._send(200, {"object": "list", "data": cards})
                if url.path == "/v1/unload_lora_adapter":
                    if body.get("lora_name") not in vllm.loaded:
                        return self._send(404, {"error": {"message": f"{body.get('lora_name')} is not loaded", "code": 404}})
                    vllm.loaded.discard(body["lora_name"])
                    return self._send(200, b"Success", "text/plain")
                if url.path in ("/v1/chat/completions", "/v1/completions"):
                    if not vllm._model(body.get("model", "")):
                        return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                          "type": "NotFoundError", "code": 404}})
                    reply = completion(vllm.served, body, chat=url.path == "/v1/chat/completions")
                    return self._stream(reply) if body.get("stream") else self._send(200, reply)
                return self._send(404, {"error": f"no route {url.path}"})

            def _stream(self, reply: dict) -> None:
                """One SSE chunk per word, the finish reason, then the usage chunk (include_usage)."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                choice = reply["choices"][0]
                words = (choice.get("message", {}).get("content") or choice.get("text") or "").split(" ")
                base = {"id": reply["id"], "object": "chat.completion.chunk", "model": reply["model"]}
                for i, w in enumerate(words):
                    delta = {"content": w if i == 0 else " " + w}
                    self.wfile.write(b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta}]}).encode()
                                     + b"\n\n")
                end = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
                self.wfile.write(b"data: " + json.dumps({**base, "choices": [end]}).encode() + b"\n\n")
                self.wfile.write(b"data: " + json.dumps({**base, "choices": [], "usage": reply["usage"]}).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

        return Handler


# ------------------------------------------------------------------------------- what AWS itself does


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("environment", [])}


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


class AwsSide:
    """AWS's own acts in the flows' world, as the user `aws-side`, right after the product's calls that cause them
    (module docstring). `serve_stack`: the one stack whose service gets a host and a container."""

    def __init__(self, server: EnforcedAws, keys: Keys, serve_stack: str, vllm: StandInVllm):
        self.server, self.keys, self.serve_stack, self.vllm = server, keys, serve_stack, vllm
        self.clients: dict[str, object] = {}
        self.done: list[str] = []  # what it did, for the test to check
        self.lock = threading.Lock()

    def client(self, service: str):
        if service not in self.clients:
            self.clients[service] = self.server.client(service, self.keys)
        return self.clients[service]

    def attach(self, client) -> None:
        """Hook a product client."""
        ev = client.meta.events
        ev.register("before-parameter-build.codebuild.StartBuild", self._keep_params)
        ev.register("before-parameter-build.ecs.CreateService", self._keep_params)
        ev.register("after-call.codebuild.StartBuild", self.codebuild_builds)
        ev.register("after-call.ecs.CreateService", self.ecs_places_service)
        ev.register("before-parameter-build.ecs.UpdateService", self._keep_params)
        ev.register("after-call.ecs.UpdateService", self.ecs_scales_service)
        ev.register("after-call.ecs.RunTask", self.ecs_runs_task)

    @staticmethod
    def _keep_params(params, context, **_):
        context["iam_test_params"] = dict(params)

    def codebuild_builds(self, http_response, parsed, context, **_):
        """The build's last command, `docker push <ref>`: a manifest in ECR under that tag."""
        if http_response.status_code != 200:
            return
        spec = yaml.safe_load(context["iam_test_params"]["buildspecOverride"])
        push = next(c for c in spec["phases"]["build"]["commands"] if c.startswith("docker push "))
        ref = push.split()[-1].strip("'")
        repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 7,
                               "digest": "sha256:" + uuid.uuid5(uuid.NAMESPACE_URL, ref).hex * 2},
                    "layers": []}
        self.client("ecr").put_image(repositoryName=repo, imageTag=tag, imageManifest=json.dumps(manifest))
        self.done.append(f"codebuild pushed {repo}:{tag}")

    def ecs_places_service(self, http_response, parsed, context, **_):
        """Managed scaling launches a GPU host, its agent joins the cluster, ECS registers the task with the target
        group, and the container starts with its API key from Secrets Manager."""
        if http_response.status_code != 200:
            return
        service = parsed["service"]
        if service["serviceName"] == f"vllm-{self.serve_stack}-gateway":
            return self.ecs_places_gateway(service)
        if service["serviceName"] != f"vllm-{self.serve_stack}-service":
            return
        ecs, asg, elb = self.client("ecs"), self.client("autoscaling"), self.client("elbv2")
        provider = context["iam_test_params"]["capacityProviderStrategy"][0]["capacityProvider"]
        found = ecs.describe_capacity_providers(capacityProviders=[provider])["capacityProviders"][0]
        group = found["autoScalingGroupProvider"]["autoScalingGroupArn"].split("autoScalingGroupName/")[-1]
        asg.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=1)
        host = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0]["Instances"][0]
        ecs.register_container_instance(cluster=service["clusterArn"], instanceIdentityDocument=json.dumps(
            {"instanceId": host["InstanceId"], "region": REGION}))
        lb = service["loadBalancers"][0]
        elb.register_targets(TargetGroupArn=lb["targetGroupArn"],
                             Targets=[{"Id": host["InstanceId"], "Port": lb["containerPort"]}])
        lb_arn = elb.describe_target_groups(TargetGroupArns=[lb["targetGroupArn"]])["TargetGroups"][0]["LoadBalancerArns"][0]
        dns = elb.describe_load_balancers(LoadBalancerArns=[lb_arn])["LoadBalancers"][0]["DNSName"]
        container = self._container(service["taskDefinition"])
        env, secrets = _env(container), {s["name"]: s["valueFrom"] for s in container.get("secrets", [])}
        key = self.client("secretsmanager").get_secret_value(SecretId=secrets["VLLM_API_KEY"])["SecretString"]
        args = json.loads(env["VLLM_ARGS"])
        self.vllm.serve(dns, key, _flag(args, "--served-model-name"), int(_flag(args, "--max-model-len")),
                        list(json.loads(env.get("LORA_ADAPTERS") or "{}")), env.get("LORA_INDEX_URI"), self._read_json)
        self.done.append(f"ecs placed {service['serviceName']} on {host['InstanceId']} behind {dns}")

    def ecs_places_gateway(self, service: dict) -> None:
        """Fargate starts the tool gateway's task in the service's subnet and registers its address with the
        gateway's target group (`ip` targets); the stand-in answers its /health through the load balancer."""
        lb = service["loadBalancers"][0]
        subnet = service["networkConfiguration"]["awsvpcConfiguration"]["subnets"][0]
        cidr = self.client("ec2").describe_subnets(SubnetIds=[subnet])["Subnets"][0]["CidrBlock"]
        address = cidr.rsplit(".", 2)[0] + ".0.42"  # an address of the subnet, as Fargate's ENI would have
        self.client("elbv2").register_targets(TargetGroupArn=lb["targetGroupArn"],
                                              Targets=[{"Id": address, "Port": lb["containerPort"]}])
        self.done.append(f"ecs placed {service['serviceName']} (Fargate) at {address}")

    def ecs_scales_service(self, http_response, parsed, context, **_):
        """A desired count of 0 drains the task (the load balancer answers 503); 1 or more starts it again."""
        count = context["iam_test_params"].get("desiredCount")
        name = parsed.get("service", {}).get("serviceName")
        if http_response.status_code == 200 and count is not None and name == f"vllm-{self.serve_stack}-service":
            self.vllm.down = count == 0
            self.done.append(f"ecs scaled {name} to {count}")

    def _container(self, task_definition: str) -> dict:
        found = self.client("ecs").describe_task_definition(taskDefinition=task_definition)
        return found["taskDefinition"]["containerDefinitions"][0]

    def _read_json(self, uri: str) -> dict:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return json.loads(self.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())

    def ecs_runs_task(self, http_response, parsed, **_):
        """The batch task on the host: vLLM's batch runner turns the input into its output; the task exits 0."""
        if http_response.status_code != 200:
            return
        ecs, s3 = self.client("ecs"), self.client("s3")
        for t in parsed.get("tasks", []):
            env = {e["name"]: e["value"] for o in t["overrides"]["containerOverrides"] for e in o.get("environment", [])}
            served = _flag(json.loads(_env(self._container(t["taskDefinitionArn"]))["VLLM_ARGS"]), "--served-model-name")
            in_bucket, _, in_key = env["BATCH_INPUT_URI"].removeprefix("s3://").partition("/")
            out_bucket, _, out_key = env["BATCH_OUTPUT_URI"].removeprefix("s3://").partition("/")
            lines = s3.get_object(Bucket=in_bucket, Key=in_key)["Body"].read().decode().splitlines()
            records = []
            for line in filter(None, lines):
                req = json.loads(line)
                body = completion(served, req["body"], chat=True)
                records.append({"id": f"vllm-{uuid.uuid4().hex}", "custom_id": req["custom_id"], "error": None,
                                "response": {"status_code": 200, "request_id": f"vllm-batch-{uuid.uuid4().hex}", "body": body}})
            s3.put_object(Bucket=out_bucket, Key=out_key, Body="".join(json.dumps(r) + "\n" for r in records).encode())
            ecs.stop_task(cluster=t["clusterArn"], task=t["taskArn"], reason="Essential container in task exited")
            self.done.append(f"ecs ran batch task {t['taskArn'].rsplit('/', 1)[-1]}: {len(records)} records")


@contextmanager
def watched(monkeypatch, aws_side: AwsSide):
    """Every AWS answer the product gets, through its one client factory: the refusals among them, even those a
    caller catches (a swallowed 403 fails the test too); and AWS's own acts hooked after the calls that cause them."""
    from tasks.core import aws as aws_module

    refusals: list[str] = []
    real = aws_module.aws_client

    def after(http_response, parsed, model, **_):
        found = refusal(http_response.status_code, parsed, http_response.text if http_response.status_code == 403 else "")
        if found:
            refusals.append(f"{model.service_model.service_name}.{model.name}: {found}")

    def client(service, credentials=None, region=None):
        c = real(service, credentials, region)
        c.meta.events.register("after-call.*.*", after)
        aws_side.attach(c)
        return c

    for module in [m for name, m in list(sys.modules.items()) if name.startswith(("tasks.", "flows."))]:
        if getattr(module, "aws_client", None) is real:
            monkeypatch.setattr(module, "aws_client", client)
    yield refusals
