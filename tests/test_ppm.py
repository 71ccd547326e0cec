import json

import pytest
import torch

from covipal.ppm import CONFIG_NAME, PPM, WEIGHTS_NAME, PPMConfig


def make_inputs(B=3, n_v=7, n_t=5, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vision, text = torch.randn(B, n_v, d, generator=gen), torch.randn(B, n_t, d, generator=gen)
    vision_mask = torch.ones(B, n_v, dtype=torch.bool)
    text_mask = torch.ones(B, n_t, dtype=torch.bool)
    vision_mask[1, 4:] = False  # padded vision slots
    text_mask[1, 3:] = False
    vision_mask[2] = False  # a text-only sample
    return vision, text, vision_mask, text_mask


@pytest.fixture
def ppm():
    torch.manual_seed(0)
    return PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=2, n_heads=2)).eval()


def test_scores_shape_and_masking(ppm):
    vision, text, vision_mask, text_mask = make_inputs()
    scores = ppm(vision, text, vision_mask, text_mask)
    assert scores.shape == (3, 7) and scores.dtype == torch.float32
    assert torch.isfinite(scores[vision_mask]).all()
    assert (scores[~vision_mask] == float("-inf")).all()
    no_text = ppm(vision[:1], text[:1], vision_mask[:1], torch.zeros(1, 5, dtype=torch.bool))
    assert torch.isfinite(no_text).all()
    assert torch.equal(no_text, ppm(vision[:1], text[:1, :0]))  # a sample without text, padded or not


def test_padding_does_not_change_a_samples_scores(ppm):
    vision, text, vision_mask, text_mask = make_inputs()
    batched = ppm(vision, text, vision_mask, text_mask)[1, :4]
    alone = ppm(vision[1:2, :4], text[1:2, :3])[0]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_scores_depend_on_the_text(ppm):
    vision, text, vision_mask, text_mask = make_inputs()
    assert not torch.allclose(ppm(vision, text, vision_mask, text_mask)[0],
                              ppm(vision, torch.randn_like(text), vision_mask, text_mask)[0])


def test_save_load_round_trip(ppm, tmp_path):
    inputs = make_inputs()
    ppm.save_pretrained(tmp_path / "ppm")
    assert sorted(p.name for p in (tmp_path / "ppm").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = PPM.from_pretrained(tmp_path / "ppm")
    assert loaded.config == ppm.config and not loaded.training
    assert torch.equal(loaded(*inputs), ppm(*inputs))


def test_broken_folders_give_clear_errors(ppm, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_NAME} not found.*save_pretrained"):
        PPM.from_pretrained(tmp_path / "nowhere")
    ppm.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PPM.from_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} not found"):
        PPM.from_pretrained(tmp_path)
    PPM(PPMConfig(d_model=32, d_ppm=8, n_heads=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "d_ppm": 16}))
    with pytest.raises(ValueError, match="does not match"):
        PPM.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "width": 3}))
    with pytest.raises(ValueError, match=r"unknown PPMConfig keys \['width'\]"):
        PPM.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PPM.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs,match", [({"d_ppm": 10, "n_heads": 4}, "must divide"),
                                          ({"n_layers": 0}, "n_layers must be a positive integer"),
                                          ({"dropout": 1.5}, "dropout must be in")])
def test_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPMConfig(d_model=32, **kwargs)
