"""Every params file validates against the stages' typed configs.

``params.yaml`` on its own, and every params override ``configs/*.yaml`` (e.g.
``configs/paper.yaml``) deep-merged over it: mappings merge key by key, anything else (lists,
scalars) is replaced. ``configs/accelerate/*.yaml`` are accelerate launch configs, checked with
accelerate's own loader; perspective files in sub-folders with ``pipeline.perspectives``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ConfigError, deep_merge
from pipeline.perspectives import student_message
from stages.app import validate_params as validate

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_DIR = ROOT / "configs" / "accelerate"
OVERRIDES = sorted((ROOT / "configs").glob("*.yaml"))


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: expected a mapping of stage sections"
    return data


def test_params_yaml_validates() -> None:
    params = load_yaml(ROOT / "params.yaml")
    configs = validate(params, "params.yaml")
    assert {"evaluate", "report", "analyze"} <= set(params)
    ev = configs["evaluate"]
    prepared = {d.name for d in configs["prepare"].eval}
    missing = [d.name for d in ev.datasets if d.name not in prepared]
    assert not missing, f"evaluate.datasets {missing} are not prepared by prepare.eval"


def test_there_is_a_paper_override() -> None:
    assert ROOT / "configs" / "paper.yaml" in OVERRIDES


def test_every_file_under_configs_is_a_known_kind() -> None:
    """Top level: params overrides (tested below); accelerate/: launch configs (tested below);
    anything else must be a perspectives file that ``load_perspectives`` accepts."""
    from pipeline.perspectives import load_perspectives

    for path in sorted((ROOT / "configs").rglob("*")):
        if path.is_dir() or path.parent == ROOT / "configs" or ACCELERATE_DIR in path.parents:
            continue
        assert path.suffix in (".yaml", ".yml"), f"{path}: unexpected file under configs/"
        assert "perspectives" in load_yaml(path), f"{path}: neither a params override nor an accelerate config"
        assert load_perspectives(path), path
    assert not list((ROOT / "configs").glob("*.yml")), "params overrides must end in .yaml"


@pytest.mark.parametrize("path", OVERRIDES, ids=[str(p.relative_to(ROOT)) for p in OVERRIDES])
def test_override_validates_over_params(path: Path) -> None:
    merged = deep_merge(load_yaml(ROOT / "params.yaml"), load_yaml(path))
    configs = validate(merged, str(path))
    prepared = {d.name for d in configs["prepare"].eval}
    missing = [d.name for d in configs["evaluate"].datasets if d.name not in prepared]
    assert not missing, f"{path}: evaluate.datasets {missing} are not prepared by prepare.eval"


def test_paper_config_is_the_paper_setting() -> None:
    merged = deep_merge(load_yaml(ROOT / "params.yaml"), load_yaml(ROOT / "configs" / "paper.yaml"))
    c = validate(merged, "configs/paper.yaml")
    # Hub ids: a large instruct teacher, a Qwen2.5-1.5B-class student.
    teachers = c["generate"].teachers
    assert len(teachers) == 1 and "Instruct" in teachers[0].model and teachers[0].model.count("/") == 1
    assert c["models"].models["qwen2.5-1.5b-instruct"] == "Qwen/Qwen2.5-1.5B-Instruct"
    student = "data/models/qwen2.5-1.5b-instruct"
    assert c["distill"].student == student and c["evaluate"].base_model == student
    assert c["analyze"].students["base"] == student
    # A larger GSM8K pool, 8 perspectives; the filter's difficulty-aware selection keeps 497 of it.
    (train,) = c["prepare"].train
    assert train.format == "gsm8k" and train.limit is not None and train.limit >= 3 * 497
    assert c["generate"].num_questions is None  # the whole pool is generated
    assert c["generate"].perspectives is None and c["generate"].perspectives_file is None  # the 8 built-in
    assert c["filter"].max_questions == 497 and c["distill"].max_paths == 8
    assert c["filter"].easy_keep_fraction < 1.0  # easy questions are down-sampled, hard ones kept
    # The paper's ablation table: each ablation is trained, evaluated and in the report's order, on 3 seeds.
    assert c["distill"].methods == ["single", "uniform", "mcc", "mind", "mind-no-synergy", "mind-ema0", "mind-beta0"]
    assert all(a in c["report"].order for a in c["distill"].methods) and len(c["distill"].seeds) == 3
    # ID and OOD eval on the six benchmarks, every question (no limits).
    groups = {d.name: d.group for d in c["evaluate"].datasets}
    assert groups == {"gsm8k": "id", "svamp": "id", "math500": "id",
                      "csqa": "ood", "strategyqa": "ood", "gpqa": "ood"}
    assert all(d.limit is None for d in c["evaluate"].datasets)
    assert all(d.limit is None for d in c["prepare"].eval) and c["prepare"].limit is None
    formats = {d.name: d.format for d in c["prepare"].eval}
    assert formats["gpqa"] == "gpqa" and formats["math500"] in ("math500", "hub")
    # vLLM tensor parallelism for the teacher; compiled (non-eager) engines on GPU.
    teacher_engine = c["generate"].engine_for(teachers[0])
    assert teacher_engine.tensor_parallel_size >= 2 and not teacher_engine.enforce_eager
    assert teacher_engine.kv_cache_gib is None and teacher_engine.gpu_memory_utilization > 0.5


def test_a_bad_override_is_caught() -> None:
    """The validation above can fail: a typo and a wrong type are both reported."""
    params = load_yaml(ROOT / "params.yaml")
    with pytest.raises(ConfigError, match="unknown parameter"):
        validate(deep_merge(params, {"evaluate": {"max_token": 10}}), "bad")
    with pytest.raises(ConfigError, match="expected an integer"):
        validate(deep_merge(params, {"evaluate": {"engine": {"tensor_parallel_size": "two"}}}), "bad")
    with pytest.raises(ConfigError, match="unknown section"):
        validate(deep_merge(params, {"evalute": {}}), "bad")


def test_deep_merge() -> None:
    base = {"a": {"x": 1, "y": [1, 2], "z": {"k": 1}}, "b": 2}
    out = deep_merge(base, {"a": {"y": [3], "z": {"j": 2}}, "c": 3})
    assert out == {"a": {"x": 1, "y": [3], "z": {"k": 1, "j": 2}}, "b": 2, "c": 3}
    assert base["a"]["y"] == [1, 2]  # the base is not modified


def test_accelerate_configs_load() -> None:
    """accelerate's own loader (unknown keys and bad enum values raise), and at least one
    multi-GPU config for the paper-scale distill runs."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import ComputeEnvironment, DistributedType

    paths = sorted(ACCELERATE_DIR.glob("*.yaml"))
    assert paths, f"no accelerate config under {ACCELERATE_DIR}"
    processes = []
    for path in paths:
        raw = load_yaml(path)
        for key in ("compute_environment", "distributed_type", "num_processes", "mixed_precision"):
            assert key in raw, f"{path}: missing {key}"
        cfg = load_config_from_file(str(path))
        assert isinstance(cfg, ClusterConfig), path
        assert ComputeEnvironment(cfg.compute_environment) == ComputeEnvironment.LOCAL_MACHINE, path
        assert DistributedType(cfg.distributed_type) in set(DistributedType), path
        assert cfg.mixed_precision in ("no", "fp16", "bf16", "fp8"), path
        assert cfg.num_processes >= 1 and cfg.num_machines >= 1, path
        processes.append(cfg.num_processes)
    assert max(processes) > 1, f"no multi-GPU accelerate config under {ACCELERATE_DIR}"


