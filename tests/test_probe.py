"""Probing API: metrics vs hand-computed values, vocabularies, learning on synthetic tasks, caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_wave

from distill.config import DataConfig
from distill.data.loader import load_audio_dataset, make_eval_batches
from distill.build import single_upstream_teacher, upstream_names
from distill.evaluation.metrics import ctc_greedy, edit_distance, error_rate
from distill.evaluation.extractors import hf_encoder_extractor, teacher_extractor, wants_normalised
from distill.evaluation.probe import run_probe
from distill.evaluation.tasks import ProbeResult, ProbeTask
from teachers import FusedTeacher, load_upstream, wav2vec_num_frames

HOP = 100  # synthetic extractors: one frame per 100 samples
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"




# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "ref, hyp, expected",
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("abc", "abc", 0), ("", "abc", 3), ("abc", "", 3),
     ("intention", "execution", 5), (["ð", "ə"], ["d", "ə", "ə"], 2)],
)
def test_edit_distance_hand_examples(ref, hyp, expected):
    assert edit_distance(ref, hyp) == expected
    assert edit_distance(hyp, ref) == expected  # symmetric for unit costs


@pytest.mark.parametrize(
    "path, expected",
    [([0, 3, 3, 0, 3, 1, 1, 0], [3, 3, 1]), ([0, 0, 0], []), ([2, 2, 2], [2]), ([1, 0, 1, 2, 2], [1, 1, 2])],
)
def test_ctc_greedy_merges_repeats_then_drops_blanks(path, expected):
    assert ctc_greedy(path) == expected
    # The same as torch's merge-then-filter.
    assert [i for i in torch.unique_consecutive(torch.tensor(path)).tolist() if i != 0] == expected


def test_error_rate_is_corpus_level():
    # (1 deletion in "abcd") + (1 insertion after "xy") over 4 + 2 reference characters.
    assert error_rate(["abcd", "xy"], ["abd", "xyz"]) == pytest.approx(2 / 6)
    assert error_rate(["ab"], ["ab"]) == 0.0
    assert error_rate([""], [""]) == 0.0 and error_rate([""], ["a"]) == 1.0
    with pytest.raises(ValueError, match="2 references vs 1"):
        error_rate(["a", "b"], ["a"])


# --------------------------------------------------------------------------- tasks


def test_probe_task_vocab_from_batches():
    batches = [{"texts": ["ab a"], "phonemes": ["ðə kˈɛ"], "labels": ["x"]},
               {"ids": [], "skipped": {"empty": 1}},  # a batch of skipped rows carries no labels
               {"texts": ["ca"], "phonemes": ["ɐ"], "labels": ["y"]}]
    text = ProbeTask.from_batches(batches, "ctc", "text")
    assert text.vocab == [" ", "a", "b", "c"] and text.encode("cab z") == [4, 2, 3, 1]  # z unknown: dropped
    phones = ProbeTask.from_batches(batches, "ctc", "phonemes")
    assert phones.vocab == sorted(set("ðə kˈɛɐ")) and "ˈ" in phones.vocab and " " in phones.vocab
    labels = ProbeTask.from_batches(batches, "classification", "label")
    assert labels.vocab == ["x", "y"] and labels.encode("y") == [1] and labels.encode("q") == [-1]
    assert labels.labels_of({"labels": ["x"]}) == ["x"] and text.labels_of({"text": ["a"]}) == ["a"]
    # Only what the batches hold: a later batch's symbols are not in a vocabulary built without it.
    assert ProbeTask.from_batches(batches[:1], "ctc", "text").vocab == [" ", "a", "b"]
    assert ProbeTask.from_batches(iter(batches), "classification", "label").vocab == ["x", "y"]  # one pass


def test_probe_task_errors():
    with pytest.raises(ValueError, match=r"no 'phonemes' labels in the batches; keys: labels, texts"):
        ProbeTask.from_batches([{"texts": ["a"], "labels": ["x"]}], "ctc", "phonemes")
    with pytest.raises(ValueError, match="empty vocabulary"):
        ProbeTask.from_batches([{"texts": [""]}], "ctc", "text")
    with pytest.raises(ValueError, match="kind='regression'"):
        ProbeTask("regression", "text", ["a"])
    with pytest.raises(KeyError, match="no 'text' labels"):
        ProbeTask("ctc", "text", ["a"]).labels_of({"labels": ["x"]})


def test_probe_task_on_demo_corpus():
    data = DataConfig(dataset_name=str(DEMO))
    batches = list(make_eval_batches(load_audio_dataset(data, "train"), data, 8))
    assert ProbeTask.from_batches(batches, "classification", "label").vocab == ["en+f2", "en+m3", "en-gb-x-rp", "en-us"]
    assert set("the kettle") <= set(ProbeTask.from_batches(batches, "ctc", "text").vocab)
    first = list(make_eval_batches(load_audio_dataset(data, "train"), data, 2, max_items=2))
    assert ProbeTask.from_batches(first, "ctc", "text").vocab == sorted(set("".join(first[0]["texts"])))


# --------------------------------------------------------------------------- synthetic tasks


class CountingExtractor:
    """Features (3, B, S // HOP, 8): noise, plus in layer 1 a one-hot of the waveform's value per frame."""

    def __init__(self):
        self.calls, self.items = 0, 0

    def __call__(self, waveforms, lengths):
        self.calls, self.items = self.calls + 1, self.items + len(lengths)
        frames = lengths // HOP
        values = waveforms[:, ::HOP][:, : int(frames.max())].round().long()  # (B, T)
        generator = torch.Generator().manual_seed(int(waveforms.sum()) % 1000)
        features = 0.3 * torch.randn(3, *values.shape, 8, generator=generator)
        features[1] += 2.0 * torch.nn.functional.one_hot(values, 8).float()
        return features, frames


def _batch(values_per_item, key, labels):
    lengths = torch.tensor([len(v) * HOP for v in values_per_item])
    waveforms = torch.zeros(len(values_per_item), int(lengths.max()))
    for b, values in enumerate(values_per_item):
        waveforms[b, : lengths[b]] = torch.tensor(values, dtype=torch.float).repeat_interleave(HOP)
    return {"waveforms": waveforms, "lengths": lengths, "ids": [str(i) for i in range(len(labels))], key: labels}


def _classification_batches(count, seed):
    rng, batches = torch.Generator().manual_seed(seed), []
    for _ in range(count):
        classes = torch.randint(0, 3, (4,), generator=rng).tolist()
        sizes = torch.randint(5, 12, (4,), generator=rng).tolist()
        batches.append(_batch([[c + 1] * n for c, n in zip(classes, sizes)], "labels", [f"c{c}" for c in classes]))
    return batches


def _ctc_batches(count, seed):
    """Utterances of 2-5 symbols from 'abc', each symbol 3 frames of value 1..3, 2 silent frames between."""
    rng, batches = torch.Generator().manual_seed(seed), []
    for _ in range(count):
        texts = ["".join("abc"[i] for i in torch.randint(0, 3, (int(n),), generator=rng).tolist())
                 for n in torch.randint(2, 6, (4,), generator=rng)]
        values = [[v for ch in text for v in [0, 0] + [" abc".index(ch)] * 3] + [0, 0] for text in texts]
        batches.append(_batch(values, "texts", texts))
    return batches


def test_run_probe_learns_separable_classification():
    task = ProbeTask("classification", "label", ["c0", "c1", "c2"])
    extract = CountingExtractor()
    train, dev = _classification_batches(6, 0), _classification_batches(3, 1)
    result = run_probe(extract, train, dev, task, steps=40, learning_rate=1e-2, batch_size=4)
    assert isinstance(result, ProbeResult) and result.metric == "accuracy" and not result.lower_is_better
    assert result.score == 1.0 and result.num_train == 24 and result.num_dev == 12
    assert extract.calls == 9 and extract.items == 36  # frozen features: each utterance extracted once
    again = run_probe(CountingExtractor(), train, dev, task, steps=40, learning_rate=1e-2, batch_size=4)
    assert again == result  # deterministic for a seed
    hconv = run_probe(CountingExtractor(), train, dev, task, interface="hconv", steps=40, learning_rate=1e-2)
    assert hconv.score == 1.0


@pytest.mark.parametrize("head", ["linear", "lstm"])
def test_run_probe_learns_synthetic_ctc(head):
    task = ProbeTask("ctc", "text", ["a", "b", "c"])
    train, dev = _ctc_batches(8, 0), _ctc_batches(3, 1)
    result = run_probe(CountingExtractor(), train, dev, task, steps=80, learning_rate=3e-2, batch_size=8, head=head,
                       head_dim=32)
    assert result.metric == "cer" and result.lower_is_better
    # Chance is about 1.0 (an untrained probe emits blanks or noise); the symbols are readable here.
    assert result.score < 0.2, result


def test_feature_grad_trains_transform_on_cached_features():
    task = ProbeTask("classification", "label", ["c0", "c1", "c2"])
    extract, projection, seen = CountingExtractor(), torch.nn.Linear(8, 4), []

    def transform(features):
        seen.append(torch.is_grad_enabled())
        return projection(features)

    before = projection.weight.detach().clone()
    train, dev = _classification_batches(4, 0), _classification_batches(2, 1)
    result = run_probe(extract, train, dev, task, steps=20, learning_rate=1e-2, batch_size=4,
                       extra_parameters=projection.parameters(), feature_grad=True, transform=transform)
    assert extract.calls == 6 and extract.items == 24  # the upstream part still ran once per utterance
    assert sum(seen) == 20  # the transform ran with gradients once per training step
    assert not torch.equal(before, projection.weight) and result.num_train == 16
    with pytest.raises(ValueError, match="feature_grad=True trains through `transform`"):
        run_probe(extract, train, dev, task, feature_grad=True)


# --------------------------------------------------------------------------- extractors


def test_hf_encoder_extractor_matches_unpadded_upstream(tiny_upstream_dirs):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_upstream_dirs["hubert"])
    waves = [make_wave(1.0, 0), make_wave(0.61, 1)]
    batch = torch.zeros(2, 16000)
    batch[0], batch[1, : waves[1].numel()] = waves[0], waves[1]
    model.train()
    features, frames = hf_encoder_extractor(model)(batch, torch.tensor([16000, waves[1].numel()]))
    assert model.training  # the caller's mode is restored
    assert frames.tolist() == [wav2vec_num_frames(16000), wav2vec_num_frames(waves[1].numel())]
    assert features.shape == (3, 2, 49, 32)
    reference = load_upstream(tiny_upstream_dirs["hubert"])(waves).hidden_states  # the teacher's own adapter
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=0)
    normed, _ = hf_encoder_extractor(model, normalize=True)(batch, torch.tensor([16000, waves[1].numel()]))
    assert not torch.allclose(normed, features)


