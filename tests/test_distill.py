"""The distill stage: sequences and masking, every method on a tiny random student, fairness of
the baselines, checkpoints and resume, non-finite losses, a 2-process accelerate launch, and
one run on the real embedded student."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill_helpers import PERSPECTIVES, filtered_rows, make_filtered, make_tiny_model
from pipeline import losses as L
from pipeline.config import ConfigError, deep_merge, to_dict
from pipeline.fdic import TaConfig
from pipeline.shards import FILTERED_SCHEMA, write_shards
from pipeline.ta import TeachingAssistant
from stages import distill as D
from stages.app import validate_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "student", embedded_model_dir)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_filtered(tmp_path_factory.mktemp("data") / "filtered", n_questions=6)


def tiny_cfg(tmp: Path, filtered: Path, student: Path, encoder: Path, ta: dict[str, object] | None = None,
             **kw: object) -> D.DistillConfig:
    """A run on the tiny student; ``ta`` overrides TA settings over a 2-step warm-up and a TA step
    every 2 micro-batches."""
    base = dict(filtered_dir=filtered, student=str(student), encoder=str(encoder), out_root=tmp / "students",
                live_root=tmp / "live", embedding_cache=tmp / "cache", max_steps=6, questions_per_step=2,
                ta=TaConfig(**{"warmup_steps": 2, "accum_steps": 2, **(ta or {})}), lr=3e-3)  # type: ignore[arg-type]
    base.update(kw)
    return D.DistillConfig(**base)  # type: ignore[arg-type]


def history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


# ---------------------------------------------------------------- data


def test_sequences_mask_the_prompt_and_share_the_answer_suffix(filtered: Path, tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = D.DistillConfig(filtered_dir=filtered, student=str(tiny))
    units, path_rows, counts = D.load_units(cfg, tok)
    assert counts["questions"] == 6 and counts["paths"] == len(path_rows) == sum(2 + q % 3 for q in range(6))
    rows = {f"{r['question_id']}/{r['teacher']}/{r['perspective']}/{r['sample_index']}": r
            for r in filtered_rows(6)}
    for u in units:
        gold = rows[u.paths[0].key]["answer"]
        for p in u.paths:
            r = rows[p.key]
            prompt = tok.decode(p.input_ids[: p.prompt_len])
            # evaluate's user message (the question, the CoT line, the answer instruction) through the chat
            # template: no perspective, generation prompt last.
            user = D.student_message(r["question"], r["answer_type"])
            assert user.startswith(r["question"]) and "Let's think step by step." in user
            assert prompt == tok.apply_chat_template([{"role": "user", "content": user}],
                                                     add_generation_prompt=True, tokenize=False)
            assert r["perspective"] not in prompt
            assert tok.decode(p.input_ids[p.prompt_len:]) == r["text"] + "<|im_end|>\n"
            assert tok.decode(p.suffix_ids).strip() == f"The answer is {gold}."
        # Paths end in the same suffix tokens (a "\n" or " " before "The" may differ).
        shared = tok.decode(u.paths[0].suffix_ids[-u.jsd_len:])
        assert u.jsd_len >= 4 and f"The answer is {gold}.".endswith(shared.strip())

    batch = D.collate(units[:2], tok.pad_token_id, 8)
    assert batch.mask.sum() == len(units[0].paths) + len(units[1].paths)
    for q, u in enumerate(units[:2]):
        for k, p in enumerate(u.paths):
            i = int(batch.grid[q, k])
            n = len(p.input_ids)
            assert torch.all(batch.labels[i, : p.prompt_len] == L.IGNORE_INDEX)
            assert torch.equal(batch.labels[i, p.prompt_len: n], torch.tensor(p.input_ids[p.prompt_len:]))
            assert torch.all(batch.labels[i, n:] == L.IGNORE_INDEX) and torch.all(batch.attention_mask[i, n:] == 0)
            # The JSD positions hold the shared suffix tokens.
            assert batch.input_ids[i, batch.jsd_pos[q][k]].tolist() == p.suffix_ids[-u.jsd_len:]


def test_single_rule_keeps_one_path_per_question(filtered: Path, tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    first = D.load_units(D.DistillConfig(method="single", single_rule="first", filtered_dir=filtered), tok)[0]
    short = D.load_units(D.DistillConfig(method="single", single_rule="shortest", filtered_dir=filtered), tok)[0]
    rand = D.load_units(D.DistillConfig(method="single", filtered_dir=filtered, seed=1), tok)[0]
    again = D.load_units(D.DistillConfig(method="single", filtered_dir=filtered, seed=1), tok)[0]
    allp = D.load_units(D.DistillConfig(method="uniform", filtered_dir=filtered), tok)[0]
    for f, s, r, a, u in zip(first, short, rand, again, allp):
        assert len(f.paths) == len(s.paths) == len(r.paths) == 1
        assert f.paths[0].key == u.paths[0].key  # first in perspective order
        assert len(s.paths[0].input_ids) == min(len(p.input_ids) for p in u.paths)
        assert r.paths[0].key == a.paths[0].key  # seeded
    assert len({r.paths[0].key.split("/")[2] for r in rand}) > 1


def test_bad_answer_offset_names_file_row_and_field(tmp_path: Path, tiny: Path) -> None:
    from transformers import AutoTokenizer

    rows = filtered_rows(2)
    rows[3]["answer_offset"] = len(rows[3]["text"]) + 5
    write_shards(tmp_path / "f", rows, FILTERED_SCHEMA, {})
    with pytest.raises(ConfigError, match=r"row 3 \(question_id q001.*answer_offset"):
        D.load_units(D.DistillConfig(filtered_dir=tmp_path / "f"), AutoTokenizer.from_pretrained(tiny))


def test_paths_over_max_paths_are_a_seeded_draw_that_spares_every_perspective(tmp_path: Path, tiny: Path) -> None:
    """300 questions with 6 paths each, K <= 4: every perspective keeps about 4/6 of its paths (a
    cut by name dropped the same two perspectives from every question), the draw is the same for
    every method, and the dropped paths are counted per perspective."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    f = make_filtered(tmp_path / "f", n_questions=300, ks=[6])
    units, _, counts = D.load_units(D.DistillConfig(filtered_dir=f, max_paths=4, method="uniform"), tok)
    again = D.load_units(D.DistillConfig(filtered_dir=f, max_paths=4, method="mind"), tok)[0]
    assert [[p.key for p in u.paths] for u in units] == [[p.key for p in u.paths] for u in again]
    assert all(len(u.paths) == 4 for u in units)
    kept = {name: sum(p.perspective == name for u in units for p in u.paths) for name in PERSPECTIVES}
    # Binomial(300, 2/3) per perspective: sd 8.2 paths; 4 sd either side.
    assert all(abs(k - 200) <= 33 for k in kept.values()), kept
    assert counts["paths_over_max_paths"] == 600
    assert {name: counts[f"paths_over_max_paths/{name}"] for name in PERSPECTIVES} == \
        {name: 300 - kept[name] for name in PERSPECTIVES}