def test_students_train_on_exactly_the_prompt_evaluate_asks() -> None:
    """One prompt: the user message distill trains on is the one evaluate scores, for every answer type."""
    from pipeline.questions import format_question
    from stages import evaluate

    rows = [
        {"question": "Anna has 3 apples. How many?", "answer_type": "number", "choices": []},
        {"question": "Where are books kept?", "answer_type": "choice", "choices": ["bank", "library"]},
        {"question": "Can penguins fly?", "answer_type": "yesno", "choices": []},
    ]
    for row in rows:
        # filter stores format_question(q) in the filtered rows' `question` column; distill reads it
        trained = student_message(format_question(row), row["answer_type"])
        asked = evaluate.user_message(row)
        assert trained == asked
        assert "Let's think step by step." in asked and "The answer is X." in asked


def test_every_stage_default_is_params_yaml_value() -> None:
    """A config built from the code's defaults is the one params.yaml gives: tests that build configs
    from the defaults test the settings the pipeline runs. (prepare and generate need their lists.)"""
    from pipeline.config import to_dict
    from stages.app import CONFIGS

    configs = validate(load_yaml(ROOT / "params.yaml"), "params.yaml")
    required = {"prepare": ("train", "eval"), "generate": ("teachers",)}
    for section, cls in CONFIGS.items():
        given = configs[section]
        built = cls(**{k: getattr(given, k) for k in required.get(section, ())})
        assert to_dict(built) == to_dict(given), section


