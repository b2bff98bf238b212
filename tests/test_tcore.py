"""T-Core's phases on constructed problems where the right answer is known."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF
from securetl.defenses._splits import capped_split
from securetl.defenses.tcore.bootstrap import QUOTAS, Trainer, bootstrap, meta_scores
from securetl.defenses.tcore.channels import (
    MaskedBN,
    Tail,
    recover_masks,
    reinit_untrusted,
    unmask,
    untrusted_from_masks,
)
from securetl.defenses.tcore.confusion import confusion_losses, expand_seed
from securetl.defenses.tcore.sifting import label_agreement, sift
from securetl.encoders.resnet import cifar_resnet18
from securetl.interfaces import Defense, LabeledSet
from securetl.pipeline import run


def blobs(n_per_class=60, n_classes=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * 4
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + 0.3 * torch.randn(len(y), dim, generator=g)
    return x, y, g


def test_tis_keeps_clean_and_drops_an_off_cluster_minority():
    x, y, g = blobs()
    # plant a minority inside class 0 that sits far from class 0's cluster, in every layer
    planted = torch.arange(0, 8)
    x[planted] = torch.randn(8, x.shape[1], generator=g) * 0.3 + 12.0
    layers = [x, x @ torch.randn(8, 8, generator=g), torch.tanh(x)]
    res = sift(layers, y, alpha=0.2, k=5, eps_quantile=0.5, min_samples=4)
    assert len(res.seed_idx) == 3 * round(0.2 * 60)
    assert not set(planted.tolist()) & set(res.seed_idx.tolist())
    assert not set(planted.tolist()) & set(res.majority_idx.tolist())
    # the dense core of every class passes the majority rule (the seed needs only its top few)
    assert len(res.majority_idx) >= 0.25 * (len(y) - 8)


def test_density_ceiling_keeps_a_tight_planted_group_out_of_the_seed():
    x, y, g = blobs()
    # 8 % of the data, labelled class 0, shares a "trigger" that makes it far tighter than any real class
    planted = torch.arange(0, 15)
    x[planted] = 6.0 + 0.01 * torch.randn(15, x.shape[1], generator=g)
    layers = [x, x @ torch.randn(8, 8, generator=g), torch.tanh(x)]
    kw = dict(alpha=0.2, k=5, eps_quantile=0.5, min_samples=4)
    plain = sift(layers, y, **kw)
    assert set(planted.tolist()) & set(plain.seed_idx.tolist())  # the two rules alone pick the tight group
    guarded = sift(layers, y, density_ceiling=0.1, **kw)
    assert not set(planted.tolist()) & set(guarded.seed_idx.tolist())
    assert len(guarded.seed_idx) == len(plain.seed_idx)  # seed sizes still follow alpha of each class


def test_label_agreement_keeps_source_class_poisons_out_of_the_seed():
    x, y, g = blobs()
    # dirty-label poisons with class-1 content labelled 0 (TaCT-like: one source class). Judged within class 0
    # alone they are a consistent group of their own; among the whole dataset their neighbours are class 1
    planted = torch.arange(0, 20)
    x[planted] = x[y == 1].mean(0) + 0.3 * torch.randn(20, x.shape[1], generator=g)
    layers = [x, x @ torch.randn(8, 8, generator=g), torch.tanh(x)]
    kw = dict(alpha=0.2, k=5, eps_quantile=0.5, min_samples=4, majority=False)
    plain = sift(layers, y, **kw)
    assert set(planted.tolist()) & set(plain.seed_idx.tolist())  # consistency alone picks them
    guarded = sift(layers, y, agreement=0.5, **kw)
    assert not set(planted.tolist()) & set(guarded.seed_idx.tolist())
    assert len(guarded.seed_idx) == len(plain.seed_idx)


def _tcore_defaults() -> dict:
    """TIS's keyword arguments as conf/defense/tcore.yaml sets them (the defaults a run uses)."""
    cfg = OmegaConf.load(CONF / "defense" / "tcore.yaml")
    keys = ("alpha", "k", "eps_quantile", "min_samples", "density_ceiling", "agreement")
    return {k: cfg[k] for k in keys}