def test_too_long_paths_are_dropped_and_counted(filtered: Path, tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    units, _, counts = D.load_units(D.DistillConfig(filtered_dir=filtered, max_seq_len=70), tok)
    assert counts["paths_too_long"] > 0
    assert counts["paths"] + counts["paths_too_long"] == counts["rows_read"]
    assert all(len(p.input_ids) <= 70 for u in units for p in u.paths)


def test_inject_gives_a_seeded_share_one_foreign_path_ending_in_its_own_answer(tmp_path: Path, tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    f = make_filtered(tmp_path / "f", n_questions=20, ks=[3, 4])
    rows = {(r["question_id"], r["perspective"]): r for r in filtered_rows(20, [3, 4])}
    clean, clean_rows, _ = D.load_units(D.DistillConfig(filtered_dir=f, max_paths=4, method="uniform"), tok)
    units, path_rows, counts = D.load_units(D.DistillConfig(filtered_dir=f, max_paths=4, method="uniform", inject=0.5),
                                            tok)
    hit = [u for u in units if any(p.injected for p in u.paths)]
    assert len(hit) == counts["paths_injected"] == 10
    assert all(sum(p.injected for p in u.paths) == 1 for u in hit)
    by_key = {r["key"]: r for r in path_rows}
    for u, c in zip(units, clean):
        assert [p.key for p in u.paths] == [p.key for p in c.paths]  # same slots, one of them replaced
        for p in u.paths:
            text = by_key[p.key]["text"]
            own = rows[(u.question_id, p.perspective)]
            if p.injected:
                # another question's reasoning, then this question's own answer suffix
                assert text.endswith(own["text"][own["answer_offset"]:]) and text != own["text"]
                assert not text.startswith(own["text"][: own["answer_offset"]])
            else:
                assert text == own["text"]
    # the same questions and rationales for every method and seed
    again = D.load_units(D.DistillConfig(filtered_dir=f, max_paths=4, method="mind", inject=0.5, seed=3), tok)[1]
    assert sorted(r["text"] for r in again) == sorted(r["text"] for r in path_rows)
    assert D.DistillConfig(method="mind", inject=0.5, seed=2).name == "mind-inj-s2"
    assert D.DistillConfig(method="mind-length", seed=1).name == "mind-length-s1"


def test_too_few_questions_is_an_error_that_states_the_numbers(tmp_path: Path, tiny: Path, encoder_dir: Path,
                                                                  one_thread: object) -> None:
    f = make_filtered(tmp_path / "f", n_questions=3)
    cfg = tiny_cfg(tmp_path, f, tiny, encoder_dir, max_steps=10, max_epochs=2)
    with pytest.raises(ConfigError, match=r"3 usable questions.*10 steps x 1 accumulation x 2 questions/step x 1 "
                                          r"processes = 20 question visits = 6.7 epochs > max_epochs 2"):
        D.run(cfg)
    with pytest.raises(ConfigError, match="3 usable questions.*one step needs 4 questions/step x 1 processes = 4"):
        D.run(tiny_cfg(tmp_path, f, tiny, encoder_dir, questions_per_step=4))


@pytest.mark.parametrize("n,size", [(5, 2), (7, 3), (6, 4), (6, 3)])
def test_question_stream_never_repeats_a_question_in_a_micro_batch(n: int, size: int) -> None:
    """Each epoch is a permutation of the questions, and a micro-batch that straddles an epoch
    boundary still holds distinct questions (a plain per-epoch shuffle repeats some)."""
    for seed in range(6):
        stream = [q for m in range(6 * n) for q in D.question_stream(n, seed, m, size)]
        for m in range(6 * n):
            batch = stream[m * size: (m + 1) * size]
            assert len(set(batch)) == size, (seed, m, batch)
        for e in range(len(stream) // n):
            assert sorted(stream[e * n: (e + 1) * n]) == list(range(n)), (seed, e)
        if n % size == 0:  # aligned: exactly the seeded shuffle of each epoch
            g = torch.Generator().manual_seed(seed * 1_000_003 + 1)
            assert stream[n: 2 * n] == torch.randperm(n, generator=g).tolist()


def test_ablations_are_mind_with_one_parameter_forced(tmp_path: Path, filtered: Path, tiny: Path, encoder_dir: Path,
                                                      one_thread: object) -> None:
    base = tiny_cfg(tmp_path, filtered, tiny, encoder_dir)
    for name, forced in D.ABLATIONS.items():
        cfg = D.resolve_ablation(D.DistillConfig(**{**base.__dict__, "method": name}))
        assert cfg.method == "mind" and cfg.name == f"{name}-s0"
        # the base config with the forced keys (nested ones too) and nothing else changed
        assert to_dict(cfg) == deep_merge(to_dict(base), {**forced, "method": "mind", "run_name": f"{name}-s0"})
    assert D.resolve_ablation(D.DistillConfig(method="mind-ema0", run_name="x")).name == "x"
    with pytest.raises(ConfigError, match="each once"):
        D.DistillConfig(methods=["mind-ema0", "mind-ema0"])
    with pytest.raises(ConfigError, match=r"^p.yaml: distill.inject_methods \['mind'\] needs distill.inject > 0"):
        validate_params({"distill": {"inject_methods": ["mind"]}}, "p.yaml")
    # a clean entry of a study with an injected arm: dvc.yaml passes --inject 0 to the run itself
    assert D.DistillConfig(inject_methods=["mind"], inject=0.0).name == "mind-s0"
    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="mind-ema0", max_steps=2))
    out = tmp_path / "students" / "mind-ema0-s0"
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "mind" and config["run_name"] == "mind-ema0-s0" and config["ta"]["mu"] == 0.0
    assert (out / "ta.pt").exists() and (out / "merged").is_dir()


def test_length_baseline_weights_shorter_paths_higher(tmp_path: Path, filtered: Path, tiny: Path, encoder_dir: Path,
                                                      one_thread: object) -> None:
    """mind-length: mind's selection and weights with s = -ln tokens and no TA. Within a question
    α falls with the path's length, and the run reports the same weighting figures as mind."""
    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="mind-length", max_steps=3, beta=0.0))
    out = tmp_path / "students" / "mind-length-s0"
    m = json.loads((out / "metrics.json").read_text())
    assert not (out / "ta.pt").exists() and "ta_fit" in m and m["ta_fit"] is None
    assert m["alpha_length_corr"] < -0.5
    assert m["alpha_entropy_share"] < 1.0 and m["selected_share"] == 1.0  # beta 0 keeps every path