def test_teacher_extractor(tiny_upstream_dirs):
    spec = {"upstreams": [tiny_upstream_dirs["wavlm"], tiny_upstream_dirs["hubert"]], "projection_dim": 8}
    teacher = FusedTeacher.from_config(spec)
    batch, lengths = torch.stack([make_wave(0.5, 0), make_wave(0.5, 1)]), torch.tensor([8000, 6000])
    with pytest.raises(ValueError, match="not fitted"):
        teacher_extractor(teacher)
    raw, frames = teacher_extractor(teacher, project=False)(batch, lengths)
    assert raw.shape == (3, 2, 24, 64) and frames.tolist() == [24, 18]
    teacher.fitted = True
    projected, _ = teacher_extractor(teacher)(batch, lengths)
    torch.testing.assert_close(projected, teacher.project(raw))


def test_wants_normalised_is_the_teachers_rule(tiny_upstream_dirs, tmp_path):
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    for kind in ("hubert", "wav2vec2", "data2vec-audio"):
        model = AutoModel.from_pretrained(tiny_upstream_dirs[kind])
        assert wants_normalised(model) == load_upstream(tiny_upstream_dirs[kind]).do_normalize, kind
    assert not wants_normalised(AutoModel.from_pretrained(tiny_upstream_dirs["hubert"]))  # group norm, no preprocessor
    # A preprocessor config beside the weights decides, for the probe as for the teacher.
    folder = tmp_path / "hubert_normalised"
    AutoModel.from_pretrained(tiny_upstream_dirs["hubert"]).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(folder)
    assert wants_normalised(AutoModel.from_pretrained(folder)) and load_upstream(str(folder)).do_normalize


def test_upstream_names_and_single_upstream_teachers(tiny_upstream_dirs):
    from conftest import tiny_config

    spec = {"upstreams": [tiny_upstream_dirs["wavlm"], tiny_upstream_dirs["hubert"], tiny_config("hubert"),
                          tiny_config("hubert")], "projection_dim": 48}
    teacher = FusedTeacher.from_config(spec)
    assert upstream_names(teacher) == ["wavlm", "hubert", "hubert(random-init) #2", "hubert(random-init) #3"]
    probe_view = single_upstream_teacher(teacher, 1)
    assert probe_view.upstreams[0] is teacher.upstreams[1]  # shared, not loaded again
    assert probe_view.projection is None and probe_view.fitted and probe_view.specs == [teacher.specs[1]]
    fit_view = single_upstream_teacher(teacher, 0, fit=True)
    assert fit_view.upstreams[0] is teacher.upstreams[0] and not fit_view.fitted
    assert fit_view.projection_fit == "supervised" and fit_view.fusion == teacher.fusion
    assert fit_view.projection.out_features == 32  # capped at the upstream's width (48 > 32)
