"""The evaluate stage's pieces: bootstrap intervals, relevant cells, the harness, summaries, method checks."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from covipal.config import ConfigError, EvaluateConfig
from covipal.evaluation.bootstrap import difference_interval, mean_interval
from covipal.evaluation.cells import kept_tokens, relevant_share, relevant_tokens
from covipal.evaluation.harness import Results, evaluate_methods
from covipal.evaluation.stage import build_methods
from covipal.evaluation.summary import leads, leads_report, metrics, report, retention, retention_report, table
from covipal.pruning import Pruner, n_keep
from covipal.training.data import ReferenceInputs

# --- bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_interval_of_a_known_proportion():
    x = np.r_[np.ones(300), np.zeros(700)]  # p = 0.3, n = 1000: normal approximation 0.3 +- 1.96 sqrt(.21 / 1000)
    ci = mean_interval(x, n_resamples=4000, confidence=0.95, seed=0)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 1000)
    assert ci.mean == 0.3
    assert abs(ci.low - (0.3 - half)) < 0.006 and abs(ci.high - (0.3 + half)) < 0.006
    narrow = mean_interval(x, n_resamples=4000, confidence=0.5, seed=0)
    assert ci.low < narrow.low < 0.3 < narrow.high < ci.high
    assert mean_interval(x, n_resamples=4000, seed=0) == ci  # seeded


def test_bootstrap_degenerate_cases():
    assert mean_interval(np.ones(20)) == (ci := mean_interval(np.ones(20))) and (ci.low, ci.high) == (1.0, 1.0)
    one = mean_interval([0.0])
    assert one.mean == 0.0 and one.low is None and one.high is None
    with pytest.raises(ValueError, match="non-empty 1-D"):
        mean_interval([])


def test_paired_difference_interval_is_narrower_than_the_unpaired_one():
    """Two methods right on the same hard rows: pairing removes the rows' shared variance."""
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.7
    b = a & (rng.random(1000) < 0.9)  # b loses about 10% of a's hits, nothing else
    d = difference_interval(a, b, n_resamples=2000, seed=0)
    assert d.mean == pytest.approx(a.mean() - b.mean())
    assert 0 < d.low < d.mean < d.high
    unpaired = 1.96 * math.sqrt(a.var() / 1000 + b.var() / 1000)  # the normal half-width ignoring the pairing
    assert d.high - d.low < unpaired  # (about 0.035 against 0.079)
    assert difference_interval(a, a) == (same := difference_interval(a, a)) and (same.low, same.high) == (0.0, 0.0)
    with pytest.raises(ValueError, match="one length"):
        difference_interval(a, b[:10])


# --- relevant cells -----------------------------------------------------------------------------


def test_relevant_cells_map_to_vision_tokens(reference):
    _, processor, _ = reference
    # image (8x8 cells): cell (1, 2) is token 1 * 8 + 2
    assert relevant_tokens([[0, 1, 2], [0, 7, 7]], 1, processor) == [10, 63]
    # 8-frame video, 4x4-cell frames packed 2x2 per 8x8 picture: frame 5 is picture 1, top-right quadrant,
    # so its cell (1, 2) is row 1, column 4 + 2 of picture 1: 64 + 1 * 8 + 6
    assert relevant_tokens([[5, 1, 2]], 8, processor) == [78]
    # frame 2 is picture 0, bottom-left quadrant: cell (3, 0) -> row 4 + 3, column 0
    assert relevant_tokens([[2, 3, 0], [2, 3, 0]], 8, processor) == [56]