def test_a_mind_run_on_injected_data_reports_the_weight_of_the_foreign_paths(
        tmp_path: Path, filtered: Path, tiny: Path, encoder_dir: Path, one_thread: object) -> None:
    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="mind", inject=0.5, max_steps=3))
    m = json.loads((tmp_path / "students" / "mind-inj-s0" / "metrics.json").read_text())
    assert m["data_counts"]["paths_injected"] == 3 and len(m["injected_alpha_by_question"]) == 3
    assert all(0.0 <= v <= 4.0 for v in m["injected_alpha_by_question"].values())
    assert 0.0 <= m["injected_alpha_share"] <= 4.0 and 0.0 <= m["injected_deselected_share"] <= 1.0


def test_length_scores_and_weighting_figures_on_literal_tensors() -> None:
    mask = torch.tensor([[True, True, False], [True, True, True]])
    s = L.length_scores(torch.tensor([[10, 40, 0], [20, 20, 20]]), mask)
    assert s[0, 0] - s[0, 1] == pytest.approx(math.log(4.0)) and s[0, 2] == 0
    alpha = L.path_weights(s, mask, 0.5)
    assert alpha[0].tolist() == pytest.approx([16 / 17, 1 / 17, 0.0])  # tokens^-2
    share = L.entropy_share(alpha, mask)
    assert share[1] == pytest.approx(1.0) and 0 < share[0] < 1
    assert torch.isnan(L.entropy_share(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])))[0]
    x = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 0.0]])
    m = torch.tensor([[True, True, True], [True, True, False]])
    assert L.within_question_slope(x, 2 * x + torch.tensor([[9.0], [-4.0]]), m) == pytest.approx(2.0)
    assert L.within_question_corr(x, -x, m) == pytest.approx(-1.0)
    assert math.isnan(L.within_question_slope(torch.ones(1, 2), x[:1, :2], m[:1, :2]))


