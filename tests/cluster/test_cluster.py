"""cluster.yaml, jobs/cluster.toml and the README's cluster commands, checked without a cluster.

The cluster config goes through what ``ray up`` does before it contacts AWS
(``prepare_config``: Ray's AWS defaults merged, setup commands combined per node type; then
``validate_config``: Ray's schema), and the result is checked against what the study needs:
a head that never trains, GPU workers that scale from zero, the local environment on every
node, token authentication everywhere, a dashboard on loopback only, shared storage under the
recipe's paths. The README's commands are parsed with the real CLIs (Ray's click commands,
cxr-ray's argparse) and their files, addresses and paths checked against the config and the
recipe, and the recipe's ``[resources] autoscale`` against the config's node types. The
README's cost projection is recomputed from the recipe and the real cohort sizes.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from cxr_ray import cli
from cxr_ray.sweep import capacity, plan as sweep, recipe as config
from cxr_ray.data import cohorts
from cxr_ray.optim import presets

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
CLUSTER_RECIPE = ROOT / "jobs" / "cluster.toml"
SECTION = "## Running on a Ray cluster"
S3_SECTION = "## Running on a Ray cluster with S3 storage"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """cluster.yaml as ``ray up`` sees it before bootstrapping the AWS resources."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def recipe() -> config.Recipe:
    return config.load_recipe(CLUSTER_RECIPE)


