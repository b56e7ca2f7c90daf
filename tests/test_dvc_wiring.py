"""dvc.yaml follows the code and the params: `dvc repro` reruns what a change touches.

For every stage DVC resolves from dvc.yaml (with DVC's own resolver, in a scratch folder):
every project module the stage's code imports is a dep, every key of its config is a listed
param, and every path its config names is a dep or an out, with params.yaml as it is and with
every path in it moved (a path written into dvc.yaml instead of templated from the params
would stay behind), and after `mind params configs/paper.yaml`. Then, on a copy whose data are
placeholders committed to dvc.lock, `dvc status` after a change lists exactly the stages that
read what changed. Nothing here loads a model or runs a stage.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from stages import prepare
from stages.app import CONFIGS, app, validate_params

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
ENTRY = "stages.app"  # `mind`: every stage's command runs through it
# the default's students, as dvc.yaml names their stages: <method>-<seed>
STUDENTS: list[str] = [f"{m}-{s}" for m in yaml.safe_load((ROOT / "params.yaml").read_text())["distill"]["methods"]
                       for s in yaml.safe_load((ROOT / "params.yaml").read_text())["distill"]["seeds"]]

# Path params dvc.yaml does not track, and why. Each entry is a gap, not a design.
UNTRACKED: dict[str, str] = {
    "distill.embedding_cache": "the TA's embedding cache: one folder for every distill entry (DVC refuses one out "
                               "in several stages); its files are keyed by the encoder's content (a Hub id by "
                               "name) and each text, so it saves work but never changes a result",
}


@dataclass(frozen=True)
class Wiring:
    """One resolved stage: what it runs, and the paths and params DVC tracks for it."""

    name: str
    section: str  # params.yaml section, from `mind <section>` in cmd
    options: frozenset[str]  # config fields the command line sets (--method, --model)
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # outs, metrics and plots
    params: frozenset[str]


def _norm(path: str | Path) -> str:
    return os.path.normpath(str(path))


def resolve(params: dict[str, Any], tmp: Path) -> dict[str, Wiring]:
    """dvc.yaml's stages as DVC resolves them with these params."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", tmp / "dvc.yaml")
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    Repo.init(str(tmp), no_scm=True)
    stages: dict[str, Wiring] = {}
    with Repo(str(tmp)) as repo:
        for stage in repo.index.stages:
            words = shlex.split(stage.cmd)
            assert words[:1] == ["mind"] and words[1] in CONFIGS, f"{stage.name}: cmd {stage.cmd!r} runs no stage"
            listed = {p for d in stage.deps if isinstance(d, ParamsDependency) for p in d.params}
            stages[stage.name] = Wiring(
                name=stage.name,
                section=words[1],
                options=frozenset(w[2:].replace("-", "_") for w in words[2:] if w.startswith("--")),
                deps=tuple(_norm(d.def_path) for d in stage.deps if not isinstance(d, ParamsDependency)),
                outs=tuple(_norm(o.def_path) for o in stage.outs),
                params=frozenset(listed),
            )
    return stages


def load_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


# ---- what the code reads