# ---------------------------------------------------------------- training on a tiny student


@pytest.mark.parametrize("method", ["single", "uniform", "mcc", "mind"])
def test_each_method_lowers_the_loss_and_writes_its_outputs(method: str, tmp_path: Path, filtered: Path, tiny: Path,
                                                            encoder_dir: Path, one_thread: object) -> None:
    from transformers import AutoModelForCausalLM

    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method=method))
    out = tmp_path / "students" / f"{method}-s0"
    m = json.loads((out / "metrics.json").read_text())
    h = m["history"]
    assert m["steps"] == len(h) == 6 and m["method"] == method
    assert (h[-1]["loss"] + h[-2]["loss"]) < (h[0]["loss"] + h[1]["loss"]) - 0.05
    # LoRA B starts at zero: non-zero B means the trainable parameters moved.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert b and all(float(v.abs().max()) > 0 for v in b)
    assert (out / "ta.pt").exists() == (method == "mind")
    assert json.loads((out / "config.json").read_text())["method"] == method
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert model.config.model_type == "llama" and (out / "merged" / "chat_template.jinja").exists()
    curves = tmp_path / "live" / f"{method}-s0" / "plots" / "metrics" / "train"
    assert (curves / "loss.tsv").exists() and (curves / "ce.tsv").exists()
    assert len((curves / "loss.tsv").read_text().splitlines()) == 7  # header + 6 steps
    if method == "single":
        assert all(r["mean_selected"] == 1.0 and r["alpha_entropy"] == 0.0 for r in h)
        assert "jsd" not in h[0]
    else:
        assert all(r["jsd"] >= 0 for r in h) and (curves / "jsd.tsv").exists()
    if method == "mind":
        for name in ("meta_loss", "spearman", "mean_selected", "alpha_entropy", "alpha_entropy_share",
                     "oracle_alpha_entropy_share", "ta_fit", "ta_score_slope", "selected_share"):
            assert (curves / f"{name}.tsv").exists()
        for name in ("alpha_entropy_share", "oracle_alpha_entropy_share", "ta_fit", "ta_score_slope", "selected_share",
                     "alpha_length_corr"):
            assert isinstance(m[name], float), name
        assert 0 < m["alpha_entropy_share"] <= 1 and 0 < m["selected_share"] <= 1
        assert set(m["alpha_share"]) == set(PERSPECTIVES[:4]) and (curves / "alpha_share" / "Analogy.tsv").exists()
        assert (out / "alpha_share.png").stat().st_size > 0
        assert len(m["ta_warmup"]) == 2
        ta = torch.load(out / "ta.pt", weights_only=False)
        net = TeachingAssistant(**ta["config"])
        net.load_state_dict(ta["state_dict"])
        # 6 questions, 2 per micro-batch: the warm-up and 6 steps visit every path; the last visits
        # happen at student step 5 (0-based), and L̄ holds a loss for every path.
        assert torch.isfinite(ta["ema"]).all() and bool((ta["ema"] > 0).all())
        assert bool((ta["seen_at"] >= 0).all()) and int(ta["seen_at"].max()) == 5