def test_tis_keeps_the_seed_clean_on_a_small_dataset_with_a_tight_poison_cluster():
    # issue 18: about 100 images per class, 10 % of one class a tight cluster of dirty-label poisons (other
    # classes' content, a shared trigger direction), at the YAML's defaults: the seed holds 2 per class
    g = torch.Generator().manual_seed(0)
    n_per, classes, dim = 100, 10, 16
    centres = torch.randn(classes, dim, generator=g) * 2
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + 0.6 * torch.randn(len(y), dim, generator=g)
    source = torch.randint(1, classes, (10,), generator=g)
    trigger = 2 * torch.randn(dim, generator=g)
    poisons = 0.3 * (centres[source] + 0.6 * torch.randn(10, dim, generator=g)) + trigger
    x = torch.cat([x, poisons + 0.05 * torch.randn(10, dim, generator=g)])
    y = torch.cat([y, torch.zeros(10, dtype=torch.long)])
    planted = set(range(n_per * classes, n_per * classes + 10))
    w1, w2 = torch.randn(dim, dim, generator=g), torch.randn(dim, dim, generator=g)
    res = sift([x, torch.relu(x @ w1), torch.tanh(x @ w2)], y, **_tcore_defaults())
    assert not planted & set(res.seed_idx.tolist())
    assert len(res.seed_idx) == classes * 2
    assert (torch.bincount(y[res.seed_idx], minlength=classes) == 2).all()


def test_confusion_training_ranks_shortcut_samples_lowest_loss():
    g = torch.Generator().manual_seed(0)
    n, c, d = 600, 4, 16
    y_true = torch.randint(0, c, (n,), generator=g)
    y_true[:40] = torch.randint(1, c, (40,), generator=g)  # poisons come from non-target classes
    x = torch.randn(n, d, generator=g)
    x[:, :c] += 1.5 * torch.nn.functional.one_hot(y_true, c).float()  # weak semantic signal
    poison = torch.arange(0, 40)
    x[poison, -1] = 8.0  # a strong shortcut feature ...
    y = y_true.clone()
    y[poison] = 0  # ... with a flipped label
    clean = torch.arange(40, n)
    trusted = clean[torch.randperm(len(clean), generator=g)[:30]]
    loss = confusion_losses(x, y, trusted, c, g, lam=20.0, epochs=30, lr=1e-2, batch_size=64, hidden=64)
    lowest = set(torch.argsort(loss)[:40].tolist())
    assert len(lowest & set(poison.tolist())) >= 30  # poisons keep a low loss; clean samples are confused
    assert loss[poison].mean() < loss[clean].mean()


def test_expansion_gate_keeps_unfitted_dirty_label_poisons_out_of_the_subset():
    # dirty-label poisons with class-1 content labelled 0 and no trigger the features carry: confusion
    # training cannot fit them as a shortcut, so their loss ranks them with the clean samples (on Adap-Blend
    # they sit mid-ranking in the target class); their neighbours, though, carry label 1
    x, y, g = blobs(n_per_class=80, dim=8)
    planted = torch.arange(0, 8)
    x[planted] = x[y == 1].mean(0) + 0.3 * torch.randn(8, x.shape[1], generator=g)
    seed = torch.tensor([20, 21, 22, 100, 101, 102, 180, 181, 182])
    kw = dict(lam=20.0, epochs=10, batch_size=64, hidden=32)
    gated = torch.nonzero(label_agreement([x], y, k=10) < 0.2).squeeze(1)
    assert set(planted.tolist()) <= set(gated.tolist())
    assert len(gated) < 20  # the clean samples agree with their labels
    guarded = expand_seed(x, y, seed, 3, torch.Generator().manual_seed(1), (0.6,), exclude=gated, **kw)
    assert not set(planted.tolist()) & set(guarded.subset_idx.tolist())
    # every class still gets its quota (60 % of the median class), from agreeing samples
    assert (torch.bincount(y[guarded.subset_idx], minlength=3) >= round(0.6 * 80)).all()


def _tail(width=4, classes=3):
    enc = cifar_resnet18(width)
    return enc, Tail([enc.stages[-1]], enc.feat_dim, classes)


