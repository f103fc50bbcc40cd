"""Testbed data: determinism, prompt/digit splits, packing, and the classifier (CPU, seconds)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from attnplug.testbed import classifier, data


def test_digit_split_is_stratified_disjoint_and_deterministic():
    tr, he = data.digit_split("train"), data.digit_split("heldout")
    assert len(tr.labels) + len(he.labels) == 1797
    assert (he.class_count >= 40).all() and (tr.class_count >= 120).all()
    # no image of the held-out split appears in the train split
    flat_tr = {bytes(x.numpy().tobytes()) for x in tr.images}
    shared = sum(bytes(x.numpy().tobytes()) in flat_tr for x in he.images)
    assert shared <= 2  # load_digits holds a couple of exact duplicates; the split is by index
    again = data.digit_split("train")
    assert torch.equal(again.images, tr.images) and torch.equal(again.labels, tr.labels)
    with pytest.raises(ValueError, match="which"):
        data.digit_split("test")


def test_same_seed_same_mosaics_and_classes_match_prompt():
    p1 = data.train_prompts(6, generator=torch.Generator().manual_seed(3))
    p2 = data.train_prompts(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(p1, p2)
    split = data.digit_split("train")
    m1 = data.render_mosaics(p1, split, torch.Generator().manual_seed(5), gain_jitter=0.1)
    m2 = data.render_mosaics(p2, split, torch.Generator().manual_seed(5), gain_jitter=0.1)
    m3 = data.render_mosaics(p1, split, torch.Generator().manual_seed(6), gain_jitter=0.1)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert m1.shape == (6, 1, 64, 64) and m1.min() >= -1 and m1.max() <= 1
    # without jitter every cell is exactly a train image of the prompted class
    m = data.render_mosaics(p1, split, torch.Generator().manual_seed(5))
    cells = data.to_digit_scale(data.cells_of(m))
    for b, i, j in [(0, 0, 0), (3, 7, 2), (5, 4, 6)]:
        cls = int(p1[b, i, j])
        bank = split.images[split.labels == cls]
        assert (bank - cells[b, i, j]).abs().flatten(1).amax(1).min() < 1e-5


def test_heldout_prompts_disjoint_from_training_prompts():
    held = data.heldout_prompts(64)
    assert torch.equal(held, data.heldout_prompts(64))
    assert data.heldout_mask(held).all()
    tr = data.train_prompts(2000, generator=torch.Generator().manual_seed(0))
    assert not data.heldout_mask(tr).any()
    held_set = {bytes(p.numpy().astype("uint8").tobytes()) for p in held}
    assert not any(bytes(p.numpy().astype("uint8").tobytes()) in held_set for p in tr)
    # the hash keeps about 1/16 of all grids
    rnd = torch.randint(0, 10, (4000, 8, 8), generator=torch.Generator().manual_seed(1))
    frac = float(data.heldout_mask(rnd).float().mean())
    assert 0.04 < frac < 0.09


def test_pack_round_trip_and_ids():
    x = torch.randn(3, 1, 64, 64)
    t = data.pack(x)
    assert t.shape == (3, 1024, 4)
    assert torch.equal(data.unpack(t, 64, 64), x)
    # token (r, c) holds pixels [2r:2r+2, 2c:2c+2] in row-major order
    assert torch.equal(t[1, 5 * 32 + 7], x[1, 0, 10:12, 14:16].reshape(4))
    ii, ti = data.img_ids(), data.txt_ids()
    assert ii.shape == (1024, 3) and ti.shape == (64, 3)
    assert torch.equal(ii[5 * 32 + 7], torch.tensor([0.0, 5.0, 7.0]))
    # conditioning token of cell (2, 3) sits at the centre of its 4x4 block of image tokens
    assert torch.equal(ti[2 * 8 + 3], torch.tensor([0.0, 9.5, 13.5]))
    with pytest.raises(ValueError, match="unpack"):
        data.unpack(t, 62, 64)


def test_classifier_accuracy_and_adherence():
    acc = classifier.heldout_accuracy()
    assert acc >= 0.97, acc
    prompts = data.heldout_prompts(8)
    imgs = data.render_mosaics(prompts, data.digit_split("heldout"), torch.Generator().manual_seed(0))
    assert classifier.adherence(imgs, prompts) >= 0.97
    assert classifier.read_cells(imgs).shape == (8, 8, 8)
    shuffled = torch.roll(prompts, 1, dims=2)
    assert classifier.adherence(imgs, shuffled) < 0.3
    noise = torch.rand(8, 1, 64, 64) * 2 - 1
    assert classifier.adherence(noise, prompts) < 0.4