def test_mind_differs_from_uniform_only_through_alpha(tmp_path: Path, filtered: Path, tiny: Path,
                                                      encoder_dir: Path, one_thread: object) -> None:
    """β = 0, λ = 0: mind selects every path like uniform. With a huge τ_student its α is uniform
    too, and the student's training must then be identical to uniform's, with LoRA dropout and TA
    dropout on: the TA draws from its own generators, so the student's dropout masks are the same
    as uniform's. A sharp τ_student changes only α, and the losses then differ."""
    common = dict(beta=0.0, consistency_weight=0.0, lora_dropout=0.2, ta={"dropout": 0.2})
    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="uniform", **common))
    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="mind", tau_student=1e9, run_name="flat", **common))
    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="mind", tau_student=0.001, run_name="sharp",
                   **common))
    u, flat, sharp = (history(tmp_path / "students" / n) for n in ("uniform-s0", "flat", "sharp"))
    assert [r["loss"] for r in flat] == pytest.approx([r["loss"] for r in u], rel=1e-6)
    assert [r["ce_mean"] for r in flat] == pytest.approx([r["ce_mean"] for r in u], rel=1e-6)
    trained = [load_file(tmp_path / "students" / n / "adapter" / "adapter_model.safetensors") for n in ("uniform-s0", "flat")]
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.allclose(trained[0][k].float(), trained[1][k].float(), atol=1e-6) for k in trained[0])
    assert all(r["mean_selected"] == pytest.approx(q["mean_selected"]) for r, q in zip(flat, u))
    assert all(r["alpha_entropy"] < q["alpha_entropy"] - 0.1 for r, q in zip(sharp, u))
    assert [r["loss"] for r in sharp] != pytest.approx([r["loss"] for r in u], rel=1e-6)


