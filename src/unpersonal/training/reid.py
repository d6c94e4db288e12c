"""`unpersonal fit-reid`: train the patient re-identification network on training patients.

Training. Each step draws P = batch_size / 2 training patients that have two or more images,
two different images of each, and a random view of every image (`random_views`, reid.augment),
so the network learns what stays the same across one patient's acquisitions rather than what a
re-exposure, shift or rotation changes. With data.no_patient_ids every image is its own patient
and the positives are two views of one image. With `instance_share` > 0 that share of the pairs
are instead two strong views (`copy_augment`: flips, large crops and rotations, gamma) of one
training image of any patient, so that the single-image patients, most of them, teach it too.
Measured on Kermany (benchmarks/detector.py) this lowered the held-out verification AUC and
did not make flipped or cropped copies stand out from held-out images: one embedding serves
identity and copies poorly, so it is off by default.

The loss. `bce` is binary cross-entropy on the pair score over balanced pairs: every
same-patient pair of the batch (P of them) and as many different-patient pairs, a share
`hard_negatives` of them the most similar in the batch, the rest random. `supcon` (the default)
is the supervised contrastive loss (Khosla et al. 2020): each image must pick out its partner
among all 2P - 1 others, so one batch gives 2P(2P - 2) negatives instead of P and weighs them by
how hard they are through the softmax. The embedding then learns from every pair it computes,
which is what matters with a few hundred training patients; the score's scale and bias still
fit by the balanced BCE, on detached cosines. Measured on Kermany (586 training patients with
2+ images, 32 px, width 16, 600 steps, validation/test AUC): bce 0.858/0.914, supcon + bce on
the same embedding 0.871/0.917, supcon 0.896/0.927.

Held-out pairs (validation and the final report), per split, from its patients only:
  * same-patient: every pair of two images of one patient (patients with 2+ images), at most
    MAX_SAME_PAIRS of them (a seeded subset when there are more);
  * different-patient: as many pairs of two images of different patients, drawn at random
    (seeded) from all the split's images, single-image patients included;
  * near-identical pairs (pixel correlation above NEAR_COPY_CORRELATION) are left out of both:
    they are the same scan stored twice, which any network matches, and would flatter the AUC.
  With data.no_patient_ids the same-patient pairs are two fixed random views of one image.
The val+test AUC pools both pair sets. Early stopping watches the validation AUC every
`validate_every` steps and keeps the best weights, with BatchNorm statistics re-measured on
clean training images (`with_clean_batch_norm`). The threshold is the score that flags
`sensitivity` of the validation same-patient pairs; the test pairs, used for choosing nothing,
report how many same-patient pairs it really flags, and both splits how many different-patient
pairs it flags too (the false-positive rate).

    run/.work/fit-reid/checkpoint.pt   resumable state (weights, best weights, Adam, step, log)
    run/fit-reid/                      published when training ends:
        reid.safetensors    the best weights (by validation AUC)
        reid.json           architecture, threshold, AUCs, pair counts, rates, steps, seconds
        training_log.csv    step, loss, val_auc (where measured)
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from unpersonal.artifacts.reid import cosine_to_score
from unpersonal.config import ReidConfig, ViewAugmentation
from unpersonal.data.canonical import CanonicalDataset
from unpersonal.errors import UserError
from unpersonal.models.reid import ReidNet
from unpersonal.rundir import write_atomic
from unpersonal.torch_utils import step_seed
from unpersonal.training.common import cosine_lr
from unpersonal.training.loop import BestSoFar, SeededBatches, TrainingLoop, write_log
from unpersonal.training.views import random_views

LOG_FIELDS = ("step", "loss", "val_auc")
MAX_SAME_PAIRS = 5000
NEAR_COPY_CORRELATION = 0.99
EMBED_BATCH = 256
SCORE_LR_MULTIPLIER = 10.0
# Random streams apart from the training steps' (which use rank 0): the fixed held-out views,
# and the clean training images BatchNorm statistics are measured on.
HELD_OUT_VIEW_STREAM = 1
BATCH_NORM_STREAM = 3
BATCH_NORM_IMAGES = 512


@dataclass
class PatientGroups:
    """Images grouped by patient, flat: group k is members[starts[k] : starts[k] + counts[k]]."""

    members: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)


def group_patients(patient_id: np.ndarray, min_images: int) -> PatientGroups:
    """Row indices of each patient with at least `min_images` images, in patient-ID order."""
    order = np.argsort(patient_id, kind="stable")
    _, first, counts = np.unique(patient_id[order], return_index=True, return_counts=True)
    keep = counts >= min_images
    groups = [order[start:start + count] for start, count in zip(first[keep], counts[keep])]
    counts = counts[keep]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    members = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    return PatientGroups(members, starts, counts)


@dataclass
class PairSet:
    """Held-out verification pairs of one split.

    Pairs index a table of images to embed: the images themselves, or with `views` two fixed
    random views of each ([views A; views B]), where a pair (i, M + i) is an image and its view.
    """

    images: np.ndarray  # canonical dtype [M, R, R]: only the images some pair uses
    max_value: float
    a: np.ndarray
    b: np.ndarray
    same: np.ndarray  # bool: same patient
    views: bool
    near_copies_left_out: int

    def __len__(self) -> int:
        return len(self.same)

    def counts(self) -> dict[str, int]:
        return {"same_patient": int(self.same.sum()), "different_patient": int((~self.same).sum()),
                "near_copies_left_out": self.near_copies_left_out}


def held_out_pairs(split_data: CanonicalDataset, no_patient_ids: bool, seed: int, split: str
                   ) -> PairSet:
    """The verification pairs of one held-out split (see the module docstring for the rules)."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    max_value = float((1 << split_data.bit_depth) - 1)
    if no_patient_ids:
        rows = np.sort(rng.permutation(len(split_data))[:MAX_SAME_PAIRS])
        m = len(rows)
        a_same, b_same = np.arange(m), m + np.arange(m)
        a_diff, b_diff = _different_pairs(np.arange(m), split_data.images[rows], m, rng)
        return PairSet(split_data.images[rows], max_value, np.concatenate([a_same, a_diff]),
                       np.concatenate([b_same, m + b_diff]),
                       np.r_[np.ones(m, bool), np.zeros(len(a_diff), bool)], True, 0)
    groups = group_patients(split_data.patient_id, min_images=2)
    a_same, b_same = _same_patient_pairs(groups)
    copies = _near_copy(split_data.images, a_same, b_same)
    a_same, b_same = a_same[~copies], b_same[~copies]
    if len(a_same) > MAX_SAME_PAIRS:
        keep = np.sort(rng.permutation(len(a_same))[:MAX_SAME_PAIRS])
        a_same, b_same = a_same[keep], b_same[keep]
    patient = np.unique(split_data.patient_id, return_inverse=True)[1]
    a_diff, b_diff = _different_pairs(patient, split_data.images, len(a_same), rng)
    a, b = np.concatenate([a_same, a_diff]), np.concatenate([b_same, b_diff])
    used, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    return PairSet(split_data.images[used], max_value, inverse[:len(a)], inverse[len(a):],
                   np.r_[np.ones(len(a_same), bool), np.zeros(len(a_diff), bool)], False,
                   int(copies.sum()))


