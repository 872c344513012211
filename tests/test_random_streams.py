"""Every random stream follows its owner: the seed it must follow moves it, and nothing else does.

Training (and distillation, with its time proposal as the timesteps) draws timesteps, label dropout, flips, posterior samples and diffusion noise from one generator each
(speedpipe.randomness), so SpeeD's dual draws (half as many timesteps drawn), another dropout rate, a flip switched
off or latents without a posterior leave every other stream's numbers as they were: baseline and SpeeD runs of one
seed see the same noise, masks and flips. Sampling draws its labels and each batch's noise from streams of their own.
The initialisation does not depend on the number of ranks (test_train.py's two-process run uses seed 1 for that).
"""
import pytest
import torch

from speedpipe.consistency.objectives import TimeProposal
from speedpipe.diffusion import create_diffusion
from speedpipe.diffusion.timesteps import build_sampler
from speedpipe.randomness import stream_seed
from speedpipe.stages.sample import batch_noise, make_labels
from speedpipe.training import StepRandomness

DIFFUSION = create_diffusion("")
BASE = {"seed": 3, "sampler": "uniform", "class_dropout_prob": 0.1, "random_flip": True, "posterior_latents": True}
NAMES = ("t", "drop", "flip", "posterior", "noise")


def two_steps(seed, sampler, class_dropout_prob, random_flip, posterior_latents):
    sampler = {"uniform": lambda: build_sampler("uniform", DIFFUSION), "speed": lambda: build_sampler("speed", DIFFUSION, k=5, tau=700),
               "proposal": lambda: TimeProposal(0.5, -1.0, 1.4)}[sampler]()  # the distill stage's times
    r = StepRandomness(seed, sampler, (2, 2, 2), class_dropout_prob, random_flip, posterior_latents, "cpu")
    first, second = r.draw(16, 1), r.draw(16, 2)
    return {name: (a, b) for name, a, b in zip(NAMES, first, second)}


def same(a, b):
    return all(x is None and y is None or x is not None and y is not None and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("change,moves", [
    ({"seed": 4}, set(NAMES)),
    ({"sampler": "speed"}, {"t"}),  # dual draws: ⌊n/2⌋ + 1 drawn, the rest mirrored
    ({"sampler": "proposal"}, {"t"}),  # the consistency time proposal (float64 draws)
    ({"class_dropout_prob": 0.5}, {"drop"}),
    ({"random_flip": False}, {"flip"}),
    ({"posterior_latents": False}, {"posterior"}),
])
def test_each_training_stream_moves_with_its_seed_and_with_nothing_else(change, moves):
    base, changed = two_steps(**BASE), two_steps(**{**BASE, **change})
    moved = {name for name in NAMES if not same(base[name], changed[name])}
    assert moved == moves


def test_a_resumed_stream_continues_where_it_stopped():
    """The generators are what a checkpoint saves: restored, the next step draws what an uninterrupted run draws."""
    sampler = build_sampler("uniform", DIFFUSION)
    run = StepRandomness(3, sampler, (2, 2, 2), 0.1, True, True, "cpu")
    run.draw(16, 1)
    saved = {name: g.get_state() for name, g in run.generators.items()}
    expected = run.draw(16, 2)
    resumed = StepRandomness(3, sampler, (2, 2, 2), 0.1, True, True, "cpu")
    for name, g in resumed.generators.items():
        g.set_state(saved[name])
    assert same(resumed.draw(16, 2), expected)


def test_sampling_labels_follow_their_mode_and_seed_and_not_the_noise_stream():
    """balanced: class i mod C in order, whatever the seed; random: uniform over the classes, moved by the seed only,
    and not the numbers of any batch's noise stream (seed 0 and batch 0 used to share a generator)."""
    assert make_labels(10, 4, "balanced", 0).tolist() == make_labels(10, 4, "balanced", 7).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    a, b = make_labels(40_000, 10, "random", 0), make_labels(40_000, 10, "random", 1)
    assert not torch.equal(a, b) and torch.equal(a, make_labels(40_000, 10, "random", 0))
    counts = torch.bincount(a, minlength=10).float()
    assert ((counts - 4000).abs() < 4 * 60).all()  # binomial sd √(40,000·0.1·0.9) = 60
    noise_bits = torch.randint(0, 10, (40_000,), generator=batch_noise(0, 0))
    assert not torch.equal(a, noise_bits)


def test_stream_seeds_are_distinct_and_stable():
    seeds = {stream_seed(s, name) for s in range(3) for name in ("init", "timesteps", "noise", "labels", "noise:0", "noise:1")}
    assert len(seeds) == 18 and all(0 <= s < 2**63 for s in seeds)
    # pinned: a changed derivation would silently change every run's numbers (then bump the stages' versions)
    assert (stream_seed(0, "init"), stream_seed(1, "noise:0")) == (6330864514314334385, 4086320931417985742)


def test_the_data_order_is_one_permutation_per_seed_and_epoch_whatever_the_batch_size():
    from speedpipe.data.order import EpochBatches

    def epoch(seed, batch):
        order = EpochBatches(24, batch, seed)
        return torch.cat([order.next_global_batch() for _ in range(24 // batch)])

    assert torch.equal(epoch(3, 4), epoch(3, 8)) and sorted(epoch(3, 4).tolist()) == list(range(24))
    assert not torch.equal(epoch(3, 4), epoch(4, 4))
    order = EpochBatches(24, 8, 3)
    first, second = [torch.cat([order.next_global_batch() for _ in range(3)]) for _ in range(2)]
    assert not torch.equal(first, second)  # a fresh permutation each epoch