def test_fdic_phases_in_a_run(tmp_path: Path, filtered: Path, tiny: Path, encoder_dir: Path,
                              monkeypatch: pytest.MonkeyPatch, one_thread: object) -> None:
    """The order of events in a mind run: ta.warmup_steps TA steps at ta.lr while the student is
    frozen (no update, no gradient left behind), then a TA step at ta.joint_lr after every
    ta.accum_steps student micro-batches, at the clock of the student step."""
    from pipeline.fdic import Fdic

    events: list[tuple[str, float]] = []
    snapshot: dict[str, torch.Tensor] = {}
    real_fit, real_micro, real_load = Fdic.fit, D.micro_losses, D.load_student

    def load_student(cfg: D.DistillConfig) -> tuple[object, object]:
        model, tok = real_load(cfg)
        snapshot.update({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
        return model, tok

    def fit(self: Fdic, lr: float, average: object) -> float | None:
        events.append(("ta", lr))
        return real_fit(self, lr, average)  # type: ignore[arg-type]

    def micro_losses(cfg: D.DistillConfig, model: object, batch: D.Batch, device: torch.device, fdic: Fdic | None,
                     accelerator: object, clock: int) -> tuple:
        if not any(e[0] == "student" for e in events):  # the first joint micro-batch: warm-up is over
            params = dict(accelerator.unwrap_model(model).named_parameters())  # type: ignore[attr-defined]
            for k, v in snapshot.items():
                assert torch.equal(params[k].detach(), v), f"the warm-up changed {k}"
                assert params[k].grad is None, f"the warm-up left a gradient on {k}"
        events.append(("student", float(clock)))
        return real_micro(cfg, model, batch, device, fdic, accelerator, clock)

    monkeypatch.setattr(D, "load_student", load_student)
    monkeypatch.setattr(Fdic, "fit", fit)
    monkeypatch.setattr(D, "micro_losses", micro_losses)
    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="mind", max_steps=5, grad_accum=2,
                   ta={"warmup_steps": 3, "accum_steps": 3, "lr": 1e-3, "joint_lr": 2e-5}))
    s = [("student", float(t)) for t in range(5) for _ in range(2)]  # 5 steps x 2 micro-batches
    joint = s[:3] + [("ta", 2e-5)] + s[3:6] + [("ta", 2e-5)] + s[6:9] + [("ta", 2e-5)] + s[9:]
    assert events == [("ta", 1e-3)] * 3 + joint


def test_full_fine_tuning_writes_a_merged_model_only(tmp_path: Path, filtered: Path, tiny: Path, encoder_dir: Path,
                                                     one_thread: object) -> None:
    from transformers import AutoModelForCausalLM

    D.run(tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="uniform", finetune="full", max_steps=3, lr=1e-3))
    out = tmp_path / "students" / "uniform-s0"
    assert not (out / "adapter").exists() and (out / "metrics.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert tuned.dtype == torch.bfloat16
    w0 = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(tuned.model.layers[0].self_attn.q_proj.weight.float(), w0, atol=1e-3)


# ---------------------------------------------------------------- robustness


def _params_file(path: Path, cfg: D.DistillConfig) -> Path:
    from pipeline.config import to_dict

    path.write_text(yaml.safe_dump({"distill": to_dict(cfg)}))
    return path


def test_resume_after_kill_continues_from_the_last_checkpoint(tmp_path: Path, filtered: Path, tiny: Path,
                                                              encoder_dir: Path, one_thread: object) -> None:
    cfg = tiny_cfg(tmp_path / "killed", filtered, tiny, encoder_dir, method="mind", max_steps=20, max_epochs=20.0,
                   questions_per_step=1, checkpoint_every=3, ta={"accum_steps": 4})
    params = _params_file(tmp_path / "params.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.app", "distill", "--params", str(params)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "killed" / "students" / "mind-s0" / "checkpoints"
    deadline = time.time() + 240
    while not D.checkpoint_dirs(ckpts) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    assert D.checkpoint_dirs(ckpts), f"no checkpoint before the kill: {err[-2000:]}"
    assert not (tmp_path / "killed" / "students" / "mind-s0" / "metrics.json").exists()

    result = D.run(cfg)  # same config: resumes
    start = result["resumed_from_step"]
    assert start is not None and 3 <= start < 20 and start % 3 == 0 and result["steps"] == 20
    resumed = history(tmp_path / "killed" / "students" / "mind-s0")
    assert not ckpts.exists()  # removed after a successful run

    D.run(tiny_cfg(tmp_path / "straight", filtered, tiny, encoder_dir, method="mind", max_steps=20, max_epochs=20.0,
                   questions_per_step=1, ta={"accum_steps": 4}))
    straight = history(tmp_path / "straight" / "students" / "mind-s0")
    # Same data order, RNG, TA and L̄ state after the resume: the same losses as an uninterrupted run.
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight[start:]], rel=1e-4)
    assert [r["meta_loss"] for r in resumed] == pytest.approx([r["meta_loss"] for r in straight[start:]], rel=1e-3)