def _near_copy(images: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether images a[k] and b[k] correlate above NEAR_COPY_CORRELATION, pixel by pixel."""
    out = np.zeros(len(a), bool)
    for start in range(0, len(a), EMBED_BATCH):
        chunk = slice(start, start + EMBED_BATCH)
        x, y = (_standardised(images[rows[chunk]]) for rows in (a, b))
        out[chunk] = (x * y).sum(axis=1) > NEAR_COPY_CORRELATION
    return out


def _standardised(images: np.ndarray) -> np.ndarray:
    """Each image as a zero-mean, unit-norm vector: a dot product is then a pixel correlation."""
    flat = images.reshape(len(images), int(np.prod(images.shape[1:]))).astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True).clip(1e-6)


def _same_patient_pairs(groups: PatientGroups) -> tuple[np.ndarray, np.ndarray]:
    pairs = [np.stack(np.triu_indices(count, k=1)) + start
             for start, count in zip(groups.starts, groups.counts)]
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = np.concatenate(pairs, axis=1)
    return groups.members[flat[0]], groups.members[flat[1]]


def _different_pairs(patient: np.ndarray, images: np.ndarray, count: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct random pairs of images of different patients (fewer if fewer exist)."""
    n = len(patient)
    chosen: dict[tuple[int, int], None] = {}
    for _ in range(100):  # rounds of rejection sampling; a handful suffice unless pairs run out
        if len(chosen) >= count:
            break
        a, b = rng.integers(0, n, size=(2, 2 * (count - len(chosen)) + 16))
        a, b = np.minimum(a, b), np.maximum(a, b)
        ok = (patient[a] != patient[b]) & ~_near_copy(images, a, b)
        for pair in zip(a[ok].tolist(), b[ok].tolist()):
            chosen.setdefault(pair, None)
            if len(chosen) == count:
                break
    pairs = np.array(list(chosen), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


@torch.no_grad()
def embed_pair_table(net: ReidNet, pairs: PairSet, augment: ViewAugmentation, seed: int,
                     device: torch.device) -> torch.Tensor:
    """Embeddings of every entry the pairs index, in eval mode (fixed views, if any)."""
    was_training = net.training
    net.eval()
    sides = (0, 1) if pairs.views else (0,)
    out = []
    for side in sides:
        for start in range(0, len(pairs.images), EMBED_BATCH):
            batch = torch.from_numpy(pairs.images[start:start + EMBED_BATCH].astype(np.float32))
            batch = (batch / pairs.max_value).unsqueeze(1).to(device)
            if pairs.views:
                generator = torch.Generator(device).manual_seed(
                    step_seed(seed, start, HELD_OUT_VIEW_STREAM + side))
                batch = random_views(batch, augment, generator)
            out.append(net.embed(batch).float())
    net.train(was_training)
    if not out:  # a split without pairs (e.g. a test split of one image): nothing to embed
        return torch.zeros((0, net.head[0].out_features), device=device)
    return torch.cat(out)


def pair_cosines(net: ReidNet, pairs: PairSet, augment: ViewAugmentation, seed: int,
                 device: torch.device) -> np.ndarray:
    table = embed_pair_table(net, pairs, augment, seed, device).cpu().double()
    return (table[pairs.a] * table[pairs.b]).sum(dim=1).numpy()


def verification_auc(same: np.ndarray, cosine: np.ndarray) -> float:
    """ROC-AUC of telling same- from different-patient pairs; the score is monotone in the cosine,
    so ranking by cosine gives the score's AUC exactly."""
    return float(roc_auc_score(same, cosine))


def calibrate_cosine(same_patient_cosines: np.ndarray, sensitivity: float) -> float:
    """The largest cosine threshold t with mean(cos >= t) >= sensitivity over same-patient pairs."""
    ordered = np.sort(same_patient_cosines)
    misses_allowed = int(np.floor((1.0 - sensitivity) * len(ordered) + 1e-9))
    return float(ordered[misses_allowed])


@dataclass
class TrainingData:
    """The training split as the loop needs it: pixels and who is the same patient."""

    images: torch.Tensor  # canonical dtype widened to int32 [N, 1, R, R], on the CPU
    max_value: float
    groups: PatientGroups  # patients with 2+ images (every image alone with no patient IDs)
    positives: str  # "patients" or "views"
    patient: torch.Tensor  # int64 [N]: each image's patient, as a number (its row without IDs)


def training_data(train: CanonicalDataset, no_patient_ids: bool) -> TrainingData:
    groups = group_patients(train.patient_id, min_images=1 if no_patient_ids else 2)
    patient = (np.arange(len(train)) if no_patient_ids
               else np.unique(train.patient_id, return_inverse=True)[1])
    if len(groups) < 2:
        raise UserError(f"the training split has {len(groups)} patients with two or more images; "
                        "the re-ID network needs at least 2 (or run with --no-patient-ids, which "
                        "trains on views of single images)")
    return TrainingData(torch.from_numpy(train.images.astype(np.int32)).unsqueeze(1),
                        float((1 << train.bit_depth) - 1), groups,
                        "views" if no_patient_ids else "patients",
                        torch.from_numpy(patient.astype(np.int64)))


def draw_batch(data: TrainingData, patients: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different images (or one image twice) of each of these patients (group indices, in
    seeded epochs: each is drawn once before any is drawn again).

    Returns row indices [2P] and their patients [2P].
    """
    chosen = patients.numpy()
    count = len(chosen)
    counts = data.groups.counts[chosen]
    u = torch.rand(2, count, generator=generator, device=generator.device).cpu().double().numpy()
    first = np.floor(u[0] * counts).astype(np.int64)
    second = (first + 1 + np.floor(u[1] * (counts - 1)).astype(np.int64)) % counts
    starts = data.groups.starts[chosen]
    rows = torch.from_numpy(data.groups.members[np.concatenate([starts + first, starts + second])])
    return rows, data.patient[rows]


def draw_instance_pairs(data: TrainingData, count: int, augment: ViewAugmentation,
                        generator: torch.Generator, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two strong views of each of `count` training images drawn at random from all of them.

    Returns the views [2 count, 1, R, R] and their patients [2 count]: the two views of one
    image are a positive pair, and so is either with another image of its patient in the batch.
    """
    rows = torch.randint(0, len(data.images), (count,), generator=generator,
                         device=generator.device).cpu().repeat(2)
    images = data.images[rows].to(device, torch.float32) / data.max_value
    return random_views(images, augment, generator), data.patient[rows]


def instance_pairs_per_step(settings: ReidConfig, data: TrainingData) -> int:
    """How many of a step's batch_size / 2 pairs are instance pairs; at least one pair is always
    two images of one patient."""
    if data.positives != "patients":
        return 0  # without patient IDs every pair is already two views of one image
    return min(round(settings.instance_share * (settings.batch_size // 2)),
               settings.batch_size // 2 - 1)


def balanced_pair_loss(net: ReidNet, embeddings: torch.Tensor, labels: torch.Tensor,
                       hard_share: float, generator: torch.Generator) -> torch.Tensor:
    """BCE on the pair score over all same-patient pairs and as many different-patient pairs.

    Of the different-patient pairs, `hard_share` are the most similar in the batch (hard
    negatives) and the rest random ones; positives and negatives weigh half each.
    """
    cosine = embeddings @ embeddings.T
    upper = torch.ones_like(cosine, dtype=torch.bool).triu(diagonal=1)
    same = labels[:, None].to(cosine.device) == labels[None, :].to(cosine.device)
    positive, negative = cosine[upper & same], cosine[upper & ~same]
    count = min(len(positive), len(negative))
    hard = round(hard_share * count)
    ranked = negative.detach().argsort(descending=True)
    easier = ranked[hard:]
    picked = easier[torch.randperm(len(easier), generator=generator,
                                   device=generator.device)[:count - hard].to(easier.device)]
    negative = negative[torch.cat([ranked[:hard], picked])]
    logit_pos, logit_neg = net.logit(positive), net.logit(negative)
    loss = F.binary_cross_entropy_with_logits(logit_pos, torch.ones_like(logit_pos))
    if count == 0:  # a tiny dataset's batch can hold one patient only
        return loss
    return 0.5 * (loss + F.binary_cross_entropy_with_logits(logit_neg, torch.zeros_like(logit_neg)))


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                                temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al. 2020): every image must pick out its same-patient partners among
    all other images of the batch, -log softmax(cos / temperature) averaged over its partners."""
    logits = embeddings @ embeddings.T / temperature
    itself = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    log_prob = logits.masked_fill(itself, float("-inf")).log_softmax(dim=1)
    labels = labels.to(logits.device)
    partner = (labels[:, None] == labels[None, :]) & ~itself
    anchors = partner.any(dim=1)
    partner_log_prob = log_prob.masked_fill(~partner, 0.0).sum(dim=1)[anchors]
    return -(partner_log_prob / partner.sum(dim=1)[anchors]).mean()


def training_loss(net: ReidNet, embeddings: torch.Tensor, labels: torch.Tensor,
                  settings: ReidConfig, generator: torch.Generator) -> torch.Tensor:
    """The embedding's loss (reid.loss) plus, for supcon, the score's BCE on detached cosines:
    the scale and bias then fit a logistic curve to the cosines the contrastive loss shaped."""
    if settings.loss == "bce":
        return balanced_pair_loss(net, embeddings, labels, settings.hard_negatives, generator)
    return (supervised_contrastive_loss(embeddings, labels, settings.temperature)
            + balanced_pair_loss(net, embeddings.detach(), labels, settings.hard_negatives,
                                 generator))


def build_net(settings: ReidConfig) -> ReidNet:
    return ReidNet(settings.width, settings.dim, input_size=settings.input_size,
                   stem_stride=settings.stem_stride)


def make_optimizer(net: ReidNet, settings: ReidConfig) -> torch.optim.AdamW:
    """AdamW; the score's scale and bias learn SCORE_LR_MULTIPLIER times faster, undecayed.

    Two scalars that must travel several units (the bias of a saturating sigmoid) would take
    thousands of steps at the encoder's learning rate, leaving the loss dominated by a badly
    placed threshold while the embedding is already good.
    """
    score = [net.log_scale, net.bias]
    encoder = [p for p in net.parameters() if all(p is not q for q in score)]
    return torch.optim.AdamW([
        {"params": encoder, "weight_decay": settings.weight_decay, "lr_multiplier": 1.0},
        {"params": score, "weight_decay": 0.0, "lr_multiplier": SCORE_LR_MULTIPLIER}],
        lr=settings.lr)


@dataclass
class TrainingResult:
    best: dict[str, torch.Tensor]
    best_step: int
    best_auc: float
    untrained_auc: float
    log: list[dict[str, Any]]
    steps_done: int
    stopped_early: bool
    seconds: float


def train(settings: ReidConfig, seed: int, data: TrainingData, val_pairs: PairSet,
          checkpoint: Path, device: torch.device, stage: str) -> TrainingResult:
    """The loop. Saves `checkpoint` every `checkpoint_every` steps and on Ctrl-C / SIGTERM;
    `stage` is the name messages give it (fit-reid, or the audit's audit-reid)."""
    torch.manual_seed(seed)
    net = build_net(settings).to(device)
    optimizer = make_optimizer(net, settings)
    best = BestSoFar()  # by validation AUC, with clean BatchNorm statistics
    loop = TrainingLoop(stage, checkpoint, settings.steps,
                        checkpoint_every=settings.checkpoint_every,
                        max_minutes=settings.max_minutes)

    def validate(steps_done: int) -> float:
        """The validation AUC now; the weights are kept when it is the best yet."""
        clean = with_clean_batch_norm(net, data, seed, device)
        auc = verification_auc(val_pairs.same,
                               pair_cosines(clean, val_pairs, settings.augment, seed,
                                            device))
        best.offer(auc, steps_done, clean)
        return auc

    if not loop.resume(model=net, optimizer=optimizer, best=best):
        loop.log_row(val_auc=validate(0))  # the untrained network's AUC, the first row
    instance_pairs = instance_pairs_per_step(settings, data)
    batches = SeededBatches(seed, len(data.groups), settings.batch_size // 2 - instance_pairs,
                            device)
    net.train()
    with loop.running("training re-ID"):
        for step in loop.steps(stop=lambda: best.stale >= settings.patience):
            patients, generator = batches.draw(step)
            rows, labels = draw_batch(data, patients, generator)
            images = data.images[rows].to(device, torch.float32) / data.max_value
            images = random_views(images, settings.augment, generator)
            if instance_pairs:
                views, patients_of_views = draw_instance_pairs(
                    data, instance_pairs, settings.copy_augment, generator, device)
                images, labels = torch.cat([images, views]), torch.cat([labels, patients_of_views])
            loss = training_loss(net, net.embed(images), labels, settings, generator)
            for group in optimizer.param_groups:
                group["lr"] = (cosine_lr(step, settings.steps, settings.lr)
                               * group["lr_multiplier"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            due = (step + 1) % settings.validate_every == 0 or step + 1 == settings.steps
            loop.record(loss.item(), row=due, val_auc=validate(step + 1) if due else "")
        if not _validated_now(loop):  # stopped by the clock between validations
            loop.log_row(val_auc=validate(loop.step))
    return TrainingResult(best.weights, best.at, best.score, loop.log[0]["val_auc"], loop.log,
                          loop.step, loop.step < settings.steps, loop.elapsed())


def _validated_now(loop: TrainingLoop) -> bool:
    """Whether the last log row is a validation at the current step."""
    return loop.log[-1]["step"] == loop.step and loop.log[-1]["val_auc"] != ""


@torch.no_grad()
def with_clean_batch_norm(net: ReidNet, data: TrainingData, seed: int, device: torch.device
                          ) -> ReidNet:
    """A copy of `net` whose BatchNorm statistics are measured on un-augmented training images.

    While training, BatchNorm averages over augmented views, but the network is used on clean
    images (training images, synthetic candidates). On Kermany at 32 px that mismatch made the
    validation AUC swing by up to 0.15 from one validation to the next; re-estimating the
    statistics on clean images (a forward-only "precise BN" pass over BATCH_NORM_IMAGES images)
    removed the swings and raised the AUC by about 0.05.
    """
    clean = copy.deepcopy(net).train()
    for module in clean.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches below
    rows = np.random.default_rng([seed, BATCH_NORM_STREAM]).permutation(len(data.images))
    rows = rows[:BATCH_NORM_IMAGES]
    for chosen in np.array_split(rows, math.ceil(len(rows) / EMBED_BATCH)):  # none of 1 image
        images = data.images[torch.from_numpy(chosen)].to(device, torch.float32)
        clean.embed(images / data.max_value)
    return clean.eval()


def publish(folder: Path, result: TrainingResult, pairs: dict[str, PairSet], settings: ReidConfig,
            seed: int, data: TrainingData, device: torch.device) -> dict[str, Any]:
    """The best weights, reid.json (returned) and the training log."""
    net = build_net(settings).to(device)
    net.load_state_dict(result.best)
    meta = {
        "architecture": {"kind": "ResNetEncoder + linear, unit-norm", "width": settings.width,
                         "dim": settings.dim, "blocks_per_stage": 1,
                         "input_size": settings.input_size, "stem_stride": settings.stem_stride,
                         "resolution": int(data.images.shape[-1]), "channels": 1},
        "score": "sigmoid(scale * cosine + bias)",
        "scale": float(net.log_scale.detach().exp()), "bias": float(net.bias.detach()),
        **held_out_report(net, pairs, settings, seed, device),
        "auc_untrained_val": result.untrained_auc,
        "positives": data.positives, "training_patients": len(data.groups),
        "loss": settings.loss, "steps_planned": settings.steps, "steps_done": result.steps_done,
        "best_step": result.best_step, "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 1),
    }
    save_file(result.best, str(folder / "reid.safetensors"))
    write_atomic(folder / "reid.json", json.dumps(meta, indent=2) + "\n")
    write_log(folder / "training_log.csv", result.log, LOG_FIELDS)
    return meta


def held_out_report(net: ReidNet, pairs: dict[str, PairSet], settings: ReidConfig, seed: int,
                    device: torch.device) -> dict[str, Any]:
    """Calibrate the threshold on the validation pairs; AUCs and flag rates on val and test."""
    cosines = {split: pair_cosines(net, pair_set, settings.augment, seed, device)
               for split, pair_set in pairs.items()}
    same = {split: pair_set.same for split, pair_set in pairs.items()}
    threshold_cosine = calibrate_cosine(cosines["val"][same["val"]], settings.sensitivity)
    score = cosine_to_score(threshold_cosine, float(net.log_scale.detach().exp()),
                            float(net.bias.detach()))
    flagged = {split: cosines[split] >= threshold_cosine for split in pairs}
    return {
        "threshold": float(score), "threshold_cosine": threshold_cosine,
        "sensitivity": settings.sensitivity,
        "auc": {"val": _auc_or_none(same["val"], cosines["val"]),
                "test": _auc_or_none(same["test"], cosines["test"]),
                "val+test": _auc_or_none(np.concatenate([same["val"], same["test"]]),
                                         np.concatenate([cosines["val"], cosines["test"]]))},
        "sensitivity_measured": {split: _share(flagged[split][same[split]]) for split in pairs},
        "false_positive_rate": {split: _share(flagged[split][~same[split]]) for split in pairs},
        "held_out_pairs": _PAIR_RULES["views" if pairs["val"].views else "patients"],
        "pairs": {split: pair_set.counts() for split, pair_set in pairs.items()},
    }


_PAIR_RULES = {
    "patients": f"same-patient: all pairs of two images of one patient, at most {MAX_SAME_PAIRS} "
                "per split (seeded); different-patient: as many random pairs of two of the "
                "split's images of different patients (seeded); pairs whose pixels correlate "
                f"above {NEAR_COPY_CORRELATION} left out",
    "views": "same-patient: two fixed random views of one image (no patient IDs), at most "
             f"{MAX_SAME_PAIRS} per split; different-patient: as many random pairs of views of "
             "two different images",
}


def _auc_or_none(same: np.ndarray, cosine: np.ndarray) -> float | None:
    """None when a split lacks one kind of pair (a tiny test split), rather than failing."""
    return verification_auc(same, cosine) if 0 < same.sum() < len(same) else None


def _share(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if len(flags) else None
