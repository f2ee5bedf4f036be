"""Static checks of the deployment files: compose, Kubernetes (Kustomize), Prometheus, Grafana, Dockerfiles.

Nothing here needs a Docker engine or a cluster. Optional tools are used when present and skipped otherwise:
`docker compose` / `docker-compose` (Debian package docker-compose), `kubectl kustomize` / `kustomize`, `promtool`.
Required Python packages: pyyaml, pytest, kubernetes-validate (pinned in the test extra).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBE_VERSION = "1.30.0"  # oldest Kubernetes minor the manifests must validate against

# ---------------------------------------------------------------------------------------------------------------
# The metrics contract: what the gateway exports (name -> labels) and the vLLM metrics the dashboard may use.
# Histograms are listed by their _bucket series; _sum and _count are derived below.
GATEWAY_METRICS: dict[str, set[str]] = {
    "ttc_requests_total": {"route", "model", "status_class"},
    "ttc_request_duration_seconds_bucket": {"route", "strategy", "le"},
    "ttc_time_to_first_token_seconds_bucket": {"route", "strategy", "le"},
    "ttc_tokens_total": {"model", "type"},
    "ttc_flops_total": {"role", "strategy"},
    "ttc_request_flops_bucket": {"strategy", "le"},
    "ttc_difficulty_bin_total": {"bin"},
    "ttc_strategy_chosen_total": {"strategy"},
    "ttc_budget_rejections_total": {"reason"},
    "ttc_budget_exhausted_total": {"strategy"},
    "ttc_cache_requests_total": {"kind", "result"},
    "ttc_upstream_inflight": {"pool"},
    "ttc_upstream_requests_total": {"pool", "outcome"},
    "ttc_upstream_errors_total": {"pool", "kind"},
    "ttc_client_disconnects_total": set(),
    "ttc_workers_ready": {"pool"},
}
for _name, _labels in list(GATEWAY_METRICS.items()):
    if _name.endswith("_bucket"):
        _base = _name[: -len("_bucket")]
        GATEWAY_METRICS[_base + "_sum"] = _labels - {"le"}
        GATEWAY_METRICS[_base + "_count"] = _labels - {"le"}
VLLM_METRICS: dict[str, set[str]] = {
    name: {"model_name", "engine"}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
    )
}
METRICS_CONTRACT = {**GATEWAY_METRICS, **VLLM_METRICS}
# Labels Prometheus attaches to every series (target labels), usable with any metric.
TARGET_LABELS = {"job", "instance", "le", "pod", "namespace", "component", "pool"}
CACHE_RESULTS = {"hit", "miss", "bypass", "error"}

# What the dashboard must show (brief of the deployment work).
DASHBOARD_MUST_QUERY = {
    "ttc_flops_total",
    "ttc_request_flops_bucket",
    "ttc_difficulty_bin_total",
    "ttc_strategy_chosen_total",
    "ttc_request_duration_seconds_bucket",
    "ttc_time_to_first_token_seconds_bucket",
    "ttc_cache_requests_total",
    "ttc_budget_rejections_total",
    "ttc_budget_exhausted_total",
    "ttc_upstream_inflight",
    "ttc_upstream_errors_total",
    "ttc_requests_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Gateway settings contract: every TTC_* variable the deployment sets must name a Settings field.


def _settings_classes():
    from service.config import Settings

    return Settings


def ttc_key_is_setting(key: str) -> bool:
    """TTC_POLICY__URLS -> Settings.policy.urls must exist (pydantic-settings ignores unknown variables silently)."""
    from pydantic import BaseModel

    settings = _settings_classes()
    parts = key[len("TTC_"):].lower().split("__")
    fields = settings.model_fields
    for i, part in enumerate(parts):
        if part not in fields:
            return False
        if i < len(parts) - 1:
            ann = fields[part].annotation
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            fields = ann.model_fields
    return True


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    for k in list(os.environ):
        if k.startswith("TTC_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("TTC_") and k != "TTC_CONFIG_FILE":
            monkeypatch.setenv(k, v)
    return _settings_classes()()


# ---------------------------------------------------------------------------------------------------------------
# Compose helpers


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose variable substitution with an (empty by default) environment: defaults apply."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        val = env.get(name)
        if op == ":-":
            return val if val else default
        if op == "-":
            return default if val is None else val
        if op in (":?", "?"):
            if not val:
                raise ValueError(f"required variable {name} unset: {default}")
            return val
        return val or ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def active(compose: dict, profile: str) -> dict[str, dict]:
    return {n: s for n, s in services(compose).items() if not s.get("profiles") or profile in s["profiles"]}


def env_dict(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in interpolate(env).items()}


def command_list(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    return [str(c) for c in interpolate(cmd)]


def flag_value(cmd: list[str], flag: str) -> str | None:
    for i, c in enumerate(cmd):
        if c == flag and i + 1 < len(cmd):
            return cmd[i + 1]
        if c.startswith(flag + "="):
            return c.split("=", 1)[1]
    return None


def depends(svc: dict) -> set[str]:
    d = svc.get("depends_on") or []
    return set(d) if isinstance(d, list) else set(d.keys())


def host_names(compose: dict, name: str) -> set[str]:
    svc = services(compose)[name]
    names = {name}
    nets = svc.get("networks") or {}
    if isinstance(nets, dict):
        for conf in nets.values():
            names |= set((conf or {}).get("aliases") or [])
    return names


def image_tag(image: str) -> str | None:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


GPU_PROFILE = {"gateway", "policy", "reward", "redis", "prometheus", "grafana"}
CPU_PROFILE = {"gateway-cpu", "redis", "prometheus", "grafana"}


# ---------------------------------------------------------------------------------------------------------------
# (a) docker-compose.yml


def test_compose_services_and_profiles(compose):
    assert set(services(compose)) == GPU_PROFILE | CPU_PROFILE
    assert set(active(compose, "gpu")) == GPU_PROFILE
    assert set(active(compose, "cpu")) == CPU_PROFILE
    for profile in ("gpu", "cpu"):
        act = active(compose, profile)
        for name, svc in act.items():
            missing = depends(svc) - set(act)
            assert not missing, f"{name} depends on {missing}, not started with --profile {profile}"


def test_compose_cpu_profile_needs_no_gpu(compose):
    for name, svc in active(compose, "cpu").items():
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        assert not devices, f"{name} reserves devices but runs in the cpu profile"
        assert "runtime" not in svc, name
        assert "vllm/vllm-openai" not in str(svc.get("image", "")), name


def test_compose_healthchecks_and_graceful_stop(compose):
    for name, svc in services(compose).items():
        hc = svc.get("healthcheck")
        if name == "grafana":
            continue  # nice to have, not required
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        assert "stop_grace_period" in svc, f"{name} has no stop_grace_period"
    for name in ("gateway", "gateway-cpu", "policy", "reward"):
        test = " ".join(map(str, services(compose)[name]["healthcheck"]["test"]))
        assert "/health" in test, name
        assert "curl" not in test, f"{name}: python-based healthcheck expected (no curl in slim images)"


def test_compose_images_are_pinned(compose):
    for name, svc in services(compose).items():
        if "image" not in svc:
            assert "build" in svc, name
            continue
        image = interpolate(svc["image"])
        tag = image_tag(image)
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned"
        if "build" not in svc:
            assert re.search(r"\d", tag), f"{name}: tag {tag!r} should be a version"
    policy, reward = services(compose)["policy"], services(compose)["reward"]
    assert interpolate(policy["image"]) == interpolate(reward["image"])
    assert interpolate(policy["image"]).startswith("vllm/vllm-openai:v")
    assert interpolate(services(compose)["redis"]["image"]).startswith("redis:7")


def test_compose_vllm_workers(compose):
    policy, reward = services(compose)["policy"], services(compose)["reward"]
    pcmd, rcmd = command_list(policy), command_list(reward)
    assert pcmd[0] == "Qwen/Qwen2.5-Math-1.5B-Instruct"
    assert "${POLICY_MODEL:-" in str(policy["command"][0])
    assert rcmd[0] == "Qwen/Qwen2.5-Math-PRM-7B"
    assert "${REWARD_MODEL:-" in str(reward["command"][0])
    assert "--enable-prefix-caching" in pcmd
    assert flag_value(rcmd, "--runner") == "pooling"
    assert flag_value(pcmd, "--runner") in (None, "generate")
    for name, svc, cmd in (("policy", policy, pcmd), ("reward", reward, rcmd)):
        assert svc.get("ipc") == "host", name
        assert flag_value(cmd, "--port") == "8000", name
        assert flag_value(cmd, "--host") == "0.0.0.0", name
        timeout = flag_value(cmd, "--shutdown-timeout")
        assert timeout and int(timeout) > 0, f"{name}: --shutdown-timeout > 0 lets vLLM drain"
        grace = str(svc["stop_grace_period"])
        assert grace.endswith("s") and int(grace[:-1]) > int(timeout), f"{name}: stop_grace_period <= shutdown"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices), name


def test_compose_gateway_remote_mode_matches_workers(compose, monkeypatch):
    gw = services(compose)["gateway"]
    env = env_dict(gw)
    assert env["TTC_HOST"] == "0.0.0.0"
    for key in env:
        if key.startswith("TTC_"):
            assert ttc_key_is_setting(key), f"compose sets {key}, which is not a gateway setting"
    s = settings_from_env(env, monkeypatch)
    for pool in ("policy", "reward"):
        conf = getattr(s, pool)
        assert not conf.embedded, f"{pool}: gateway must run in remote mode"
        assert len(conf.urls) == 1
        url = urlparse(conf.urls[0])
        assert url.hostname in host_names(compose, pool), conf.urls
        assert url.port == int(flag_value(command_list(services(compose)[pool]), "--port"))
        served = flag_value(command_list(services(compose)[pool]), "--served-model-name")
        assert conf.served_name == served, f"{pool}: gateway asks for {conf.served_name!r}, vLLM serves {served!r}"
    assert s.port == 8000
    assert env.get("TTC_REDIS_URL", "").startswith("redis://redis:")
    assert {"policy", "reward", "redis"} <= depends(gw)


def test_compose_cpu_gateway_is_embedded(compose, monkeypatch):
    svc = services(compose)["gateway-cpu"]
    assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
    env = env_dict(svc)
    for key in env:
        if key.startswith("TTC_"):
            assert ttc_key_is_setting(key), f"compose sets {key}, which is not a gateway setting"
    s = settings_from_env(env, monkeypatch)
    assert s.policy.embedded, "cpu profile runs the embedded default (no TTC_POLICY__URLS)"
    models_dir = str(s.models_dir)
    mounts = [str(v).split(":") for v in svc.get("volumes", [])]
    assert any(m[0] in compose.get("volumes", {}) and m[1] == models_dir for m in mounts), (
        "models dir must be a named volume"
    )
    # Both gateway variants answer to `gateway` so one prometheus.yml works for both profiles.
    assert "gateway" in host_names(compose, "gateway-cpu")


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_with_compose_cli():
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("docker-compose (Debian package) not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    for profiles in (["cpu"], ["gpu"], ["cpu", "gpu"]):
        args = [a for p in profiles for a in ("--profile", p)]
        r = subprocess.run(cmd + ["-f", str(COMPOSE)] + args + ["config", "-q"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{' '.join(cmd)} config failed for {profiles}:\n{r.stderr}"
    r = subprocess.run(cmd + ["-f", str(COMPOSE), "--profile", "cpu", "--profile", "gpu", "config", "--services"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == GPU_PROFILE | CPU_PROFILE


# ---------------------------------------------------------------------------------------------------------------
# (b) Kubernetes: a tiny Kustomize (the subset these manifests use) + kubernetes-validate

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "IngressClass", "APIService"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
SUPPORTED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "namespace", "images"}


def _merge(base: Any, patch: Any) -> Any:
    """Strategic-merge subset: maps merge recursively, lists of named maps merge by name, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _key(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def kustomize_build(path: Path, _docs: list[dict] | None = None) -> list[dict]:
    kfile = path / "kustomization.yaml"
    assert kfile.is_file(), f"{path} has no kustomization.yaml"
    k = load_yaml(kfile)
    unknown = set(k) - SUPPORTED_KUSTOMIZE_KEYS
    assert not unknown, f"{kfile}: the test's kustomize subset does not implement {unknown}"
    docs: list[dict] = [] if _docs is None else _docs
    for res in k.get("resources", []):
        p = path / res
        if p.is_dir():
            docs.extend(kustomize_build(p))
        else:
            docs.extend(d for d in yaml.safe_load_all(p.read_text()) if d)
    for comp in k.get("components", []):
        ck = load_yaml(path / comp / "kustomization.yaml")
        assert ck["kind"] == "Component", comp
        kustomize_build(path / comp, docs)  # components add resources and patch the parent's
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, f"{kfile}: only file strategic-merge patches are supported: {patch}"
        for p in yaml.safe_load_all((path / patch["path"]).read_text()):
            matches = [i for i, d in enumerate(docs)
                       if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]]
            assert len(matches) == 1, f"patch {patch['path']} matches {len(matches)} resources"
            docs[matches[0]] = _merge(docs[matches[0]], p)
    for img in k.get("images", []):
        for d in docs:
            if d["kind"] not in WORKLOAD_KINDS:
                continue
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                name = re.split(r"[@]", c["image"])[0]
                name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img['newTag']}" if "newTag" in img else img["newName"]
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
    keys = [_key(d) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate resources in {path}"
    return docs


KUSTOMIZATIONS = ["base", "overlays/production-stack", "overlays/llm-d"]
OVERLAYS = ["overlays/production-stack", "overlays/llm-d"]


def _find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, kustomize_build(K8S / request.param)


def test_k8s_manifests_validate_against_api_schemas(rendered):
    import kubernetes_validate

    name, docs = rendered
    assert docs
    for d in docs:
        try:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:  # pragma: no cover - failure path
            pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']}: {e.message}")


def test_k8s_optional_servicemonitor_component():
    k = load_yaml(K8S / "components/servicemonitor/kustomization.yaml")
    assert k["kind"] == "Component"
    docs = kustomize_build(K8S / "components/servicemonitor")
    sm = _find(docs, "ServiceMonitor", "ttc-gateway")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = _find(kustomize_build(K8S / "base"), "Service", "ttc-gateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert all(ep["port"] in port_names and ep.get("path", "/metrics") == "/metrics" for ep in sm["spec"]["endpoints"])
    for overlay in OVERLAYS:  # CRD kinds stay out of the default renders
        assert all(d["kind"] != "ServiceMonitor" for d in kustomize_build(K8S / overlay))


def _kustomize_cli() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        r = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_k8s_loader_agrees_with_kustomize(kdir):
    cli = _kustomize_cli()
    if cli is None:
        pytest.skip("kustomize / kubectl not installed: the pure-python loader is used alone")
    r = subprocess.run(cli + [str(K8S / kdir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    theirs = {_key(d): d for d in yaml.safe_load_all(r.stdout) if d}
    ours = {_key(d): d for d in kustomize_build(K8S / kdir)}
    assert set(theirs) == set(ours)
    for key in ours:
        assert ours[key] == theirs[key], f"{kdir}: {key} differs between the test loader and kustomize"


def _labels_match(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def _prestop_seconds(container: dict) -> int:
    pre = container["lifecycle"]["preStop"]
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    assert cmd[0] == "sleep" or "sleep" in " ".join(cmd), cmd
    return int(re.search(r"sleep\s+(\d+)", " ".join(cmd)).group(1))


def test_k8s_gateway_deployment(rendered, monkeypatch):
    name, docs = rendered
    dep = _find(docs, "Deployment", "ttc-gateway")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    assert _labels_match(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc.get("runAsUser", 1) != 0
    (c,) = spec["containers"]
    csc = c.get("securityContext", {})
    assert csc.get("allowPrivilegeEscalation") is False
    assert csc.get("runAsUser", psc.get("runAsUser")) != 0
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names.get("http") == 8000
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8000)
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    pre = _prestop_seconds(c)
    grace = spec["terminationGracePeriodSeconds"]
    # ConfigMap wiring and drain budget
    cm_refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    assert cm_refs, "settings come from a ConfigMap"
    env: dict[str, str] = {}
    for ref in cm_refs:
        env.update(_find(docs, "ConfigMap", ref)["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    timeout = float(env.get("TTC_REQUEST_TIMEOUT_S", "600"))
    assert grace >= pre + timeout, f"terminationGracePeriodSeconds {grace} < preStop {pre} + request timeout {timeout}"
    # PROMETHEUS_MULTIPROC_DIR, when set, must be a mounted emptyDir
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    if "PROMETHEUS_MULTIPROC_DIR" in env:
        d = env["PROMETHEUS_MULTIPROC_DIR"]
        assert d in mounts and "emptyDir" in vols[mounts[d]]
    if csc.get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts
    # Settings contract
    for key in env:
        if key.startswith("TTC_"):
            assert ttc_key_is_setting(key), f"{name}: ConfigMap sets {key}, which is not a gateway setting"
    s = settings_from_env(env, monkeypatch)
    assert s.host == "0.0.0.0" and s.port == 8000
    assert not s.policy.embedded and not s.reward.embedded, "cluster gateways never start engines"
    assert s.policy.served_name and s.reward.served_name
    redis_host = urlparse(env["TTC_REDIS_URL"]).hostname
    redis_svcs = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert redis_host in redis_svcs or "." in redis_host, f"TTC_REDIS_URL host {redis_host} is not a Service"


def test_k8s_service_hpa_pdb(rendered):
    _, docs = rendered
    dep = _find(docs, "Deployment", "ttc-gateway")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = _find(docs, "Service", "ttc-gateway")
    assert _labels_match(svc["spec"]["selector"], pod_labels)
    for other in (d for d in docs if d["kind"] in WORKLOAD_KINDS and d is not dep):
        assert not _labels_match(svc["spec"]["selector"], other["spec"]["template"]["metadata"]["labels"]), (
            f"Service ttc-gateway also selects {other['metadata']['name']}"
        )
    container_ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert all(p["targetPort"] in container_ports or p["targetPort"] == 8000 for p in svc["spec"]["ports"])
    hpa = _find(docs, "HorizontalPodAutoscaler", "ttc-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "ttc-gateway")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    pdb = _find(docs, "PodDisruptionBudget", "ttc-gateway")
    assert pdb["apiVersion"] == "policy/v1"
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "PDB must allow node drains"
    # Redis for shared cache/budgets: the Service must select its pods
    redis_svc = _find(docs, "Service", "ttc-redis")
    redis = _find(docs, "Deployment", "ttc-redis")
    assert _labels_match(redis_svc["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlays_point_at_scale_out_engines(overlay):
    base_cm = _find(kustomize_build(K8S / "base"), "ConfigMap", "ttc-gateway-config")["data"]
    docs = kustomize_build(K8S / overlay)
    cm = _find(docs, "ConfigMap", "ttc-gateway-config")["data"]
    assert all(d["metadata"].get("namespace") for d in docs), "overlays set a namespace"
    for key in ("TTC_POLICY__URLS", "TTC_REWARD__URLS"):
        urls = json.loads(cm[key])
        assert isinstance(urls, list) and len(urls) == 1, f"{overlay}: one Service URL per pool, got {urls}"
        assert cm[key] != base_cm[key], f"{overlay} must override {key}"
        assert urlparse(urls[0]).scheme == "http" and urlparse(urls[0]).port
    reward_host = urlparse(json.loads(cm["TTC_REWARD__URLS"])[0]).hostname
    policy_host = urlparse(json.loads(cm["TTC_POLICY__URLS"])[0]).hostname
    assert reward_host != policy_host, "the PRM gets its own Service (/pooling is not proxied by the router)"
    assert "router" not in reward_host
    image = _find(docs, "Deployment", "ttc-gateway")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image_tag(image) not in (None, "latest")


# ---------------------------------------------------------------------------------------------------------------
# (c) Grafana

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp", "clamp_max",
    "clamp_min", "count", "count_over_time", "count_values", "delta", "deriv", "exp", "floor", "group",
    "histogram_quantile", "histogram_count", "histogram_sum", "histogram_fraction", "idelta", "increase", "irate",
    "label_replace", "label_join", "last_over_time", "ln", "log2", "log10", "max", "max_over_time", "min",
    "min_over_time", "predict_linear", "quantile", "quantile_over_time", "rate", "resets", "round", "scalar", "sort",
    "sort_desc", "sqrt", "stddev", "stdvar", "sum", "sum_over_time", "time", "timestamp", "topk", "vector",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_refs(expr: str) -> tuple[set[str], set[str], list[tuple[str, str]]]:
    """(metric names, label names, (label, value) equality matchers) used by a PromQL expression (subset)."""
    strings: list[str] = []

    def keep(m: re.Match) -> str:
        strings.append(m.group(1))
        return f'"@{len(strings) - 1}"'

    s = re.sub(r'"((?:[^"\\]|\\.)*)"', keep, expr)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    labels: set[str] = set()
    equals: list[tuple[str, str]] = []
    for body in re.findall(r"\{([^}]*)\}", s):
        for lab, op, ref in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"@(\d+)\"", body):
            labels.add(lab)
            equals.append((lab, strings[int(ref)]) if op == "=" else (lab, ""))
    s = re.sub(r"\{[^}]*\}", " ", s)
    for _, group in GROUPING.findall(s):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    s = GROUPING.sub(" ", s)
    s = re.sub(r'"@\d+"', " ", s)
    idents = set(re.findall(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s))
    return idents - FUNCTIONS - KEYWORDS, labels, equals


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/dashboards/ttc-gateway.json").read_text())


def _all_panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _exprs(d: dict) -> list[tuple[str, str]]:
    out = []
    for p in _all_panels(d):
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for var in d.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)", q)
            assert m, f"variable {var['name']}: unsupported query {q!r}"
            out.append((f"variable {var['name']}", f"sum by ({m.group(2)}) ({m.group(1)})"))
    return out


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    panels = _all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), p["title"]
        assert p["datasource"]["uid"] in ("${datasource}", "$datasource", "prometheus")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_dashboard_queries_only_contract_metrics(dashboard):
    used: set[str] = set()
    for title, expr in _exprs(dashboard):
        metrics, labels, equals = promql_refs(expr)
        assert metrics, f"{title}: no metric in {expr!r}"
        unknown = metrics - set(METRICS_CONTRACT)
        assert not unknown, f"{title}: {sorted(unknown)} not exported by the gateway or vLLM"
        allowed = set().union(*(METRICS_CONTRACT[m] for m in metrics)) | TARGET_LABELS
        assert labels <= allowed, f"{title}: labels {sorted(labels - allowed)} not on {sorted(metrics)}"
        for lab, value in equals:
            if lab == "result" and value:
                assert value in CACHE_RESULTS, f"{title}: result={value!r}"
            if lab == "role" and value:
                assert value in ("policy", "reward"), f"{title}: role={value!r}"
        used |= metrics
    missing = DASHBOARD_MUST_QUERY - used
    assert not missing, f"dashboard does not show {sorted(missing)}"


def test_dashboard_key_queries(dashboard):
    exprs = [e for _, e in _exprs(dashboard)]
    joined = "\n".join(exprs)
    for q in (0.5, 0.95, 0.99):
        assert any(f"histogram_quantile({q}" in e and "ttc_request_duration_seconds_bucket" in e for e in exprs), q
    assert any("ttc_flops_total" in e and re.search(r"by \((strategy, role|role, strategy)\)", e) for e in exprs)
    assert any("histogram_quantile" in e and "ttc_request_flops_bucket" in e and "strategy" in e for e in exprs)
    hit_rate = [e for e in exprs if 'result="hit"' in e and "/" in e]
    assert hit_rate and all("by (kind)" in e and "miss" in e for e in hit_rate), "cache hit rate = hit/(hit+miss)"
    assert "vllm:prefix_cache_hits_total" in joined and "vllm:prefix_cache_queries_total" in joined


def test_metrics_contract_matches_gateway_code():
    """The hard-coded contract above is what service/metrics.py registers (names and label sets)."""
    metrics_mod = pytest.importorskip("service.metrics")
    from prometheus_client import CollectorRegistry

    m = metrics_mod.Metrics(CollectorRegistry(), process_metrics=False)
    exported: dict[str, set[str]] = {}
    for obj in vars(m).values():
        kind = getattr(obj, "_type", None)
        if kind not in ("counter", "gauge", "histogram", "summary"):
            continue
        name, labels = obj._name, set(obj._labelnames)
        if kind == "counter":
            exported[name + "_total"] = labels
        elif kind == "histogram":
            exported[name + "_bucket"] = labels | {"le"}
            exported[name + "_sum"] = exported[name + "_count"] = labels
        else:
            exported[name] = labels
    assert exported == GATEWAY_METRICS


def test_promql_scanner_catches_mistakes():
    m, labels, _ = promql_refs('sum by (pool) (rate(ttc_upstrem_errors_total{kind="timeout"}[5m]))')
    assert m == {"ttc_upstrem_errors_total"} and labels == {"pool", "kind"}
    m, labels, _ = promql_refs('histogram_quantile(0.9, sum by (le) (rate(vllm:x_bucket{a=~"$v"}[$__rate_interval])))')
    assert m == {"vllm:x_bucket"} and labels == {"le", "a"}


def test_grafana_provisioning_matches_compose(compose):
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert urlparse(source["url"]).hostname in host_names(compose, "prometheus")
    prov = load_yaml(DEPLOY / "grafana/provisioning/dashboards/ttc-gateway.yaml")
    (provider,) = prov["providers"]
    mounts = dict(str(v).split(":")[:2] for v in services(compose)["grafana"]["volumes"])
    assert mounts.get("./deploy/grafana/dashboards") == provider["options"]["path"]
    assert mounts.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"


# ---------------------------------------------------------------------------------------------------------------
# (d) Prometheus


def _targets(cfg: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for job in cfg["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        out[job["job_name"]] = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    return out


def test_prometheus_scrapes_gateway_and_workers(compose):
    cfg = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    targets = [t for ts in _targets(cfg).values() for t in ts]
    expected = {"gateway": 8000, "policy": 8000, "reward": 8000}
    for svc_name, port in expected.items():
        hits = [t for t in targets if t.split(":")[0] in host_names(compose, svc_name)]
        assert hits, f"prometheus does not scrape {svc_name}"
        assert all(int(t.split(":")[1]) == port for t in hits)
    # every compose host scraped resolves to a service or alias in both profiles' union
    known = set().union(*(host_names(compose, n) for n in services(compose))) | {"localhost"}
    assert {t.split(":")[0] for t in targets} <= known
    # gateway variants of both profiles answer to the scraped name
    gw_host = next(t for t in targets if t.startswith("gateway:")).split(":")[0]
    assert gw_host in host_names(compose, "gateway") and gw_host in host_names(compose, "gateway-cpu")
    mounts = dict(str(v).split(":")[:2] for v in services(compose)["prometheus"]["volumes"])
    assert mounts.get("./deploy/prometheus/prometheus.yml") == "/etc/prometheus/prometheus.yml"


def test_prometheus_k8s_config_matches_service():
    path = DEPLOY / "prometheus/prometheus-k8s.yml"
    if not path.exists():
        pytest.skip("no prometheus-k8s.yml")
    cfg = load_yaml(path)
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ttc-gateway")
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    svc = _find(kustomize_build(K8S / "base"), "Service", "ttc-gateway")
    value = ";".join([svc["metadata"]["name"], svc["spec"]["ports"][0]["name"]])
    assert keep["source_labels"] == ["__meta_kubernetes_service_name", "__meta_kubernetes_endpoint_port_name"]
    assert re.fullmatch(keep["regex"], value)
    namespaces = job["kubernetes_sd_configs"][0].get("namespaces", {}).get("names")
    overlay_ns = {load_yaml(K8S / o / "kustomization.yaml")["namespace"] for o in OVERLAYS}
    assert namespaces is None or overlay_ns <= set(namespaces)


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-k8s.yml"])
def test_promtool_check_config(name):
    if not shutil.which("promtool"):
        pytest.skip("promtool (Debian package prometheus) not installed")
    r = subprocess.run(["promtool", "check", "config", "--syntax-only", str(DEPLOY / "prometheus" / name)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "field kubernetes_sd_configs not found" in r.stdout + r.stderr:
        # Debian builds Prometheus without Kubernetes service discovery; upstream images have it.
        pytest.skip("this promtool (Debian's build) lacks Kubernetes service discovery; the upstream image has it")
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------------------------
# (e) Dockerfiles


def parse_dockerfile(path: Path) -> list[list[tuple[str, str]]]:
    """Stages, each a list of (INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and not stages:
            k, _, v = rest.strip().partition("=")
            args[k] = v
        if instr == "FROM":
            rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), rest)
            stages.append([])
        if stages:
            stages[-1].append((instr, rest.strip()))
    return stages


def _exec_form(arg: str) -> list[str]:
    arg = arg.strip()
    return json.loads(arg) if arg.startswith("[") else shlex.split(arg)


WEIGHT_PATTERNS = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx", "models", "huggingface", "hf-cache")


def _copy_sources(stage: list[tuple[str, str]]) -> list[str]:
    out = []
    for instr, rest in stage:
        if instr in ("COPY", "ADD"):
            parts = [p for p in _exec_form(rest) if not p.startswith("--")]
            if any(p.startswith("--from") for p in _exec_form(rest)):
                continue
            out.extend(parts[:-1])
    return out


def _check_runtime_stage(path: Path) -> list[tuple[str, str]]:
    stages = parse_dockerfile(path)
    assert len(stages) >= 2, f"{path.name}: multi-stage build expected"
    for stage in stages:
        image = stage[0][1].split()[0]
        assert image.startswith("python:3.11-slim"), f"{path.name}: base image {image}"
        for instr, rest in stage:
            if instr in ("COPY", "ADD"):
                assert not re.search(r"https?://", rest), f"{path.name}: no remote ADD"
                for src in _copy_sources([(instr, rest)]):
                    low = src.lower()
                    assert not any(p in low for p in WEIGHT_PATTERNS), f"{path.name}: copies weights? {src}"
    final = stages[-1]
    users = [rest for instr, rest in final if instr == "USER"]
    assert users, f"{path.name}: final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: runs as root"
    hc = [rest for instr, rest in final if instr == "HEALTHCHECK"]
    assert hc and "/health" in hc[-1] and "python" in hc[-1], f"{path.name}: python HEALTHCHECK on /health"
    assert "curl" not in hc[-1] and "wget" not in hc[-1]
    assert any(instr == "EXPOSE" and "8000" in rest.split() for instr, rest in final)
    env = " ".join(rest for instr, rest in final if instr == "ENV")
    assert re.search(r"\bTTC_HOST=0\.0\.0\.0\b", env), f"{path.name}: TTC_HOST=0.0.0.0"
    return final


def test_dockerfile_gateway():
    path = ROOT / "Dockerfile"
    final = _check_runtime_stage(path)
    cmd = [rest for instr, rest in final if instr == "CMD"][-1]
    assert _exec_form(cmd) == ["ttc-gateway", "serve"]
    assert not any(instr == "ENTRYPOINT" for instr, _ in final)
    runs = " ".join(rest for stage in parse_dockerfile(path) for instr, rest in stage if instr == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "installs the package without extras"
    assert "[cpu]" not in runs and "[gpu]" not in runs and "vllm" not in runs
    # the UID matches the Kubernetes securityContext
    uid = [rest for instr, rest in final if instr == "USER"][-1].split(":")[0]
    dep = _find(kustomize_build(K8S / "base"), "Deployment", "ttc-gateway")
    assert str(dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid


def test_dockerfile_cpu():
    path = DEPLOY / "docker/Dockerfile.cpu"
    final = _check_runtime_stage(path)
    runs = " ".join(rest for stage in parse_dockerfile(path) for instr, rest in stage if instr == "RUN")
    assert re.search(r"pip install [^&;]*'\.\[cpu\]'", runs), "installs '.[cpu]'"
    m = re.search(r"pip uninstall -y ([^&;]+)", runs)
    assert m and {"torchvision", "torchaudio", "torchcodec"} <= set(m.group(1).split())
    assert any(instr == "VOLUME" for instr, _ in final), "models live in a volume"
    entry = _exec_form([rest for instr, rest in final if instr == "ENTRYPOINT"][-1])
    cmd = _exec_form([rest for instr, rest in final if instr == "CMD"][-1])
    copies = {Path(_exec_form(rest)[-1]).name: _exec_form(rest)[0] for instr, rest in final if instr == "COPY"
              and not rest.startswith("--from")}
    scripts = [copies[Path(e).name] for e in entry if Path(e).name in copies]
    assert len(scripts) == 1, f"ENTRYPOINT {entry} should run a script COPY'd from the repository"
    script = (ROOT / scripts[0]).read_text()
    assert os.access(ROOT / scripts[0], os.X_OK), "entrypoint script must be executable"
    prep, serve = script.find("ttc-gateway prepare-models"), script.find('exec ttc-gateway "$@"')
    assert 0 <= prep < serve, "entrypoint prepares models, then execs the gateway"
    assert cmd == ["serve"]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or (pat.startswith("**/") and fnmatch.fnmatch(p.rsplit("/", 1)[-1],
                                                                                        pat[3:]))
               for p in prefixes):
            ignored = not neg
    return ignored


def test_dockerignore():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    for must in (".git", ".venv", "x.gguf", "models/m/model.safetensors"):
        assert _dockerignored(must, patterns), f".dockerignore lets {must} into the build context"
    for df in (ROOT / "Dockerfile", DEPLOY / "docker/Dockerfile.cpu"):
        for stage in parse_dockerfile(df):
            for src in _copy_sources(stage):
                src = src.rstrip("*").rstrip("/") or src
                if "*" in src:
                    continue
                assert not _dockerignored(src, patterns), f"{df.name} copies {src}, which .dockerignore drops"