class _Crash(RuntimeError):
    """Stands for a kill right after a checkpoint was written."""


def _crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    real = D.save_checkpoint

    def save_then_crash(accelerator: object, ckpt_root: Path, step: int, *args: object) -> Path:
        path = real(accelerator, ckpt_root, step, *args)  # type: ignore[arg-type]
        if step == at_step:
            raise _Crash(f"killed after {path}")
        return path

    monkeypatch.setattr(D, "save_checkpoint", save_then_crash)


def test_resume_with_a_checkpoint_inside_a_ta_window_matches_a_straight_run(
        tmp_path: Path, filtered: Path, tiny: Path, encoder_dir: Path, monkeypatch: pytest.MonkeyPatch,
        one_thread: object) -> None:
    """checkpoint_every 3, ta.accum_steps 4: the checkpoint at step 3 falls inside the TA's
    window of 4 micro-batches. The resumed run must step the TA at micro-batch 4 on the same
    inertia table, as the uninterrupted run does. A large ta.joint_lr and LoRA dropout make any
    difference in the TA's steps or the RNG show."""
    kw = dict(method="mind", max_steps=9, max_epochs=20.0, questions_per_step=1, checkpoint_every=3,
              ta={"accum_steps": 4, "joint_lr": 0.05}, lora_dropout=0.1, tau_student=0.2)
    D.run(tiny_cfg(tmp_path / "straight", filtered, tiny, encoder_dir, **kw))
    straight = history(tmp_path / "straight" / "students" / "mind-s0")
    cfg = tiny_cfg(tmp_path / "resumed", filtered, tiny, encoder_dir, **kw)
    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, 3)
        with pytest.raises(_Crash):
            D.run(cfg)
    result = D.run(cfg)
    assert result["resumed_from_step"] == 3
    resumed = history(tmp_path / "resumed" / "students" / "mind-s0")
    assert len(resumed) == 6
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight[3:]], rel=1e-4, abs=1e-4)
    assert [r["meta_loss"] for r in resumed] == pytest.approx([r["meta_loss"] for r in straight[3:]], rel=1e-4,
                                                              abs=1e-4)


