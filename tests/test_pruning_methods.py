"""The registered methods on tiny models: ``random`` and ``covipal`` (a PPM)."""

import pytest
import torch
from tiny_lvlms import make_batch, tiny_model

from covipal.ppm import PPM, PPMConfig
from covipal.pruning import CoViPALPruner, RandomPruner, get_method, n_keep


def test_random_is_seeded_and_independent_of_the_batch():
    model, batch = tiny_model("llava"), make_batch("llava", [(2, 0), (1, 0)])
    kept = []
    for seed in (0, 0, 1):
        with RandomPruner(reserve_ratio=0.25, seed=seed)(model) as run, torch.no_grad():
            model(**batch)
        kept.append([k.tolist() for k in run.kept_vision])
    assert kept[0] == kept[1] != kept[2]
    alone = {k: v[:1] if k in ("input_ids", "attention_mask") else v[:2] for k, v in batch.items()}
    with RandomPruner(reserve_ratio=0.25)(model) as run, torch.no_grad():
        model(**alone)
    pad = int((batch["attention_mask"][0] == 0).sum())  # sample 0 is left-padded in the batch
    assert [i + pad for i in run.kept_vision[0].tolist()] == kept[0][0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_covipal_prunes_with_a_saved_ppm(family, tmp_path):
    model, batch = tiny_model(family), make_batch(family, [(2, 0), (0, 0), (1, 0)])
    torch.manual_seed(0)
    ppm = PPM(PPMConfig(d_model=model.config.get_text_config().hidden_size, d_ppm=16, n_heads=2)).train()
    ppm.save_pretrained(tmp_path)
    for source in (ppm, str(tmp_path)):
        pruner = get_method("covipal", reserve_ratio=0.25, ppm=source)
        with pruner(model) as run, torch.no_grad():
            out = model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert out.shape == (3, batch["input_ids"].shape[1] + 2)
        assert [len(k) for k in run.kept_vision] == [n_keep(int(n), 0.25) for n in run.n_vision]
        assert run.n_vision.tolist()[1] == 0
    assert ppm.training  # its mode is given back on exit


def test_covipal_checks_the_ppm_fits_the_model():
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="hidden size 64, but LlavaForConditionalGeneration has 32"):
        with CoViPALPruner(ppm=PPM(PPMConfig(d_model=64, d_ppm=16, n_heads=2)))(model):
            pass
    with pytest.raises(ValueError, match="needs `ppm`"):
        with CoViPALPruner()(model):
            pass