def test_kept_positions_to_tokens_and_share():
    ids = torch.tensor([0, 0, 1, 3, 3, 3, 3, 9])  # left padding, <s>, four vision tokens (id 3), a word
    assert kept_tokens(torch.tensor([3, 5]), ids, vision_ids=3) == [0, 2]
    assert kept_tokens(torch.tensor([3, 5]), ids, vision_ids=[3, 9]) == [0, 2]  # several vision ids: 3, 3, 3, 3, 9
    assert kept_tokens(torch.tensor([], dtype=torch.long), ids, 3) == []
    with pytest.raises(ValueError, match="not vision tokens"):
        kept_tokens(torch.tensor([7]), ids, 3)
    assert relevant_share([0, 2], [2, 3]) == 0.5
    assert relevant_share([0, 2], [0, 2]) == 1.0
    assert relevant_share([0], []) is None  # e.g. "is there a 7": no


# --- harness ------------------------------------------------------------------------------------


@dataclass
class KeepFirst(Pruner):
    """Keeps each sample's first ceil(r n_v) vision tokens (not registered: a hand-checkable pruner)."""

    def score(self, ctx):
        return -torch.arange(ctx.vision_mask.shape[1], dtype=torch.float).expand(ctx.vision_mask.shape)


def test_harness_records_hits_budgets_and_relevant_cells(reference):
    model, processor, rows = reference
    inputs = ReferenceInputs(processor)
    out = evaluate_methods(model, inputs, rows, lambda m, r: KeepFirst(reserve_ratio=r), ["first"],
                           [1.0, 0.5], batch_size=4, progress=False)
    with torch.no_grad():
        prompt = inputs.prompt(rows)
        full = model(**prompt).logits[:, -1].argmax(-1) == inputs.answers(rows)
    assert out[("first", 1.0)].score.tolist() == full.float().tolist()
    half = out[("first", 0.5)]
    n_v = [64 if r["modality"] == "image" else 128 for r in rows]
    assert half.n_vision.tolist() == n_v and half.entering.tolist() == [n_keep(n, 0.5) for n in n_v]
    assert half.layer_average.tolist() == half.entering.tolist()
    for i, r in enumerate(rows):  # by hand: a relevant token survives when its index is in the first half
        rel = relevant_tokens(r["relevant"], len(r["images"]), processor)
        want = np.mean([t < n_v[i] // 2 for t in rel]) if rel else np.nan
        assert np.isclose(half.relevant_kept[i], want, equal_nan=True)
    with KeepFirst(reserve_ratio=0.5)(model), torch.no_grad():  # the batch a row is in does not matter here
        alone = model(**inputs.prompt(rows[:1])).logits[:, -1].argmax(-1) == inputs.answers(rows[:1])
    assert bool(half.score[0]) == bool(alone[0])


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "sparsevlm", "dart"])
def test_ratios_with_one_schedule_keep_the_same_tokens_and_are_run_once(reference, method):
    """Below the lowest budget an in-LLM method can reach, its schedule stops changing; the
    model's output is then the same, and the harness reuses the higher ratio's outcomes."""
    from covipal.pruning import get_method

    model, processor, rows = reference
    inputs = ReferenceInputs(processor)

    def build(m, r):
        return get_method(method, reserve_ratio=r, match_layer_average=True,
                          **({"layer": 1} if method in ("fastv", "dart") else {}))

    low, lower = 0.2, 0.1  # on the 2-layer test LLM both bottom out at the same schedule
    pruners = {r: build(method, r) for r in (low, lower)}
    assert pruners[low].schedule(64, 2) == pruners[lower].schedule(64, 2)
    with torch.no_grad():
        prompt = inputs.prompt(rows)
        logits = {}
        for r, pruner in pruners.items():
            with pruner(model):
                logits[r] = model(**prompt).logits[:, -1]
    torch.testing.assert_close(logits[low], logits[lower], rtol=0, atol=0)

    calls = []
    out = evaluate_methods(model, inputs, rows, lambda m, r: _Counted(build(m, r), calls), [method], [low, lower],
                           batch_size=8, progress=False)
    assert calls and lower not in calls  # every batch reused the r = 0.2 pass
    alone = evaluate_methods(model, inputs, rows, build, [method], [lower], batch_size=8, progress=False)
    for name in ("score", "entering", "layer_average", "n_vision", "prediction"):
        assert getattr(out[(method, lower)], name).tolist() == getattr(alone[(method, lower)], name).tolist()
    np.testing.assert_array_equal(out[(method, lower)].relevant_kept, alone[(method, lower)].relevant_kept)