def test_a_checkpoint_that_fails_verification_falls_back_to_the_previous_one(
        tmp_path: Path, filtered: Path, tiny: Path, encoder_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, one_thread: object) -> None:
    """Every checkpoint records its files' sha256. A flipped byte in the newest makes the resume
    discard it with a log line and continue from the one before; with both corrupted the run
    starts from scratch. Either way the losses are an uninterrupted run's."""
    import logging

    kw = dict(method="mind", max_steps=6, checkpoint_every=2, ta={"accum_steps": 3}, lora_dropout=0.1)
    D.run(tiny_cfg(tmp_path / "straight", filtered, tiny, encoder_dir, **kw))
    straight = [r["loss"] for r in history(tmp_path / "straight" / "students" / "mind-s0")]
    cfg = tiny_cfg(tmp_path / "run", filtered, tiny, encoder_dir, **kw)
    ckpts = tmp_path / "run" / "students" / "mind-s0" / "checkpoints"

    def crash_and_corrupt(which: list[str]) -> None:
        with monkeypatch.context() as m:
            _crash_after_checkpoint(m, 4)
            with pytest.raises(_Crash):
                D.run(cfg)
        assert [c.name for c in D.checkpoint_dirs(ckpts)] == ["step-000002", "step-000004"]
        for name in which:
            assert D.verify_checkpoint(ckpts / name) is None
            target = ckpts / name / "model.safetensors"
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
            assert "model.safetensors does not match its sha256" in D.verify_checkpoint(ckpts / name)

    crash_and_corrupt(["step-000004"])
    with caplog.at_level(logging.INFO, logger="mind.distill"):
        result = D.run(cfg)
    assert result["resumed_from_step"] == 2
    assert "step-000004 fails verification (model.safetensors does not match its sha256); discarded" in caplog.text
    assert [r["loss"] for r in history(tmp_path / "run" / "students" / "mind-s0")] == \
        pytest.approx(straight[2:], rel=1e-4, abs=1e-4)

    crash_and_corrupt(["step-000002", "step-000004"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mind.distill"):
        result = D.run(cfg)
    assert result["resumed_from_step"] is None
    assert caplog.text.count("fails verification") == 2 and "no checkpoint verifies; starting from scratch" in caplog.text
    assert [r["loss"] for r in history(tmp_path / "run" / "students" / "mind-s0")] == \
        pytest.approx(straight, rel=1e-4, abs=1e-4)


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path: Path, filtered: Path, tiny: Path,
                                                               encoder_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                               one_thread: object) -> None:
    real = L.path_token_ce
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        ce = real(logits, labels)
        return ce * float("nan") if calls["n"] == 4 else ce  # the 4th micro-batch: step index 3

    monkeypatch.setattr(D.L, "path_token_ce", poisoned)
    cfg = tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="uniform", checkpoint_every=2)
    with pytest.raises(D.NonFiniteLoss, match=r"non-finite loss = nan at step 3.*step-000002"):
        D.run(cfg)
    out = tmp_path / "students" / "uniform-s0"
    assert not (out / "metrics.json").exists()
    (ckpt,) = D.checkpoint_dirs(out / "checkpoints")
    assert ckpt.name == "step-000002"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    weights = load_file(ckpt / "model.safetensors")
    assert weights and all("lora_" in k for k in weights)  # adapter only, not the base model
    monkeypatch.setattr(D.L, "path_token_ce", real)
    assert D.run(cfg)["resumed_from_step"] == 2


# ---------------------------------------------------------------- multi-process and real model


def test_two_process_accelerate_launch_on_cpu(tmp_path: Path, filtered: Path, tiny: Path, encoder_dir: Path) -> None:
    """DDP over gloo: `accelerate launch` with 2 CPU processes runs the unchanged stage."""
    cfg = tiny_cfg(tmp_path, filtered, tiny, encoder_dir, method="mind", max_steps=3, questions_per_step=1,
                   ta={"warmup_steps": 1})
    params = _params_file(tmp_path / "params.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"), "--main_process_port", str(29500 + os.getpid() % 1000),
           "-m", "stages.app", "distill", "--params", str(params), "--force-cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "students" / "mind-s0"
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and m["steps"] == 3
    # Each process holds one question of 2-4 paths, so their perspectives differ within a step: the
    # per-perspective figures are reduced over the union of both processes' keys.
    assert set(m["alpha_share"]) == set(PERSPECTIVES[:4])
    assert all(0 < v <= 4 for v in m["alpha_share"].values())
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "ta.pt").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert "2 process(es) on cpu" in proc.stderr and "(gloo)" in proc.stderr
    assert proc.stderr.count("TA warm-up 1/1") == 1  # logged by the main process only


@pytest.mark.slow
def test_real_embedded_student_trains_and_its_merged_model_generates(tmp_path: Path, embedded_model_dir: Path,
                                                                     encoder_dir: Path, one_thread: object) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f = make_filtered(tmp_path / "f", n_questions=2, ks=[2])
    cfg = D.DistillConfig(method="mind", filtered_dir=f, student=str(embedded_model_dir), encoder=str(encoder_dir),
                          out_root=tmp_path / "students", live_root=tmp_path / "live", embedding_cache=None,
                          max_steps=2, questions_per_step=1, ta=TaConfig(warmup_steps=1), max_seq_len=256)
    D.run(cfg)
    out = tmp_path / "students" / "mind-s0"
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in m["history"])
    tok = AutoTokenizer.from_pretrained(out / "merged")
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert model.dtype == torch.bfloat16
    prompt = tok.apply_chat_template([{"role": "user", "content": "Sam has 3 apples and buys 4 more. How many?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]
    assert tok.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    PeftModel.from_pretrained(base, out / "adapter")  # the adapter loads on the base model