def _inertia_fits(params: dict[str, Any], source: str) -> None:
    from pipeline.fdic import half_life_steps

    d = validate(params, source)["distill"]
    assert half_life_steps(d.ta.mu) <= d.max_steps / 4, (
        f"{source}: ta.mu {d.ta.mu} remembers a loss for {half_life_steps(d.ta.mu):.1f} steps (half-life) "
        f"of a {d.max_steps}-step run: L̄ would lag the student")


def test_inertia_memory_fits_the_run() -> None:
    """FDIC's L̄ forgets per student step; its half-life must be a small part of the run."""
    params = load_yaml(ROOT / "params.yaml")
    _inertia_fits(params, "params.yaml")
    _inertia_fits(deep_merge(params, load_yaml(ROOT / "configs" / "paper.yaml")), "configs/paper.yaml")
    with pytest.raises(AssertionError, match="lag the student"):
        _inertia_fits(deep_merge(params, {"distill": {"ta": {"mu": 0.95}}}), "bad")


def test_the_ta_defaults_are_the_params_yaml_values() -> None:
    """One set of TA settings: what params.yaml says is what a TaConfig() without arguments holds
    (tests and scripts that build one get the default run's TA)."""
    from pipeline.fdic import TaConfig

    assert validate(load_yaml(ROOT / "params.yaml"), "params.yaml")["distill"].ta == TaConfig()


def _dvc_stages(tmp: Path, params: dict[str, Any]) -> tuple[set[str], dict[str, set[str]]]:
    """The stage names DVC resolves from dvc.yaml with these params, and each stage's upstream stages."""
    import shutil

    from dvc.repo import Repo

    shutil.copy(ROOT / "dvc.yaml", tmp / "dvc.yaml")
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(str(tmp), no_scm=True)
    with Repo(str(tmp)) as repo:
        graph = repo.index.graph
        names = {s.name for s in graph.nodes}
        upstream = {s.name: {d.name for d in graph.successors(s)} for s in graph.nodes}
    return names, upstream


def test_dvc_runs_each_method_once_per_seed_and_the_injected_arm_only_when_params_ask(tmp_path: Path) -> None:
    params = load_yaml(ROOT / "params.yaml")
    (tmp_path / "default").mkdir()
    names, upstream = _dvc_stages(tmp_path / "default", params)
    default = [f"{m}-0" for m in ("single", "uniform", "mcc", "mind")]
    assert {f"distill@{s}" for s in default} | {f"evaluate@{s}" for s in default} <= names
    assert not any(n.startswith(("distill-injected@", "evaluate-injected@")) for n in names)  # off by default
    assert {f"evaluate@{s}" for s in default} | {"evaluate-base"} <= upstream["report"]

    paper = deep_merge(params, load_yaml(ROOT / "configs" / "paper.yaml"))
    (tmp_path / "paper").mkdir()
    names, upstream = _dvc_stages(tmp_path / "paper", paper)
    for a in ("mind-no-synergy", "mind-ema0", "mind-beta0"):
        for seed in (0, 1, 2):
            assert upstream[f"evaluate@{a}-{seed}"] >= {f"distill@{a}-{seed}"}
            assert f"evaluate@{a}-{seed}" in upstream["report"]  # the report waits for every evaluated run

    study = deep_merge(params, load_yaml(ROOT / "configs" / "cpu-mechanism.yaml"))
    (tmp_path / "study").mkdir()
    names, upstream = _dvc_stages(tmp_path / "study", study)
    runs = [f"{m}-{s}" for m in ("uniform", "mind", "mind-length") for s in (0, 1, 2)]
    assert {n for n in names if n.startswith("distill")} == {f"distill@{r}" for r in runs} | \
        {f"distill-injected@{r}" for r in runs}
    assert {f"evaluate-injected@{r}" for r in runs} | {f"evaluate@{r}" for r in runs} <= upstream["report"]
    # every entry's command line over the study's params builds a valid run config, named as dvc.yaml says
    from pipeline.config import from_dict
    from stages.distill import DistillConfig

    section = study["distill"]
    for m in ("uniform", "mind", "mind-length"):
        clean = from_dict(DistillConfig, {**section, "method": m, "seed": 1, "inject": 0}, "distill")
        injected = from_dict(DistillConfig, {**section, "method": m, "seed": 1}, "distill")
        assert (clean.name, injected.name) == (f"{m}-s1", f"{m}-inj-s1")