class _Counted:
    """A pruner whose ``with pruner(model)`` is recorded in ``calls``."""

    def __init__(self, pruner, calls):
        self.pruner, self.calls = pruner, calls

    def __getattr__(self, name):
        return getattr(self.pruner, name)

    def __call__(self, model):
        self.calls.append(self.pruner.reserve_ratio)
        return self.pruner(model)


def test_budgets_are_equal_across_methods_at_equal_ratio(reference):
    """Matched on the layer average, pre-LLM and in-LLM methods cost the same vision tokens per row."""
    from covipal.ppm import PPM, PPMConfig

    model, processor, rows = reference
    cfg = EvaluateConfig(ratios=[0.75])
    ppm = PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2))
    make = build_methods(cfg, 2, ppm, guide_layer=1)
    out = evaluate_methods(model, ReferenceInputs(processor), rows, make, cfg.methods, cfg.ratios, 3, progress=False)
    target = [n_keep(n, 0.75) for n in out[("random", 0.75)].n_vision.astype(int)]
    for m in cfg.methods:
        assert out[(m, 0.75)].layer_average.tolist() == target, m
        entering = out[(m, 0.75)].entering.tolist()
        assert entering == (target if m in ("covipal", "random", "oracle", "visionzip")
                            else out[(m, 0.75)].n_vision.tolist()), m


# --- summaries ----------------------------------------------------------------------------------


def synthetic():
    rows = [{"modality": "image", "question_type": t} for t in ("colour", "colour", "count", "count")]
    rows += [{"modality": "video", "question_type": "count"}] * 2
    res = {("a", 1.0): Results(np.array([1, 1, 1, 0, 1, 0], bool), np.full(6, 64.0), np.full(6, 64.0),
                               np.array([1, 1, np.nan, 1, 1, 1.0]), np.full(6, 64.0)),
           ("a", 0.5): Results(np.array([1, 0, 0, 0, 0, 0], bool), np.full(6, 32.0), np.full(6, 32.0),
                               np.array([0.5, 0, np.nan, 1, 0, 0.0]), np.full(6, 64.0))}
    return rows, res


def test_table_metrics_and_report():
    rows, res = synthetic()
    records = table(res, rows, n_bootstrap=200, confidence=0.95, seed=0)
    by = {(r["method"], r["ratio"], r["modality"], r["question_type"]): r for r in records}
    assert by[("a", 1.0, "image", "all")]["accuracy"] == 0.75 and by[("a", 1.0, "image", "count")]["accuracy"] == 0.5
    assert by[("a", 0.5, "image", "colour")]["accuracy"] == 0.5 and by[("a", 0.5, "video", "all")]["accuracy"] == 0.0
    assert by[("a", 0.5, "image", "all")]["relevant_kept"] == pytest.approx(0.5)  # (0.5 + 0 + 1) / 3, NaN left out
    assert by[("a", 0.5, "image", "all")]["tokens_entering"] == 32.0 and by[("a", 0.5, "image", "all")]["rows"] == 4
    lo, hi = by[("a", 1.0, "image", "all")]["ci_low"], by[("a", 1.0, "image", "all")]["ci_high"]
    assert 0 <= lo <= 0.75 <= hi <= 1
    m = metrics(records)
    assert m["a"]["r0.5"]["image"]["accuracy"] == 0.25 and m["a"]["r1"]["image"]["by_type"] == {"colour": 1.0,
                                                                                                "count": 0.5}
    assert by[("a", 0.5, "image", "all")]["tokens_target"] == 32.0
    text = report(records, 0.95)
    assert "## image (4 rows, 64 vision tokens per row)" in text and "## video (2 rows" in text
    assert "| a | 0.750 [" in text and "| r = 1 | r = 0.5 |" in text and "32.0 / 32.0, 0.50" in text
    assert "†" not in text.split("\n## ")[1]
    res[("a", 0.5)].layer_average[:] = 40.0  # 8 tokens over ceil(0.5 * 64): flagged
    assert "0.250 [" in (flagged := report(table(res, rows, 200, 0.95, 0), 0.95)) and "] †" in flagged


