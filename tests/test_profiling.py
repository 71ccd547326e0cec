"""Profiling: the FLOP counter against hand counts and torch's counter, KV bytes, the stage's outputs.

No timing is asserted here: speed claims come from scripts/bench_prefill.py and scripts/bench_gpu.py.
"""

import json

import pytest
import torch

from covipal.ppm import PPM, PPMConfig
from covipal.profiling.bench import Case, profile_methods
from covipal.profiling.flops import ppm_flops, prefill_flops, speedup_limit
from covipal.profiling.shapes import Subject, build_shape, make_inputs


def small_llava():
    """CLIP: width 8, MLP 16, 1 layer, 8x8 px in 4x4 patches (4 patches + CLS); Llama: width 8, MLP 12, 1 layer,
    2 heads of 4 with 1 KV head, vocabulary 10."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)
    text = LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=10)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=9, vision_feature_layer=-1,
                       vision_feature_select_strategy="default")


def test_prefill_flops_match_a_hand_count():
    config = small_llava()
    full = prefill_flops(config, n_images=1, n_text=3)
    # vision: patch conv 2*4*(3*16)*8 = 3072; one layer over 5 tokens: QKVO 2*5*8*32 = 2560,
    # attention 4*5*5*8 = 800, MLP 2*5*8*16 + 2*5*16*8 = 2560
    assert full.vision == 3072 + 2560 + 800 + 2560
    # projector on the 4 patch tokens (CLS dropped): 2*4*8*8 twice
    assert full.projector == 512 + 512
    # LLM over 3 + 4 = 7 tokens: Q 2*7*8*8 = 896, K and V 2*7*8*4 each = 896, O 896,
    # attention over 7*8/2 = 28 causal pairs 4*(2*4)*28 = 896, MLP 3*2*7*8*12 = 4032; LM head on 1 token 2*8*10
    assert full.llm == 896 + 896 + 896 + 896 + 4032 + 160
    assert full.ppm == 0 and full.total == 17792

    half = prefill_flops(config, n_images=1, n_text=3, schedule=[(0, 2)])  # 2 of 4 vision tokens kept
    # LLM over 5 tokens: Q 640, K+V 640, O 640, attention over 15 pairs 480, MLP 2880; LM head 160
    assert half.llm == 640 + 640 + 640 + 480 + 2880 + 160
    assert half.vision == full.vision and half.projector == full.projector
    assert speedup_limit(full, half) == pytest.approx(17792 / (10016 + 5440))


def test_ppm_flops_match_a_hand_count():
    ppm = PPMConfig(d_model=8, d_ppm=4, n_layers=1, n_heads=2, mlp_ratio=2)
    # inputs 2*4*8*4 + 2*3*8*4 = 448; self-attention QKVO 2*4*4*16 = 512 and scores 4*4*4*4 = 256;
    # cross-attention Q,O 2*4*4*8 = 256, K,V 2*3*4*8 = 192, scores 4*4*3*4 = 192; MLP 256 + 256;
    # head 2*4*4*4 + 2*4*4*1 = 160
    assert ppm_flops(ppm, n_vision=4, n_text=3) == 448 + 512 + 256 + 256 + 192 + 192 + 512 + 160
    config = small_llava()
    assert prefill_flops(config, 1, 3, schedule=[(0, 2)], ppm=ppm).ppm == 2528


@pytest.mark.parametrize("method", [None, "random"])
def test_prefill_flops_match_torch_counter_with_eager_attention(method):
    """With eager attention torch's FlopCounterMode sees every matrix product, the full score square included."""
    from torch.utils.flop_counter import FlopCounterMode

    from covipal.profiling.bench import make_pruner, prefill

    subject = build_shape("tiny-llava")
    subject.model.set_attn_implementation("eager")
    try:
        inputs = make_inputs(subject.config, 2, 10)
        case = Case() if method is None else Case(method, 0.25)
        pruner = make_pruner(case)
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            if pruner is None:
                prefill(subject.model, inputs)
            else:
                with pruner(subject.model):
                    prefill(subject.model, inputs)
    finally:
        subject.model.set_attn_implementation("sdpa")
    schedule = None if pruner is None else pruner.schedule(2 * 16, subject.config.text_config.num_hidden_layers)
    expected = prefill_flops(subject.config, 2, 10, schedule=schedule, causal=False)
    assert counter.get_total_flops() == expected.total


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_kv_bytes_follow_the_kept_token_share(family):
    subject = build_shape(family)
    ppm = PPM(PPMConfig(d_model=subject.config.text_config.hidden_size, d_ppm=16, n_heads=2)).eval()
    result = profile_methods(subject, [Case("covipal", 0.25), Case("random", 0.5), Case("pyramiddrop", 0.25)],
                             pictures=2, n_text=12, warmup=0, repeats=1, decode_tokens=2, ppm=ppm, log=lambda *a: None)
    cases = {c["label"]: c for c in result["cases"]}
    n_v, n_text = result["prompt"]["vision_tokens"], 12
    assert cases["none"]["kv_ratio"] == 1.0
    assert cases["covipal@0.25"]["kept_token_share"] == pytest.approx((n_text + n_v // 4) / (n_text + n_v))
    for c in result["cases"]:
        assert c["kv_ratio"] == pytest.approx(c["kept_token_share"], rel=1e-9), c["label"]
        assert c["peak_bytes"] > 0 and c["decode_s_per_token"]["n"] == 2  # gaps between 3 generated tokens
    assert cases["pyramiddrop@0.25"]["kept_token_share"] > cases["covipal@0.25"]["kept_token_share"]
    assert cases["covipal@0.25"]["scorer_s"] > 0 and cases["random@0.5"]["limit"] > 1


def test_profile_stage_writes_metrics_plots_and_report(reference, tmp_path):
    from covipal.config import parse_params
    from covipal.profiling.stage import run_profile

    model, processor, _ = reference
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    params = parse_params({"profile": {"methods": ["covipal", "random"], "ratios": [0.5, 0.25], "warmup": 0,
                                       "repeats": 1, "decode_tokens": 2, "frames": [4, 8], "text_tokens": 8,
                                       "device": "cpu"},
                           "stage1": {"ppm": {"d_ppm": 16, "n_layers": 1, "n_heads": 2}}})
    out, plots = tmp_path / "plots" / "profile", tmp_path / "plots"
    result = run_profile(params, base, tmp_path / "no-ppm", out, plots, log=lambda *a: None)
    for name in ("speedup.png", "frames.png", "report.md", "trace.json"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "device: **cpu**" in report and "PPM: random weights" in report
    assert "| covipal@0.25 |" in report and "Longest video that fits in memory" in report
    assert "packed into each picture" in report and "Memory cap:" in report
    m = result["metrics"]
    assert m["device"] == "cpu" and set(m["cases"]) == {"none", "covipal_r0.5", "covipal_r0.25", "random_r0.5",
                                                        "random_r0.25"}
    assert m["frames"]["none"]["largest_fitting_frames"] in (0, 4, 8)
    json.dumps(m)  # serialisable as metrics/profile.json
    speedup_csv = (plots / "profile_speedup.csv").read_text().splitlines()
    assert speedup_csv[0] == "reserve_ratio,speedup,limit" and len(speedup_csv) == 3  # covipal at 2 ratios
    frames_csv = (plots / "profile_frames.csv").read_text().splitlines()
    assert frames_csv[0] == ("frames,unpruned_mib,unpruned_fits,pruned_mib,pruned_fits,cap_mib,pruned_case,device,"
                             "model,cap_rule") and len(frames_csv) >= 2


def test_figures_attach_to_a_registered_version(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from covipal.profiling.stage import attach_to_registered
    from covipal.registry import register_ppm

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        PPM(PPMConfig(d_model=8, d_ppm=8, n_layers=1, n_heads=2)).save_pretrained(tmp_path / "ppm")
        reg = register_ppm(tmp_path / "ppm", metrics={"hard_accuracy": 0.5}, metric="hard_accuracy",
                           base_model="reference@x", guide_layer=1, reserve_ratio=0.25, data_version="d", commit="c")
        (tmp_path / "register.json").write_text(json.dumps({"name": reg.name, "version": int(reg.version)}))
        figure = tmp_path / "speedup.png"
        figure.write_bytes(b"png")
        numbers = {"device_name": "cpu", "model": "base", "frames": {"cap_bytes": 1, "none": {"largest_fitting_frames": 4}},
                   "cases": {"none": {}, "covipal_r0.25": {"speedup": 2.0, "limit": 2.5}}}
        attached = attach_to_registered(tmp_path / "register.json", [figure], numbers, uri)
        assert attached["version"] == 1
        version = MlflowClient(uri).get_model_version(reg.name, reg.version)
        assert version.tags["profile.covipal_r0.25.speedup"] == "2.000"
        assert version.tags["profile.frames_fit.none"] == "4"
        assert version.tags["profile.artifacts"].endswith("profile/speedup.png")
        listed = [a.path for a in MlflowClient(uri).list_artifacts(version.run_id, "profile")]
        assert listed == ["profile/speedup.png"]
        assert attach_to_registered(tmp_path / "missing.json", [figure], numbers, uri) is None
    finally:
        mlflow.set_tracking_uri(None)


def _script(monkeypatch, path, *args) -> int:
    """Run a script's ``main`` in this process (no second torch import); its exit status."""
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", [path, *args])
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / path))
    return script["main"]()


def test_benchmark_scripts_run_their_code_path_on_tiny_shapes(tmp_path, monkeypatch, capsys):
    """Both benchmarks end to end on tiny shapes (their numbers mean nothing here; only the outputs are checked)."""
    threads = torch.get_num_threads()
    cpu = _script(monkeypatch, "scripts/bench_prefill.py", "--shape", "tiny-llava", "--threads", "1", "--warmup",
                  "0", "--repeats", "1", "--decode-tokens", "2", "--d-ppm", "16", "--json", str(tmp_path / "cpu.json"))
    torch.set_num_threads(threads)
    assert cpu in (0, 1)
    assert capsys.readouterr().out.count("covipal r=0.25") == 3  # the three checks, pass or fail
    assert json.loads((tmp_path / "cpu.json").read_text())["cases"][1]["label"] == "covipal@0.25"

    gpu = _script(monkeypatch, "scripts/bench_gpu.py", "--out", str(tmp_path / "gpu"), "--tiny", "--shapes",
                  "tiny-llava", "--warmup", "0", "--repeats", "1", "--decode-tokens", "2", "--frames", "4", "8",
                  "--cap-gb", "0.006")
    assert gpu in (0, 1)
    summary = json.loads((tmp_path / "gpu" / "bench_gpu.json").read_text())
    assert set(summary["shapes"]["tiny-llava"]["profile"]) == {"image", "video8", "image_batch16"}
    assert [c["pass"] is None for c in summary["checks"]] == [True, False, False, False]  # one image: reported only
    frames = summary["shapes"]["tiny-llava"]["frames"]
    assert [c["label"] for c in frames["cases"]] == ["none", "covipal@0.25", "random@0.25"]
    assert (tmp_path / "gpu" / "bench_gpu.md").read_text().startswith("# GPU benchmark on cpu")


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_a_batch_of_copies_prefills_each_copy_like_the_single_prompt(family):
    """``batch=3`` repeats the prompt and its pixels; every row's logits equal the single prompt's."""
    from covipal.profiling.bench import prefill

    subject = build_shape(family)
    one, three = make_inputs(subject.config, 2, 10), make_inputs(subject.config, 2, 10, batch=3)
    assert three["input_ids"].shape == (3, one["input_ids"].shape[1])
    pixels = "pixel_values_videos" if "pixel_values_videos" in one else "pixel_values"
    assert three[pixels].shape[0] == 3 * one[pixels].shape[0]
    with torch.inference_mode():
        single = subject.model(**one).logits[:, -1]
        batched = subject.model(**three).logits[:, -1]
        prefill(subject.model, three)  # the benchmark's own call takes the batch
    torch.testing.assert_close(batched, single.expand(3, -1), rtol=1e-4, atol=1e-4)


def test_memory_cap_is_absolute_when_set_and_scaled_to_the_model_otherwise():
    from covipal.profiling.stage import HEADROOM_TOKENS, LLAVA_7B_BF16_BYTES, LLAVA_7B_KV_BYTES_PER_TOKEN, memory_cap

    cpu = torch.device("cpu")
    cap, rule = memory_cap(0.5, cpu, weights=10 ** 12, kv_per_token=10 ** 6)  # the model does not matter
    assert cap == 500_000_000 and "profile.memory_cap_gb = 0.5" in rule
    # LLaVA-1.5-7B in bf16 gets the 24 GB the scaled rule is set against
    cap, rule = memory_cap(None, cpu, LLAVA_7B_BF16_BYTES, LLAVA_7B_KV_BYTES_PER_TOKEN)
    assert abs(cap - 24 * 10 ** 9) <= 1 and "scaled to this model" in rule
    # a 1 MiB model: its weights plus room for the KV cache of as many of its own tokens
    cap, rule = memory_cap(None, cpu, 2 ** 20, 256)
    assert cap == int(2 ** 20 + HEADROOM_TOKENS * 256) and 18_800 < HEADROOM_TOKENS < 18_900
    assert "18,832 prompt tokens (256 bytes each)" in rule
    assert memory_cap(None, cpu, 2 ** 20, 512)[0] - 2 ** 20 == pytest.approx(2 * (cap - 2 ** 20), abs=1)
    with pytest.raises(TypeError, match="kv_per_token"):
        memory_cap(None, cpu, 2 ** 20)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_prompts_tokens_flops_and_kv_bytes_of_every_family(family):
    """Each family's prompts run; their placeholders are the vision tokens counted, the KV cache is the tokens times
    kv_bytes_per_token, and FLOPs beyond 4 pictures (extended linearly) equal a run of the vision path."""
    from tiny_lvlms import tiny_model

    from covipal.profiling.bench import _cache, prefill
    from covipal.profiling.flops import SUPPORTED, encoder_flops
    from covipal.profiling.measure import kv_cache_bytes
    from covipal.profiling.shapes import _run_vision

    subject = Subject(tiny_model(family), family)
    vision_ids = [subject.config.image_token_id, getattr(subject.config, "video_token_id", None)]
    for pictures in (1, 4):  # an image; a video (several images for llava and llava_next)
        inputs = subject.inputs(pictures, 8)
        n_v = subject.vision_tokens(pictures)
        assert int(torch.isin(inputs["input_ids"], torch.tensor([i for i in vision_ids if i is not None])).sum()) \
            == n_v > 0
        with torch.inference_mode():
            cache = _cache(prefill(subject.model, inputs))
        assert kv_cache_bytes(cache) == subject.kv_bytes_per_token() * inputs["input_ids"].shape[1]
        if family in SUPPORTED:  # the measured count agrees with the analytic one where both exist
            assert _run_vision(subject.model, pictures)[1] == encoder_flops(subject.config, pictures)
    direct = _run_vision(subject.model, 6)
    assert subject._measure(6) == direct and subject.flops(6, 8).vision == direct[1][0]
    if family.startswith("qwen"):  # frames come in pairs: an odd video is refused with the fix
        with pytest.raises(ValueError, match="temporal_patch_size.*even counts in profile.frames"):
            subject.inputs(3, 8)


@pytest.mark.parametrize("family,cap_gb", [("llava", None), ("qwen2_vl", None), ("qwen2_vl", 0.05)])
def test_profile_runs_on_a_saved_pretrained_checkpoint(family, cap_gb, tmp_path):
    """The stage on a checkpoint saved like a real one and recorded by the base stage: images and videos, a
    method the family lacks skipped with its reason, a finite cap saying how it was chosen, consistent frames."""
    import csv
    import math

    from tiny_lvlms import save_checkpoint, tiny_model

    from covipal.base_model import PRETRAINED_RECORD, pretrained_record
    from covipal.config import parse_params
    from covipal.profiling.shapes import weight_bytes
    from covipal.profiling.stage import run_profile

    checkpoint = save_checkpoint(family, tmp_path / "checkpoint")
    base = tmp_path / "base"
    base.mkdir()
    (base / PRETRAINED_RECORD).write_text(json.dumps(pretrained_record(str(checkpoint), None)))
    params = parse_params({"profile": {"methods": ["covipal", "random", "visionzip"], "ratios": [0.5], "warmup": 0,
                                       "repeats": 1, "decode_tokens": 2, "frames": [2, 4, 8], "text_tokens": 8,
                                       "device": "cpu", "trace": False, "memory_cap_gb": cap_gb},
                           "stage1": {"ppm": {"d_ppm": 16, "n_layers": 1, "n_heads": 2}}})
    out, plots = tmp_path / "plots" / "profile", tmp_path / "plots"
    result = run_profile(params, base, tmp_path / "no-ppm", out, plots, log=lambda *a: None)
    m, report = result["metrics"], (out / "report.md").read_text()

    assert m["model"] == f"{checkpoint} ({family})" and m["device"] == "cpu"
    assert f"# Profile: {checkpoint} ({family}) on" in report
    measured = {"none", "covipal_r0.5", "random_r0.5"} | ({"visionzip_r0.5"} if family == "llava" else set())
    assert set(m["cases"]) == measured and all(c["limit"] > 1 for k, c in m["cases"].items() if k != "none")
    if family == "qwen2_vl":  # no CLIP-style tower: skipped, with the reason, not a crash
        assert "[CLS]" in m["skipped"]["visionzip_r0.5"]
        assert "## Methods not measured" in report and "visionzip@0.5: the method cannot prune" in report
    else:
        assert m["skipped"] == {}

    cap = m["frames"]["cap_bytes"]
    assert math.isfinite(cap) and cap > 0
    if cap_gb is None:
        assert m["frames"]["cap_source"] == "scaled" and "scaled to this model" in m["frames"]["cap_rule"]
        assert cap > weight_bytes(tiny_model(family))
    else:
        assert cap == int(cap_gb * 10 ** 9) and m["frames"]["cap_source"] == "profile.memory_cap_gb"
    frames = m["frames"]
    assert f"Memory cap: {cap / 2 ** 20:,.1f} MiB ({cap:,} bytes)" in report
    assert "A length fits when the peak of the tensors alive at once" in report

    rows = list(csv.DictReader((plots / "profile_frames.csv").open()))
    assert [int(r["frames"]) for r in rows][0] == 2 and all(r["model"] == m["model"] for r in rows)
    for kind, key in (("unpruned", "none"), ("pruned", "covipal_r0.25")):
        points = [{"frames": int(r["frames"]), "fits": r[f"{kind}_fits"] == "True",
                   "peak_bytes": float(r[f"{kind}_mib"]) * 2 ** 20 if r[f"{kind}_mib"] else None}
                  for r in rows if r[f"{kind}_fits"]]
        for pt in points:
            assert pt["fits"] == (pt["peak_bytes"] is not None and pt["peak_bytes"] <= cap * (1 + 1e-12))
        assert frames[key]["largest_fitting_frames"] == max([0] + [pt["frames"] for pt in points if pt["fits"]])
        assert float(rows[0]["cap_mib"]) * 2 ** 20 == pytest.approx(cap)
    if cap_gb is not None:
        assert frames["none"]["largest_fitting_frames"] > 0  # 50 MB holds the tiny model's short videos