def _node_types(cfg: dict) -> tuple[dict, dict[str, dict]]:
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    gpu = {name: t for name, t in types.items()
           if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    return head, gpu


def _ray_starts(cfg: dict) -> list[str]:
    cmds = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    return [c for c in cmds if "ray start" in c]


def _mount_point(cfg: dict) -> str:
    found = {m for c in cfg["setup_commands"] for m in re.findall(r"mountpoint -q (\S+)", c)}
    assert len(found) == 1, f"expected one shared mount in setup_commands, found {found}"
    return found.pop()


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name = re.split(r"[\[=<>~! ]", dep, maxsplit=1)[0]
        if name in ("torch", "torchvision", "ray"):
            pins[name] = dep
    assert set(pins) == {"torch", "torchvision", "ray"}
    return pins


# --------------------------------------------------------------------------- cluster.yaml
def test_ray_accepts_the_config_as_ray_up_prepares_it(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "cxr-ray"
    images = {t["node_config"]["ImageId"] for t in prepared["available_node_types"].values()}
    # a deliberate image, the same on every node, not Ray's old default DLAMI
    assert len(images) == 1
    assert images.pop().startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/")


def test_the_head_never_trains(prepared, recipe):
    head, gpu = _node_types(prepared)
    assert head["resources"].get("CPU", 0) >= 1
    assert head["resources"].get("GPU", 0) == 0 and "gpu_node" not in head["resources"]
    assert "--num-gpus" not in " ".join(prepared["head_start_ray_commands"])
    assert head["max_workers"] == 0
    # a training worker's request, as cxr_ray.train builds it ({"CPU", "GPU", **extra}),
    # fits every GPU node type and not the head
    train = recipe.train
    assert train["gpu"] is True and train["worker_resources"] == {"gpu_node": 0.01}
    bundle = {"CPU": float(train.get("cpus_per_worker") or 1.0),
              "GPU": float(train["gpus_per_worker"]), **train["worker_resources"]}
    fits = lambda res: all(res.get(k, 0) >= v for k, v in bundle.items())  # noqa: E731
    assert not fits(head["resources"])
    assert gpu and all(fits(t["resources"]) for t in gpu.values())


def test_every_trial_of_the_cluster_recipe_trains_on_gpu_nodes(recipe):
    stage1, stage2, comparison = sweep.plan_trials(recipe)
    seeds = len(recipe.experiment.seed_list)
    assert seeds == 3 and len(stage1) == 15 * seeds
    assert len(stage2) == 15 * seeds * len(recipe.grid["policy"]) and comparison
    for spec in stage1 + stage2 + comparison:  # the LR range test reuses its stage-1 settings
        assert spec.train["gpu"] is True, spec.run_name
        assert spec.train["worker_resources"] == {"gpu_node": 0.01}, spec.run_name


def test_gpu_workers_scale_from_zero_and_back(prepared, recipe):
    _, gpu = _node_types(prepared)
    for name, node in gpu.items():
        assert node["min_workers"] == 0, name
        assert node["max_workers"] >= 1, name
        assert node["resources"]["gpu_node"] >= 1, name  # an integer per node (Ray's schema)
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["provider"]["cache_stopped_nodes"] is False
    gpus = sum(n["max_workers"] * n["resources"]["GPU"] for n in gpu.values())
    assert sum(n["max_workers"] for n in gpu.values()) <= prepared["max_workers"]
    # as many trials at once as the autoscaler can give GPUs
    per_trial = int(recipe.train.get("workers", 1)) * float(recipe.train["gpus_per_worker"])
    assert recipe.resources.max_concurrent_trials == int(gpus // per_trial)  # 4 per GPU


def test_the_recipe_states_the_autoscaler_node_types(prepared, recipe):
    """jobs/cluster.toml's [resources] autoscale mirrors cluster.yaml (Ray has no documented
    API that returns the autoscaler config), and "auto" on it gives max_concurrent_trials."""
    head, gpu = _node_types(prepared)
    stated = recipe.resources.autoscale
    assert stated["max_workers"] == prepared["max_workers"]
    workers = {name: t for name, t in prepared["available_node_types"].items()
               if name != prepared["head_node_type"]}
    assert set(workers) == set(gpu) == set(stated) - {"max_workers"}
    for name, node in workers.items():
        assert stated[name] == {"max_workers": node["max_workers"],
                                "resources": node["resources"]}, name
    request, per_trial = capacity.worker_request(recipe.train, recipe.resources.trial_cpus)

    def auto(groups, cap):
        return capacity.trials_at_once(groups, request, per_trial,
                                       data_reserve=0.0, max_worker_nodes=cap)

    # the capacity rule on the stated types plus the head (live there: cluster.yaml's)
    assert auto(*capacity.groups_from_stated(stated, head["resources"])) == 32
    assert auto(*capacity.groups_from_autoscaler_config(prepared, None)) == 32
    assert recipe.resources.max_concurrent_trials == 32  # 8 GPU nodes x 4 quarter-GPU trials


def test_every_node_gets_the_local_environment_and_the_project(raw, prepared):
    pins = _pins()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    for key in ("head_setup_commands", "worker_setup_commands"):
        tokens = [t for c in prepared[key] for t in shlex.split(c)]
        for name, pin in pins.items():
            assert pin in tokens, f"{key}: {pin} (pyproject.toml) not installed"
        assert "3.11" in tokens and ">=3.11" in requires  # the venv's Python
        assert tokens[tokens.index("-e") + 1] == "~/cxr-ray", key  # the project, editable
    for node in prepared["available_node_types"].values():
        assert "worker_setup_commands" not in node  # no node type skips the common setup
    assert raw["file_mounts"]["~/cxr-ray"] == "."
    assert ".gitignore" in raw["rsync_filter"]  # no .venv or data in the upload
    assert any("boto3" in c for c in raw["head_setup_commands"])  # the autoscaler's client


def test_token_authentication_on_every_node(raw, prepared):
    starts = _ray_starts(prepared)
    assert len(starts) == 2
    for cmd in starts:
        before = cmd[:cmd.index("ray start")]
        assert re.search(r"(^|[;&\s])(export\s+)?RAY_AUTH_MODE=token\b", before), cmd
    # the token travels as a file from the operator's default location, never as a literal
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_TOKEN" not in text
    assert any("RAY_AUTH_MODE=token" in c for c in raw["setup_commands"])  # shells on nodes


def test_the_token_is_never_committed():
    for path in ("auth_token", ".ray/auth_token", "jobs/auth_token"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f".gitignore must cover {path}"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert not [p for p in tracked if Path(p).name == "auth_token"]
    secrets = []
    local = Path.home() / ".ray" / "auth_token"
    if local.is_file() and local.read_text().strip():
        secrets.append(local.read_text().strip())
    pattern = re.compile(r"RAY_AUTH_TOKEN\s*=\s*['\"]?[0-9a-f]{32,}")
    for path in tracked:
        f = ROOT / path
        if not f.is_file() or f.stat().st_size > 2_000_000:
            continue
        text = f.read_text(errors="ignore")
        assert not pattern.search(text), path
        assert not any(s in text for s in secrets), f"{path} holds the local Ray token"


def test_dashboard_and_job_api_listen_on_loopback_only(prepared):
    head_start = next(c for c in prepared["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--dashboard-port=8265" in head_start
    for cmd in _ray_starts(prepared):
        assert "0.0.0.0" not in cmd and "--dashboard-host=127.0.0.1" in cmd


def test_recipe_paths_are_on_the_shared_mount(prepared, recipe):
    mount = _mount_point(prepared)
    assert any(f"mountpoint -q {mount}" in c for c in prepared["worker_setup_commands"])
    for path in (recipe.experiment.storage_path, recipe.experiment.shards):
        assert Path(path).is_relative_to(mount), path
    assert "fs-CHANGE-ME" in CLUSTER_YAML.read_text()  # the one placeholder the README names


def test_cluster_recipe_is_the_paper_recipe_plus_worker_resources():
    paper = tomllib.loads((ROOT / "jobs" / "paper.toml").read_text())
    cluster = tomllib.loads(CLUSTER_RECIPE.read_text())
    assert cluster["train"].pop("worker_resources") == {"gpu_node": 0.01}
    assert set(cluster["resources"].pop("autoscale")) == {"max_workers", "gpu"}
    assert cluster == paper


# --------------------------------------------------------------------------- README
def _section(title: str = SECTION) -> str:
    text = (ROOT / "README.md").read_text()
    assert title + "\n" in text
    body = text[text.index(title + "\n") + len(title):]
    return body[:body.index("\n## ")] if "\n## " in body else body


def _commands(title: str = SECTION) -> list[list[str]]:
    """Every command of the section's bash blocks, continuations joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", _section(title), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def _ray(words: list[str]) -> list[str] | None:
    return words[1:] if words[0] in ("ray", ".venv/bin/ray") else None


def test_readme_cluster_commands_run_as_written(prepared, recipe):
    from ray.scripts.scripts import cli as ray_cli

    cmds = _commands()
    dashboard = "http://127.0.0.1:8265"
    exp_dir = f"{recipe.experiment.storage_path}/{recipe.experiment.name}"
    seen: dict[str, list] = {}
    auth_mode_set = False
    for words in cmds:
        if words[:2] == ["export", "RAY_AUTH_MODE=token"]:
            auth_mode_set = True
            continue
        if words[0] == "chmod":  # the token: readable by its owner only
            assert words == ["chmod", "600", "~/.ray/auth_token"]
            continue
        args = _ray(words)
        assert args is not None, f"unexpected command in the README: {shlex.join(words)}"
        group = ray_cli.commands[args[0]]
        if args[0] == "job":
            sub = group.commands[args[1]]
            params = sub.make_context(args[1], list(args[2:])).params
            assert auth_mode_set, "export RAY_AUTH_MODE=token before the job commands"
            assert params["address"] == dashboard
            seen.setdefault(f"job {args[1]}", []).append(params)
            continue
        params = group.make_context(args[0], list(args[1:])).params
        seen.setdefault(args[0], []).append(params)
        if "cluster_config_file" in params:
            assert params["cluster_config_file"] == "cluster.yaml"
    for name in ("get-auth-token", "up", "dashboard", "job submit", "job stop", "rsync-down",
                 "down"):
        assert name in seen, f"the README never runs `ray {name}`"
    assert seen["get-auth-token"][0]["generate"]
    assert seen["dashboard"][0]["port"] == 8265 == seen["dashboard"][0]["remote_port"]

    entry = {}
    for params in seen["job submit"]:
        assert params["working_dir"] == "."
        env = yaml.safe_load((ROOT / params["runtime_env"]).read_text())
        assert isinstance(env, dict) and set(env) <= {"excludes", "env_vars"}
        words = list(params["entrypoint"])
        assert words[0] == "cxr-ray"
        ns = cli.build_parser().parse_args(words[1:])  # exits (fails) on an unknown flag
        entry.setdefault(ns.command, []).append(ns)
    assert set(entry) == {"prepare", "sweep", "report"}
    mount = _mount_point(prepared)
    for ns in entry["prepare"]:
        assert str(ns.out) == recipe.experiment.shards and ns.size == recipe.train["image_size"]
        assert ns.data.is_relative_to(mount)  # every node reads the images
    for ns in entry["sweep"]:
        loaded = config.load_recipe(ROOT / ns.config, cli._parse_overrides(ns.set))
        assert loaded.to_dict() == recipe.to_dict()
        assert ns.config == Path("jobs/cluster.toml")
    assert any(ns.resume for ns in entry["sweep"])  # the documented resubmission
    for ns in entry["report"]:
        assert str(ns.experiment) == exp_dir
    ids = [p["submission_id"] for p in seen["job submit"] if p["submission_id"]]
    assert len(ids) == len(set(ids))  # a resubmission needs a new submission id
    for params in seen["job stop"] + seen.get("job logs", []):
        assert params["job_id"] in ids
    for params in seen["rsync-down"]:
        assert params["source"].startswith(exp_dir + "/")


def test_readme_s3_variant_is_the_cluster_recipe_on_a_bucket(recipe):
    """The S3 section's jobs parse with the real CLIs and run the cluster recipe unchanged
    but for where its shards and experiment live."""
    entry: dict[str, list] = {}
    for words in _commands(S3_SECTION):
        if words[:2] == ["export", "RAY_AUTH_MODE=token"]:
            continue
        from ray.scripts.scripts import cli as ray_cli

        args = _ray(words)
        assert args is not None and args[:2] == ["job", "submit"], shlex.join(words)
        params = ray_cli.commands["job"].commands["submit"].make_context(
            "submit", list(args[2:])).params
        ns = cli.build_parser().parse_args(list(params["entrypoint"])[1:])
        entry.setdefault(ns.command, []).append(ns)
    assert set(entry) == {"prepare", "sweep", "report"}
    (prep,) = entry["prepare"]
    for ns in entry["sweep"]:
        loaded = config.load_recipe(ROOT / ns.config, cli._parse_overrides(ns.set))
        assert loaded.experiment.storage_path.startswith("s3://")
        assert loaded.experiment.shards == str(prep.out)
        theirs, mine = loaded.to_dict(), recipe.to_dict()
        for d in (theirs, mine):
            d["experiment"] = {k: v for k, v in d["experiment"].items()
                               if k not in ("storage_path", "shards")}
        assert theirs == mine
        assert str(entry["report"][0].experiment) == loaded.experiment_uri
    assert any(ns.resume for ns in entry["sweep"])


def test_readme_names_the_one_time_aws_steps(raw):
    text = _section()
    assert "fs-CHANGE-ME" in text
    if raw["available_node_types"]["gpu"]["node_config"]["ImageId"].startswith("resolve:ssm:"):
        # the head launches the GPU nodes with that image, so its role must read SSM
        assert "ssm:GetParameters" in text and "ray-autoscaler-v1" in text


def test_readme_cost_projection_matches_the_recipe(recipe, real_meta):
    """The image counts the README's cost notes start from, recomputed."""
    sizes = cohorts.summarize(cohorts.build_all(real_meta, cohorts.CohortConfig()))
    stage1, stage2, comparison = sweep.plan_trials(recipe)
    fits = stage1 + stage2 + comparison
    trained = sum(int(s.train["epochs"]) * sizes[s.cohort]["train"] for s in fits)
    evaluated = sum(int(s.train["epochs"]) * (sizes[s.cohort]["val"] + sizes[s.cohort]["test"])
                    for s in fits)  # every epoch evaluates validation and test
    lr_finds = [s for s in stage1 if s.lr_find]
    trained += sum(recipe.lr_find.num_steps * presets.batch_size(s.cohort) for s in lr_finds)
    text = " ".join(_section().split())
    assert f"{len(fits)} fits" in text  # each LR range test runs in its stage-1 fit
    assert f"{trained / 1e6:.1f} M images" in text
    assert f"{evaluated / 1e6:.1f} M validation and test images" in text
    assert f"{(trained + evaluated / 3) / 1e6:.1f} M training-image equivalents" in text