def test_accuracy_figure_from_records_and_from_the_csv(tmp_path, monkeypatch):
    import csv

    from covipal.evaluation.figure import main, plot_accuracy
    from covipal.evaluation.summary import CSV_FIELDS

    rows, res = synthetic()
    records = table(res, rows, n_bootstrap=200, confidence=0.95, seed=0)
    drawn = plot_accuracy(records, tmp_path / "a.png")
    assert drawn == {"image": ["a"], "video": ["a"]}
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "acc.csv", "w", newline="") as f:  # the stage's CSV: every value a string
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(records)
    main([str(tmp_path / "acc.csv"), str(tmp_path / "figures" / "b.png")])
    assert (tmp_path / "figures" / "b.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="run `dvc repro evaluate` first"):
        main([str(tmp_path / "missing.csv"), str(tmp_path / "c.png")])


# --- method checks ------------------------------------------------------------------------------


def test_build_methods_names_bad_settings():
    with pytest.raises(ConfigError, match=r"evaluate.methods: unknown method\(s\) \['zip'\]"):
        build_methods(EvaluateConfig(methods=["zip"]), 4)
    with pytest.raises(ConfigError, match=r"evaluate.method_args: unknown method\(s\) \['fast'\]"):
        build_methods(EvaluateConfig(method_args={"fast": {"layer": 1}}), 4)
    with pytest.raises(ConfigError, match=r"evaluate.method_args.fastv: .*no parameters \['depth'\]"):
        build_methods(EvaluateConfig(methods=["fastv"], method_args={"fastv": {"depth": 1}}), 4)
    with pytest.raises(ConfigError, match=r"evaluate.method_args.fastv: .*outside the LLM's 2 decoder layers"):
        build_methods(EvaluateConfig(methods=["fastv"], method_args={"fastv": {"layer": 2}}), 2)
    with pytest.raises(ConfigError, match="covipal but no PPM"):
        build_methods(EvaluateConfig(methods=["covipal"]), 4)
    make = build_methods(EvaluateConfig(methods=["random", "fastv"], seed=7), 4)
    assert make("random", 0.5).seed == 7 and make("fastv", 0.25).match_layer_average
    assert make("fastv", 0.25).layer == 1 and make("fastv", 0.25).reserve_ratio == 0.25


def test_variants_name_a_registered_method_with_their_own_arguments(tmp_path):
    from covipal.ppm import PPM, PPMConfig

    stage2, stage1 = (PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2)) for _ in range(2))
    stage1.save_pretrained(tmp_path / "models" / "stage1")
    cfg = EvaluateConfig(methods=["covipal", "covipal_stage1"],
                         variants={"covipal_stage1": {"method": "covipal", "ppm": "models/stage1"}})
    make = build_methods(cfg, 4, stage2, root=tmp_path)
    assert make("covipal", 0.25).ppm is stage2
    variant = make("covipal_stage1", 0.125)
    assert variant.reserve_ratio == 0.125 and variant.ppm == str(tmp_path / "models" / "stage1")
    loaded = PPM.from_pretrained(variant.ppm)
    torch.testing.assert_close(dict(loaded.state_dict()), dict(stage1.state_dict()))
    with pytest.raises(ValueError, match="lack `method`"):
        EvaluateConfig(methods=["x"], variants={"x": {"ppm": "models/stage1"}})
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['x'\]"):
        build_methods(EvaluateConfig(methods=["x"], variants={"x": {"method": "nope"}}), 4)


N_COUNT = 400
COUNT_ROWS = [{"modality": "image", "question_type": "count"}] * N_COUNT  # one group of image rows


