import torch
import torch.nn.functional as F

from fedclip.data.schema import CONDITIONS, Split
from fedclip.data.tensors import PairData, load_pairs
from fedclip.evaluation.retrieval import retrieval_recall
from fedclip.evaluation.zero_shot import zero_shot_accuracy
from fedclip.models.factory import ModelConfig, create_model


class LookupModel(torch.nn.Module):
    """Unit-test stand-in: images and texts are ids; embeddings come from fixed tables."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor):
        super().__init__()
        self.image_table = torch.nn.Parameter(image_table)
        self.text_table = text_table

    def encode_image(self, images):
        return self.image_table[images[:, 0, 0, 0].long()]

    def encode_text(self, tokens):
        return self.text_table[tokens[:, 0].long()]


def _pairs(n: int, conditions: list[str]) -> PairData:
    ids = torch.arange(n)
    return PairData(
        images=ids.view(n, 1, 1, 1).float(),
        tokens=ids.view(n, 1),
        patient_ids=("p",) * n,
        names=("n",) * n,
        conditions=tuple(conditions),
        record_ids=tuple(map(str, range(n))),
    )


def test_retrieval_recall_on_hand_made_embeddings():
    emb = F.normalize(torch.eye(4), dim=-1)
    perfect = retrieval_recall(LookupModel(emb, emb), _pairs(4, ["pneumonia"] * 4), ks=(1, 2))
    assert perfect == {
        "image_to_text_r1": 1.0,
        "image_to_text_r2": 1.0,
        "text_to_image_r1": 1.0,
        "text_to_image_r2": 1.0,
    }
    # text of pair 0 points away from image 0 and towards image 1: pair 0 fails both ways
    text = emb.clone()
    text[0] = F.normalize(torch.tensor([-0.5, 1.0, 0.0, 0.0]), dim=0)
    partial = retrieval_recall(LookupModel(emb, text), _pairs(4, ["pneumonia"] * 4), ks=(1,))
    assert partial["image_to_text_r1"] == 0.75 and partial["text_to_image_r1"] == 0.75
    # ties count against the model: identical embeddings everywhere retrieve nothing at k=1
    flat = F.normalize(torch.ones(4, 4), dim=-1)
    assert retrieval_recall(LookupModel(flat, flat), _pairs(4, ["pneumonia"] * 4), ks=(1,))["image_to_text_r1"] == 0.0


def test_zero_shot_uses_prompt_ensembles_of_class_names():
    calls = []

    def tokenizer(texts):
        calls.extend(texts)
        # token id = index of the class named in the prompt
        return torch.tensor([[next(i for i, c in enumerate(CONDITIONS) if c in t)] for t in texts])

    classes = F.normalize(torch.eye(5, 8), dim=-1)
    images = classes[[0, 1, 2, 3, 4, 0]]
    labels = list(CONDITIONS) + ["pneumonia"]  # the last image is labelled wrongly on purpose
    acc = zero_shot_accuracy(LookupModel(images, classes), tokenizer, _pairs(6, labels), templates=("a {}", "b {}"))
    assert abs(acc - 5 / 6) < 1e-6
    assert len(calls) == 10 and "a pneumonia" in calls


def test_warm_start_is_well_above_chance_and_random_init_is_not(small_manifest, warm_checkpoint):
    heldout = small_manifest.rows(Split.HELDOUT)
    scores = {}
    for label, pretrained in (("random", ""), ("warm", str(warm_checkpoint))):
        torch.manual_seed(0)
        bundle = create_model(ModelConfig(pretrained=pretrained))
        data = load_pairs(heldout, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
        scores[label] = zero_shot_accuracy(bundle.model, bundle.tokenizer, data)
    chance = 1 / len(CONDITIONS)
    assert scores["random"] < chance + 0.15, scores
    assert scores["warm"] > chance + 0.25, scores


def test_warm_start_is_cached(small_manifest_path, warm_checkpoint):
    from fedclip.training.warmstart import warm_start
    from tests.conftest import SMALL_WARM

    mtime = warm_checkpoint.stat().st_mtime_ns
    again = warm_start(small_manifest_path, cache_dir=warm_checkpoint.parent, config=SMALL_WARM)
    assert again == warm_checkpoint and again.stat().st_mtime_ns == mtime