def _module_file(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def _project_imports(module: str) -> set[str]:
    """Project modules ``module`` imports anywhere in its text (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(_module_file(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PACKAGES:  # `from pipeline import losses`
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif node.module.split(".")[0] in PACKAGES:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return {m for m in found if _module_file(m).is_file()}


def code_deps(section: str) -> set[str]:
    """The files of every project module a stage's command runs: its module and the entry point,
    with what they import. The entry point's imports of the other stages are left out: they only
    register other commands and validate other sections, and cannot change this stage's output."""
    others = {CONFIGS[s].__module__ for s in CONFIGS} - {CONFIGS[section].__module__}
    seen: set[str] = set()
    todo = [CONFIGS[section].__module__, ENTRY]
    while todo:
        module = todo.pop()
        if module not in seen and module not in others:
            seen.add(module)
            todo += _project_imports(module)
    return {str(_module_file(m).relative_to(ROOT)) for m in seen}


def foreach_params() -> set[str]:
    """Params a `foreach: ${...}` or a `matrix:` axis names: they choose which stages exist, not what one
    computes."""
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    selectors = [d["foreach"] for d in raw.values() if isinstance(d.get("foreach"), str)]
    selectors += [v for d in raw.values() for v in d.get("matrix", {}).values() if isinstance(v, str)]
    return {m.group(1) for v in selectors for m in [re.fullmatch(r"\$\{\s*([\w.-]+)\s*\}", v)] if m}


def project_roots(params: dict[str, Any]) -> set[str]:
    """First parts of the Path-typed values in params: the folders the pipeline reads and writes
    (data/, metrics/, ...). A str value under one of them is a path too (distill.student), a str
    value elsewhere is a Hub id or a spec (``embedded:...``)."""
    configs = validate_params(params, "params.yaml")
    return {Path(v).parts[0] for c in configs.values() for _, v in _values(c, "") if isinstance(v, Path)}


def _values(obj: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(dotted field name, value) of every leaf of a config."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _values(getattr(obj, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _values(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _values(v, f"{where}[{i}]")
    else:
        yield where, obj


def path_params(section: str, cfg: Any, roots: set[str]) -> dict[str, str]:
    """Dotted param name -> the path it names, for every path a stage's config names."""
    found: dict[str, str] = {}
    for name, value in _values(cfg, section):
        if isinstance(value, Path) or (isinstance(value, str) and value and Path(value).parts[0] in roots):
            found[name] = _norm(value)
    if isinstance(cfg, prepare.PrepareConfig):  # '{shared}' paths, resolved by prepare's own code
        for split, specs in (("train", cfg.train), ("eval", cfg.eval)):
            for i, spec in enumerate(specs):
                if spec.format not in ("embedded", "hub"):
                    found[f"prepare.{split}[{i}].path"] = _norm(prepare.source_path(spec, cfg))
    return found


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def untracked_paths(stages: dict[str, Wiring], params: dict[str, Any]) -> list[str]:
    """'stage: param = path' for every path a stage's config names that is neither a dep nor an out.

    A path is tracked when it is a dep or an out or lies inside one, or when it is a root whose
    entries the stage's `foreach` entries track (``distill.out_root``, ``evaluate.students_dir``:
    each entry reads or writes its own folder under it)."""
    configs = validate_params(params, "params.yaml")
    roots = project_roots(params)
    missing: list[str] = []
    for stage in stages.values():
        group = [p for s in stages.values() if s.section == stage.section for p in (*s.deps, *s.outs)]
        for name, path in path_params(stage.section, configs[stage.section], roots).items():
            if name in UNTRACKED:
                continue
            tracked = any(_inside(path, p) for p in (*stage.deps, *stage.outs)) or any(_inside(p, path) for p in group)
            if not tracked:
                missing.append(f"{stage.name}: {name} = {path}")
    return missing


def moved(params: dict[str, Any], roots: set[str], prefix: str = "moved") -> dict[str, Any]:
    """params with every path under the project folders, and the shared data folder, moved under ``prefix``."""
    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and value and Path(value).parts[0] in roots:
            return f"{prefix}/{value}"
        return value

    out = move(params)
    out["prepare"]["shared_dir"] = f"{prefix}/shared"
    return out


def paper_params(tmp: Path) -> dict[str, Any]:
    """params.yaml after `mind params configs/paper.yaml`, run on a copy."""
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", tmp / "params.yaml")
    result = CliRunner().invoke(app, ["params", str(ROOT / "configs" / "paper.yaml"), "--params",
                                      str(tmp / "params.yaml")])
    assert result.exit_code == 0, result.output
    return yaml.safe_load((tmp / "params.yaml").read_text())


# ---- the tests


@pytest.fixture(scope="module", autouse=True)
def dvc_state_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """DVC's state databases in a scratch folder, not one more folder per scratch repo in /var/tmp/dvc."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site-cache")))
        yield


@pytest.fixture(scope="module")
def default_stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Wiring]:
    return resolve(load_params(), tmp_path_factory.mktemp("default"))


def test_every_stage_depends_on_exactly_the_project_modules_it_runs(default_stages: dict[str, Wiring]) -> None:
    wrong: dict[str, dict[str, list[str]]] = {}
    for stage in default_stages.values():
        listed = {d for d in stage.deps if d.split(os.sep)[0] in PACKAGES and d.endswith(".py")}
        expected = code_deps(stage.section)
        if listed != expected:
            wrong[stage.name] = {"missing": sorted(expected - listed), "not imported": sorted(listed - expected)}
    assert not wrong, "\n".join(f"{name}: {problem}" for name, problem in wrong.items())


def test_every_stage_lists_exactly_the_params_its_config_reads(default_stages: dict[str, Wiring]) -> None:
    """Every field of the stage's config, less those its command line sets (`--method ${item}`)
    and those a `foreach` reads (they choose which stages exist, not what one computes)."""
    selectors = foreach_params()
    wrong: dict[str, dict[str, list[str]]] = {}
    for stage in default_stages.values():
        fields = {f"{stage.section}.{f.name}" for f in dataclasses.fields(CONFIGS[stage.section])}
        expected = {p for p in fields if p.split(".")[1] not in stage.options} - selectors
        listed = {".".join(p.split(".")[:2]) for p in stage.params}  # a nested key counts for its field
        if listed != expected:
            wrong[stage.name] = {"missing": sorted(expected - listed), "not a field": sorted(listed - expected)}
    assert not wrong, "\n".join(f"{name}: {problem}" for name, problem in wrong.items())


def test_every_path_a_stage_names_is_a_dep_or_an_out(default_stages: dict[str, Wiring]) -> None:
    untracked = untracked_paths(default_stages, load_params())
    assert not untracked, "\n".join(untracked)


def test_the_wiring_follows_moved_paths(tmp_path: Path) -> None:
    """Every path param moved elsewhere: a path written into dvc.yaml, not templated, stays behind."""
    params = moved(load_params(), project_roots(load_params()))
    stages = resolve(params, tmp_path)
    untracked = untracked_paths(stages, params)
    assert not untracked, "\n".join(untracked)
    roots = project_roots(load_params())
    stale = [f"{s.name}: {p}" for s in stages.values() for p in (*s.deps, *s.outs) if Path(p).parts[0] in roots]
    assert not stale, "written into dvc.yaml, not templated:\n" + "\n".join(stale)


def test_the_paper_override_wires_its_own_models(tmp_path: Path) -> None:
    """After `mind params configs/paper.yaml`, the stages that load a model depend on the one
    the override names, and on no model it replaced."""
    params = paper_params(tmp_path / "params")
    stages = resolve(params, tmp_path / "dvc")
    untracked = untracked_paths(stages, params)
    assert not untracked, "\n".join(untracked)
    student = _norm(params["distill"]["student"])
    default_student = _norm(load_params()["distill"]["student"])
    assert student != default_student  # the override changes the student: what this test is about
    distills = [s for s in stages.values() if s.section == "distill"]
    assert len(distills) == len(params["distill"]["methods"]) * len(params["distill"]["seeds"])
    for stage in distills:
        assert {student, _norm(params["distill"]["encoder"])} <= set(stage.deps), stage.name
        assert default_student not in stage.deps, stage.name
    evaluates = [s for s in stages.values() if s.section == "evaluate"]
    for stage in evaluates:
        assert _norm(params["evaluate"]["base_model"]) in stage.deps, stage.name
        assert default_student not in stage.deps, stage.name
    assert {_norm(p) for p in params["analyze"]["students"].values()} <= set(stages["analyze"].deps)
    assert default_student not in stages["analyze"].deps
    assert _norm(params["filter"]["tokenizer"]) in stages["filter"].deps


@pytest.mark.parametrize("config", ["params.yaml", "configs/paper.yaml"])
def test_every_stage_names_the_same_student(config: str, tmp_path: Path) -> None:
    """filter counts tokens in the student's tokenizer, evaluate's base model and analyze's base
    are the untrained student: all of them name the model distill trains."""
    params = load_params() if config == "params.yaml" else paper_params(tmp_path)
    student = params["distill"]["student"]
    assert params["filter"]["tokenizer"] == student
    assert params["evaluate"]["base_model"] == student
    assert params["analyze"]["students"]["base"] == student


def test_the_path_check_reports_a_model_folder_that_is_no_dep(default_stages: dict[str, Wiring]) -> None:
    student = _norm(load_params()["distill"]["student"])
    broken = {n: dataclasses.replace(s, deps=tuple(d for d in s.deps if d != student)) for n, s in default_stages.items()}
    assert f"distill@mind-0: distill.student = {student}" in untracked_paths(broken, load_params())


# ---- dvc status after a change, on a project whose data are placeholders

FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".md", ".png"}  # every other data path is a folder


def _placeholder(path: Path, file: bool) -> None:
    if path.exists():
        return
    if file:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder\n")
    else:
        path.mkdir(parents=True)
        (path / "placeholder").write_text("placeholder\n")


@pytest.fixture(scope="module")
def committed_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code, dvc.yaml and params.yaml, every data path a placeholder, all committed to dvc.lock:
    `dvc status` is clean until something changes. No stage runs."""
    from dvc.repo import Repo

    tmp = tmp_path_factory.mktemp("committed")
    repo = tmp / "repo"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = load_params()
    params["prepare"]["shared_dir"] = str(tmp / "shared")
    stages = resolve(params, repo)
    configs = validate_params(params, "params.yaml")
    # what `mind models` writes, and the benchmark files prepare reads
    models = configs["models"]
    for name in [*models.models, *models.encoders]:
        _placeholder(repo / models.out_dir / name, file=False)
    for name, path in path_params("prepare", configs["prepare"], project_roots(params)).items():
        if name.endswith("].path"):
            _placeholder(Path(path), file=True)
    data = {p for s in stages.values() for p in (*s.deps, *s.outs) if Path(p).parts[0] not in PACKAGES}
    for path in sorted(data, key=lambda p: -len(Path(p).parts)):  # a folder's contents before the folder
        _placeholder(repo / path, file=Path(path).suffix in FILE_SUFFIXES)
    with contextlib.chdir(repo), Repo(".") as dvc:  # DVC collects stages from the working directory
        dvc.commit(force=True)
    return repo


def _status_after(committed: Path, tmp: Path, change: Any) -> set[str]:
    """The stages `dvc status` lists after ``change(copy)`` on a copy of the committed project."""
    from dvc.repo import Repo

    repo = tmp / "repo"
    shutil.copytree(committed, repo, symlinks=True)
    change(repo)
    with contextlib.chdir(repo), Repo(".") as dvc:
        return set(dvc.status())


def test_the_placeholder_project_is_clean(committed_project: Path, tmp_path: Path) -> None:
    assert _status_after(committed_project, tmp_path, lambda repo: None) == set()



def test_changing_the_student_reruns_exactly_the_stages_that_read_it(committed_project: Path, tmp_path: Path) -> None:
    def new_student(repo: Path) -> None:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        other = next(f"data/models/{m}" for m in params["models"]["models"]
                     if f"data/models/{m}" != params["distill"]["student"])
        params["distill"]["student"] = params["evaluate"]["base_model"] = other
        params["filter"]["tokenizer"] = params["analyze"]["students"]["base"] = other
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    assert _status_after(committed_project, tmp_path, new_student) == {
        "filter", *(f"distill@{m}" for m in STUDENTS), "evaluate-base", *(f"evaluate@{m}" for m in STUDENTS), "analyze"}


def test_changing_a_benchmark_file_reruns_prepare_alone(committed_project: Path, tmp_path: Path) -> None:
    def edit_benchmark(repo: Path) -> None:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        path = Path(params["prepare"]["eval"][-1]["path"].replace("{shared}", params["prepare"]["shared_dir"]))
        path.write_text(path.read_text() + "one more line\n")

    assert _status_after(committed_project, tmp_path, edit_benchmark) == {"prepare"}


def test_the_paper_override_reruns_every_stage_whose_params_it_sets(committed_project: Path, tmp_path: Path) -> None:
    """configs/paper.yaml has no report section and changes no report input that exists yet."""
    def apply_paper(repo: Path) -> None:
        result = CliRunner().invoke(app, ["params", str(ROOT / "configs" / "paper.yaml"), "--params",
                                          str(repo / "params.yaml")])
        assert result.exit_code == 0, result.output

    # every stage but report: the paper's students that the default lacks have no lock entry yet
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())["distill"]
    runs = [f"{m}-{s}" for m in paper["methods"] for s in paper["seeds"]]
    assert _status_after(committed_project, tmp_path, apply_paper) == {
        "models", "prepare", "generate", "filter", *(f"distill@{r}" for r in runs), "evaluate-base",
        *(f"evaluate@{r}" for r in runs), "analyze"}