def at_budget(correct: np.ndarray) -> Results:
    """Outcomes of one (method, ratio) on COUNT_ROWS: 16 of 64 vision tokens kept, no relevant cells."""
    n = len(correct)
    return Results(correct, np.full(n, 16.0), np.full(n, 16.0), np.full(n, np.nan), np.full(n, 64.0))


def test_leads_over_baselines_and_their_report():
    n, rows = N_COUNT, COUNT_ROWS
    rng = np.random.default_rng(1)
    ours = rng.random(n) < 0.8
    results = at_budget

    res = {("covipal", 0.25): results(ours),
           ("far", 0.25): results(ours & (rng.random(n) < 0.7)),  # about 24 points behind
           ("near", 0.25): results(ours & (rng.random(n) < 0.98))}  # about 1.6 points behind
    out = {r["baseline"]: r for r in leads(res, rows, "covipal", ["far", "near"], 1000, 0.95, 0)}
    assert out["far"]["lead"] == pytest.approx(ours.mean() - res[("far", 0.25)].score.mean())
    assert out["far"]["clear"] and out["far"]["separate"] and out["far"]["ci_low"] > 0.03
    assert not out["near"]["clear"] and not out["near"]["separate"] and out["near"]["lead"] < 0.03
    assert out["far"]["equal_budget"] and out["near"]["equal_budget"]
    text = leads_report(list(out.values()), "covipal", 0.95)
    assert "## Lead of covipal" in text and "| far | +0.2" in text and "✓" in text and "| near | +0.0" in text
    assert "✓ †" not in text and "✗ †" not in text
    res[("far", 0.25)].layer_average[:] = 17.5  # 16 + 1.5: more than the budget allows
    over = {r["baseline"]: r for r in leads(res, rows, "covipal", ["far"], 200, 0.95, 0)}["far"]
    assert not over["equal_budget"] and "✓ †" in leads_report([over], "covipal", 0.95)


def test_retention_of_the_unpruned_accuracy_and_the_paired_difference_from_a_variant():
    n, rows = N_COUNT, COUNT_ROWS
    rng = np.random.default_rng(2)
    full = rng.random(n) < 0.9
    results = at_budget

    ours = full & (rng.random(n) < 0.99)
    res = {("covipal", 1.0): results(full), ("covipal", 0.25): results(ours),
           ("stage1", 1.0): results(full), ("stage1", 0.25): results(ours & (rng.random(n) < 0.9))}
    (rec,) = retention(res, rows, "covipal", ["stage1"], 1000, 0.95, 0)
    assert rec["ratio"] == 0.25 and rec["share"] == pytest.approx(ours.mean() / full.mean())
    d = rec["versus"]["stage1"]
    assert d["lead"] == pytest.approx(ours.mean() - res[("stage1", 0.25)].score.mean())
    assert 0 < d["ci_low"] < d["lead"] < d["ci_high"]  # about 11 points ahead on 400 rows: clearly above 0
    text = retention_report([rec], "covipal", 0.95)
    assert f"| image | 0.25 | {rec['share']:.1%} | {d['lead']:+.3f} [" in text and "− stage1" in text
    del res[("covipal", 1.0)]  # no unpruned pass: no share
    assert retention(res, rows, "covipal", [], 200, 0.95, 0)[0]["share"] is None
    assert retention_report([], "covipal", 0.95) == ""


# --- any model: what a method needs, scoring, optional columns, an unpruned model that does not answer ------