def test_masks_stay_in_unit_interval_and_reinit_touches_only_untrusted():
    g = torch.Generator().manual_seed(0)
    enc, tail = _tail()
    acts = torch.randn(64, 16, 8, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    masks = recover_masks(tail, acts, y, g, epochs=3, lr=1.0, l1=0.05, batch_size=16)
    for m in masks.values():
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    before = {k: v.clone() for k, v in tail.stages.state_dict().items()}
    untrusted = {n: torch.arange(len(m)) % 3 == 0 for n, m in masks.items()}
    grad_masks = reinit_untrusted(tail, untrusted, g)
    after = tail.stages.state_dict()
    touched_any = False
    for name, _bn in tail.bns():
        bad = untrusted[name]
        for key in ("weight", "bias", "running_mean", "running_var"):
            full = f"{name}.{key}"
            assert torch.equal(after[full][~bad], before[full][~bad]), f"{full} changed a trusted channel"
        assert torch.equal(grad_masks[f"{name}.weight"], bad.float())
    for pname, gm in grad_masks.items():
        if pname.endswith("conv1.weight") or pname.endswith("conv2.weight"):
            rows_changed = (after[pname] != before[pname]).flatten(1).any(1)
            assert not rows_changed[gm.flatten(1)[:, 0] == 0].any()
            touched_any |= bool(rows_changed.any())
    assert touched_any


def test_unmask_folds_masks_into_plain_batchnorm():
    _, tail = _tail()
    x = torch.randn(5, 16, 8, 8)
    for _, bn in tail.bns():
        bn.mask.data.uniform_(0, 1)
    tail.eval()
    want = tail.features(x)
    stage = unmask(tail.stages[0])
    assert not any(isinstance(m, MaskedBN) for m in stage.modules())
    h = stage(x)
    assert torch.allclose(h.mean(dim=(2, 3)), want, atol=1e-5)


def test_bootstrap_pool_grows_monotonically_to_rho_n():
    g = torch.Generator().manual_seed(0)
    enc, tail = _tail()
    n = 120
    acts = torch.randn(n, 16, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    start = torch.arange(0, 40)
    res = bootstrap(
        tail,
        acts,
        y,
        start,
        Trainer(None, 1e-3, 32),
        g,
        rho=0.8,
        loss_guided_steps=2,
        meta_guided_steps=2,
        epochs_per_step=1,
        meta_epochs=1,
        final_epochs=1,
    )
    sizes = [40] + [len(s["pool"]) for s in res.steps]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert len(res.pool_idx) == round(0.8 * n)  # quota="global": the paper's rho |D|
    assert set(start.tolist()) <= set(res.pool_idx.tolist())
    assert [s["kind"] for s in res.steps] == ["loss", "loss", "meta", "meta"]


def test_bootstrap_trains_each_pool_before_it_is_scored_and_the_last_pool_once():
    """Training between expansions serves the next expansion's scores: the pool before each of the four
    expansions gets epochs_per_step on it, the temporary copies of the meta steps train on all of D, and the
    last pool goes straight to the final training (it used to get epochs_per_step more first)."""

    class Spy(Trainer):
        calls: list[tuple[int, int]] = []

        def train(self, tail, acts, y, epochs, g, train_stages=True, cosine=False):
            self.calls.append((len(y), epochs))

    g = torch.Generator().manual_seed(0)
    _, tail = _tail()
    n = 120
    acts = torch.randn(n, 16, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    res = bootstrap(
        tail,
        acts,
        y,
        torch.arange(40),
        Spy(None, 1e-3, 32),
        g,
        rho=0.8,
        epochs_per_step=5,
        meta_epochs=1,
        final_epochs=20,
    )
    pools = [40] + [len(s["pool"]) for s in res.steps]
    assert Spy.calls == [(40, 5), (pools[1], 5), (pools[2], 5), (n, 1), (pools[3], 5), (n, 1), (pools[4], 20)]


@pytest.mark.parametrize("quota", QUOTAS)
def test_bootstrap_never_admits_an_excluded_sample(quota):
    """pool_skips_dense: the samples phase 1 found abnormally tight in an over-dense class stay out of every
    expansion (a class short of them takes what it has), whatever the quota."""
    g = torch.Generator().manual_seed(0)
    _, tail = _tail()
    n = 120
    acts = torch.randn(n, 16, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    barred = torch.nonzero(y == 0).squeeze(1)[5:]
    start = torch.arange(0, n, 4)

    def grow(**kw):
        trainer = Trainer(None, 1e-3, 32)
        return bootstrap(tail, acts, y, start, trainer, g, rho=0.9, epochs_per_step=1, final_epochs=1, **kw)

    res = grow(quota=quota, exclude=barred)
    added = set(res.pool_idx.tolist()) - set(start.tolist())
    assert added and not added & set(barred.tolist())
    if quota == "topup":  # pool_skips_dense=topup: only the last step passes them over
        res = grow(quota=quota, exclude=barred, exclude_in_topup_only=True)
        before_topup = set(res.steps[-2]["pool"].tolist())
        assert before_topup & set(barred.tolist())  # the quota steps took some
        assert not (set(res.pool_idx.tolist()) - before_topup) & set(barred.tolist())


def test_rank_sum_meta_score_does_not_take_slow_high_loss_poisons_first():
    g = torch.Generator().manual_seed(0)
    # 100 clean samples whose loss falls in proportion to how high it is under the short training on all of D;
    # 20 poisons that this training barely picks up: the highest loss, and it hardly moves
    clean = 0.5 + 1.5 * torch.rand(100, generator=g)
    loss1 = torch.cat([clean, 5.0 + torch.rand(20, generator=g)])
    drop = torch.cat([0.3 * clean + 0.02 * torch.rand(100, generator=g), 0.05 * torch.rand(20, generator=g)])
    poisons = set(range(100, 120))
    first = lambda score: set(torch.argsort(score)[:30].tolist())  # noqa: E731
    # the paper's rule takes them first; the rank sum does not
    assert first(meta_scores(loss1, loss1 - drop, "reduction")) >= poisons
    assert not first(meta_scores(loss1, loss1 - drop, "rank_sum")) & poisons


def test_balanced_quota_reaches_rho_n_on_balanced_data_and_caps_an_inflated_class():
    g = torch.Generator().manual_seed(0)
    _, tail = _tail()
    per, c = 30, 3
    y = torch.arange(c).repeat_interleave(per)
    y = torch.cat([y, torch.zeros(per, dtype=torch.long)])  # class 0 doubled, as dirty-label poison does
    acts = torch.randn(len(y), 16, 8, 8, generator=g)
    start = torch.cat([torch.nonzero(y == k).squeeze(1)[:5] for k in range(c)])
    kw = dict(
        rho=0.8, loss_guided_steps=1, meta_guided_steps=1, epochs_per_step=1, meta_epochs=1, final_epochs=1
    )
    res = bootstrap(tail, acts, y, start, Trainer(None, 1e-3, 32), g, quota="balanced", **kw)
    counts = torch.bincount(y[res.pool_idx], minlength=c)
    assert counts.tolist() == [round(0.8 * per)] * c  # every class at rho * the median size, class 0 included
    sizes = [len(start)] + [len(s["pool"]) for s in res.steps]
    assert sizes == sorted(sizes)
    assert set(start.tolist()) <= set(res.pool_idx.tolist())
    glob = bootstrap(_tail()[1], acts, y, start, Trainer(None, 1e-3, 32), g, quota="global", **kw)
    assert len(glob.pool_idx) == round(0.8 * len(y))  # global: rho |D|, the inflated class may take more


def test_capped_split_takes_the_lowest_scores_but_no_class_beyond_its_cap():
    score = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 5.0, 6.0])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    picked = capped_split(score, y, torch.tensor([2, 3, 1]), 5)
    assert picked.tolist() == [0, 1, 4, 5, 6]  # class 0 stops at 2 although its next scores are lower
    assert capped_split(score, y, torch.tensor([0, 0, 5]), 3).tolist() == [7]  # only what the caps allow


def test_topup_quota_leaves_out_a_clean_label_cluster_that_a_balanced_quota_must_take():
    """SIG's shape: 20 % of one class are poisons that a clean model finds hard (the overlay hides their content)
    and whose loss falls fastest under training on all of D. A balanced quota at rho = 0.9 must take half of
    them; the top-up step ranks globally and can leave them out."""
    g = torch.Generator().manual_seed(0)
    per, c = 40, 3
    y = torch.arange(c).repeat_interleave(per)
    poison = torch.nonzero(y == 0).squeeze(1)[-8:]  # 20 % of class 0
    means = torch.randn(c, 16, generator=g) * 3
    acts = (means[y] + 0.5 * torch.randn(len(y), 16, generator=g)).view(-1, 16, 1, 1).repeat(1, 1, 2, 2)
    acts[poison] = acts[poison] - means[0].view(1, 16, 1, 1) + means[1].view(1, 16, 1, 1)  # hidden content
    acts[poison, :, 0, 0] += 4.0  # a trigger the short training on all of D fits first
    y_given = y.clone()
    start = torch.cat([torch.nonzero(y == k).squeeze(1)[:6] for k in range(c)])
    kw = dict(loss_guided_steps=1, meta_guided_steps=2, epochs_per_step=2, meta_epochs=2, final_epochs=1)
    res = {}
    for quota in ("balanced", "topup"):
        torch.manual_seed(0)
        _, tail = _tail()
        res[quota] = bootstrap(
            tail,
            acts,
            y_given,
            start,
            Trainer(None, 1e-2, 16),
            g,
            rho=0.9,
            quota=quota,
            class_rho=0.8,
            meta_score="rank_sum",
            **kw,
        )
    took = {q: int(torch.isin(r.pool_idx, poison).sum()) for q, r in res.items()}
    assert took["balanced"] >= 4  # 0.9 * 40 = 36 of class 0's 40 samples: at least 4 of its 8 poisons
    assert len(res["topup"].pool_idx) == round(0.9 * per * c)
    assert took["topup"] < took["balanced"]


class Spy(Defense):
    """Records what the pipeline hands a defense."""

    seen: list = []

    def train(self, encoder, train, probe, ctx):
        Spy.seen.append(train)
        return super().train(encoder, train, probe, ctx)


def test_defense_never_receives_poison_idx(compose_cfg, monkeypatch):
    import securetl.pipeline as pipeline

    real_build = pipeline.build

    def build(node, **kw):
        return Spy() if str(node.get("_target_", "")).endswith("NoDefense") else real_build(node, **kw)

    monkeypatch.setattr(pipeline, "build", build)
    Spy.seen.clear()
    run(compose_cfg(["data_attack=badnets"]))
    (seen,) = Spy.seen
    assert type(seen) is LabeledSet
    assert not hasattr(seen, "poison_idx") and not hasattr(seen, "cover_idx")


def test_tcore_runs_end_to_end_and_reports_diagnostics(compose_cfg):
    row = run(
        compose_cfg(
            [
                "defense=tcore",
                "data_attack=badnets",
                "defense.fit_epochs=1",
                "defense.recover_epochs=1",
                "defense.epochs_per_step=1",
                "defense.final_epochs=1",
                "defense.confusion_epochs=2",
                "defense.ref_epochs=2",
            ]
        )
    )
    d = row["diagnostics"]
    for key in (
        "seed/size",
        "seed/n_poison",
        "subset/purity",
        "kept/size",
        "tcore/untrusted_channels",
        "time/tcore_tis",
        "time/tcore_bootstrap",
        "subset_round1/purity",
        "pool_step1_loss/purity",
    ):
        assert key in d, key
    # pool_quota=balanced: each class up to rho * the median class size, so BadNets' inflated target class
    # is capped and the pool stays at or under rho |D|
    assert 0.6 * 300 <= d["kept/size"] <= round(0.8 * 300)


def test_untrusted_share_is_capped_lowest_masks_first():
    masks = {"a": torch.tensor([0.1, 0.2, 0.9, 0.3]), "b": torch.tensor([0.05, 0.6, 0.4, 0.8, 0.15, 0.25])}
    plain = untrusted_from_masks(masks, sigma=0.7)
    assert int(sum(int(u.sum()) for u in plain.values())) == 8
    capped = untrusted_from_masks(masks, sigma=0.7, max_fraction=0.5)
    assert int(sum(int(u.sum()) for u in capped.values())) == 5
    assert capped["a"].tolist() == [True, True, False, False]
    assert capped["b"].tolist() == [True, False, False, False, True, True]