def test_methods_declare_what_they_need_and_the_harness_leaves_out_none_silently():
    from tiny_lvlms import tiny_model

    from covipal.evaluation.harness import unsupported
    from covipal.pruning import VisionZipPruner, get_method

    llava, qwen = tiny_model("llava"), tiny_model("qwen2_vl")
    assert VisionZipPruner.reads_vision_tower and not KeepFirst.reads_vision_tower
    assert VisionZipPruner().supports(llava) is None and KeepFirst().supports(qwen) is None
    reason = VisionZipPruner().supports(qwen)
    assert "[CLS]" in reason and "qwen2_vl" in reason
    make = lambda m, r: get_method(m, reserve_ratio=r)  # noqa: E731
    assert unsupported(qwen, make, ["random", "visionzip"]) == {"visionzip": reason}
    assert unsupported(llava, make, ["random", "visionzip"]) == {}
    with pytest.raises(NotImplementedError, match=r"visionzip cannot prune Qwen2VLForConditionalGeneration: .*\[CLS\]"):
        with VisionZipPruner()(qwen):
            pass
    with pytest.raises(ValueError, match=r"\['visionzip'\] cannot prune .*leave them out"):
        evaluate_methods(qwen, None, [], make, ["visionzip"], [0.5], 4, progress=False)


def hf_rows(n: int = 5) -> list[dict]:
    """VQA-shaped rows for tests/tiny_lvlms.py's llava processor: one 16x16 image, a question, an answer."""
    from PIL import Image

    rng = np.random.default_rng(0)
    words = ["red", "blue", "yes", "no", "two"]
    return [{"images": [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))],
             "question": "what colour is the square", "answer": words[i % 5], "modality": "image"}
            for i in range(n)]


def test_first_token_scoring_of_a_pretrained_llava_with_its_tower_run_once():
    """Precomputed tower output for the pretrained LLaVA class too; visionzip, which reads the tower, gets pixels."""
    from tiny_lvlms import tiny_model, tiny_processor

    from covipal.evaluation.harness import precompute_tower
    from covipal.pruning import get_method
    from covipal.training.hf_inputs import HFInputs

    model, inputs, rows = tiny_model("llava"), HFInputs(tiny_processor()), hf_rows()
    prompt = inputs.prompt(rows)
    encoded = precompute_tower(model, prompt)
    assert "pixel_values" not in encoded and "mm_encoder_outputs" in encoded
    assert precompute_tower(tiny_model("qwen2_vl"), {"input_ids": None, "pixel_values": None}) is None
    with torch.no_grad():
        ids = model(**prompt).logits[:, -1].argmax(-1)
        torch.testing.assert_close(model(**encoded).logits, model(**prompt).logits)
    rows[1]["answer"] = inputs.tokenizer.decode([int(ids[1])])  # one row right by construction
    make = lambda m, r: get_method(m, reserve_ratio=r)  # noqa: E731
    out = evaluate_methods(model, inputs, rows, make, ["random", "visionzip"], [1.0, 0.5], 2, progress=False,
                           scoring="first_token")
    full = out[("random", 1.0)]
    assert full.score.tolist() == (ids == inputs.answers(rows)).float().tolist() and full.score[1] == 1.0
    assert full.prediction.tolist() == [inputs.tokenizer.decode([int(i)]).strip() for i in ids]
    with get_method("visionzip", reserve_ratio=0.5)(model), torch.no_grad():
        zipped = model(**prompt).logits[:, -1].argmax(-1)
    assert out[("visionzip", 0.5)].score.tolist() == (zipped == inputs.answers(rows)).float().tolist()
    assert out[("visionzip", 0.5)].entering.tolist() == [8] * 5  # ceil(0.5 * 16)
    assert np.isnan(out[("random", 0.5)].relevant_kept).all()  # no relevant cells


def test_generate_scoring_is_the_vqa_accuracy_of_the_generated_answer():
    from tiny_lvlms import tiny_model, tiny_processor

    from covipal.evaluation.vqa import generate_answers, vqa_score
    from covipal.pruning import get_method
    from covipal.training.hf_inputs import HFInputs

    model, inputs, rows = tiny_model("llava"), HFInputs(tiny_processor()), hf_rows(4)
    with torch.no_grad():
        said = generate_answers(model, inputs.prompt(rows), inputs.tokenizer, 2)
    rows[0]["answers"] = [said[0]] * 2 + ["no"]  # 2 of 3 reference answers: VQA accuracy 2/3
    rows[2]["answers"] = []  # an empty list: the row's answer is the reference
    make = lambda m, r: get_method(m, reserve_ratio=r)  # noqa: E731
    out = evaluate_methods(model, inputs, rows, make, ["random"], [1.0, 0.25], 4, progress=False,
                           scoring="generate", max_new_tokens=2)
    full = out[("random", 1.0)]
    assert full.prediction.tolist() == said and full.score[0] == pytest.approx(2 / 3)
    assert full.score.tolist() == [vqa_score(p, r.get("answers") or [r["answer"]]) for p, r in zip(said, rows)]
    with pytest.raises(ValueError, match="scoring must be one of"):
        evaluate_methods(model, inputs, rows, make, ["random"], [1.0], 4, progress=False, scoring="bleu")


def test_tables_without_question_types_or_relevant_cells():
    rows = [{"modality": "image"}] * 4
    res = {("a", 1.0): Results(np.array([1.0, 0.5, 0, 1]), np.full(4, 16.0), np.full(4, 16.0), np.full(4, np.nan),
                               np.full(4, 16.0))}
    records = table(res, rows, 200, 0.95, 0)
    assert [r["question_type"] for r in records] == ["all"] and records[0]["accuracy"] == 0.625
    assert records[0]["metric"] == "first_token" and table(res, rows, 200, 0.95, 0, "generate")[0]["metric"] == "vqa"
    assert records[0]["relevant_kept"] is None and "by_type" not in metrics(records)["a"]["r1"]["image"]
    text = report(records, 0.95, scoring="generate", notes=["A note."])
    assert "relevant kept" not in text.lower() and "16.0 / 16.0 |" in text and "\nA note." in text
    assert "VQA accuracy of the greedy generated answer" in text
    assert "greedy next token" in report(records, 0.95)


def test_an_unpruned_accuracy_of_zero_or_at_chance_is_flagged():
    from covipal.evaluation.summary import unpruned_check, unpruned_report

    rows = [{"modality": "image", "question": f"q{i}", "answer": "yes" if i % 2 else "no"} for i in range(40)]
    rows += [{"modality": "video", "question": "q", "answer": "two", "answers": ["2", "two", "3"]}] * 10

    def outcome(image_scores, video_scores):
        score = np.r_[image_scores, video_scores].astype(float)
        return Results(score, *(np.zeros(50) for _ in range(4)), prediction=np.array(["yes"] * 50, dtype=object))

    at_chance = outcome(np.arange(40) % 2, np.zeros(10))  # always "yes" on a yes/no set: 0.5
    checks = {c["modality"]: c for c in unpruned_check(at_chance, rows, "first_token")}
    assert checks["image"]["chance"] == 0.5 and checks["image"]["status"] == "chance"
    assert checks["image"]["common_answer"] in ("yes", "no") and checks["video"]["status"] == "zero"
    assert unpruned_check(at_chance, rows, "generate")[1]["chance"] == pytest.approx(2 / 3)  # "2" is 2 of 3 answers
    text = unpruned_report(list(checks.values()), at_chance, rows, "first_token", 16)
    assert "- image: the unpruned model scores 0.500 on 40 rows: no better than always answering" in text
    assert "- video: the unpruned model scores 0.000 on 10 rows: every answer is wrong." in text
    assert "`evaluate.scoring: generate`" in text and "| video | q | yes | 2, two, 3 |" in text
    assert "max_new_tokens` (16)" in unpruned_report(list(checks.values()), at_chance, rows, "generate", 16)
    good = outcome(np.r_[np.ones(30), np.zeros(10)], np.ones(10))  # 0.75 against 0.5; all right where all say "two"
    assert {c["status"] for c in unpruned_check(good, rows, "first_token")} == {"ok"}
    assert unpruned_report(unpruned_check(good, rows, "first_token"), good, rows, "first_token", 16) == ""
