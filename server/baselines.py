"""On-device reference methods: source, BN test statistics, TENT, EATA, CoTTA, ROID, SAR.

In-process torch with full backprop, for the evaluation harness. Written after the
reference code (DequanWang/tent, mr-eggplant/EATA, qinenergy/cotta, mariodoebler/
test-time-adaptation for ROID and SAR); hyperparameters follow RESEARCH.md, "On-device
references". Per-dataset settings: `preset_for(num_classes)` picks "cifar" (up to 100
classes) or "imagenet" (more), the one rule for eata, roid and sar; any keyword overrides it;
`settings` lists the values in force (replay copies it into report.json). Every method takes
float32 NCHW RGB in [0, 1] (the model wrapper normalises) and is *online*: `predict_and_adapt(x)` returns
the logits of the same forward pass that adapts, then takes one step.

    method = build_method("tent", model, num_classes=10)
    for x in stream: logits = method.predict_and_adapt(x)

Common to all methods:
- The model is deep-copied: the caller's model is never modified.
- "Test-batch statistics" is done as in TENT's `configure_model`: every BN layer gets
  `track_running_stats=False` and no running buffers, so it always normalises with the
  current batch. Deviation: only the BN layers are put in train mode, the rest stays in
  eval mode (the references call `model.train()`; identical for nets without dropout).
- `reset()` reloads the source weights and the initial optimizer state (and EATA's
  probability EMA, CoTTA's teacher/anchor and augmentation RNG, ROID's class EMA and RNG,
  SAR's loss EMA).
- Counters are cost accounting, summed over samples, and survive `reset()`:
  `forward_passes` += batch size per network forward over the batch,
  `backward_passes` += number of samples whose loss is back-propagated.
  source, bn: 1 forward, 0 backward. tent: 1 forward, 1 backward.
  eata: 1 forward; backward only for the samples kept by both filters (as EATA counts
  them); the Fisher pre-computation on `fisher_images` is not counted (source side).
  cotta: 3 forwards (student, teacher, anchor) + N augmented teacher forwards when the
  augmentation average is used, 1 backward.

Per method (P = published / reference value):
- source: eval mode, running statistics, no gradient.
- bn: test-batch statistics, no gradient (BN-1 / "norm_test").
- tent: BN affine only, loss = mean softmax entropy. optimizer="adam" (default, TENT's
  CIFAR config: Adam lr 1e-3, betas (0.9, 0.999)) or "sgd" (TENT's ImageNet config:
  SGD lr 2.5e-4, momentum 0.9, nesterov, as in its default cfg). No deviation.
- eata: BN affine only. Reliability filter H < e_margin = 0.4 ln C, weight 1/exp(H - e_margin);
  redundancy filter |cos(p, m)| < d_margin against m, the EMA (0.9) of the mean probability
  vector of kept samples; Fisher regulariser alpha * sum F (theta - theta0)^2, F = squared
  gradients of cross-entropy to the argmax pseudo-label, averaged over batches of
  `fisher_batch_size` (64, EATA's) of `fisher_images`, in adaptation mode, as in EATA's main.py.
  Settings by preset (P, the peer framework's cfgs/cifar10_c/eata.yaml and EATA's ImageNet
  defaults): cifar: Adam lr 1e-3, d_margin 0.4, alpha 1; imagenet: SGD lr 2.5e-4 momentum 0.9
  (no nesterov), d_margin 0.05, alpha 2000. The ImageNet margin used with 10 classes dropped
  every sample after the first batch, so eata equalled bn; the CIFAR preset keeps stepping.
  Deviations: (1) the Fisher images are whatever the caller passes: `driftsync replay` passes up
  to EATA_FISHER_IMAGES (2000, P) clean images of the stream's own base set (the clean versions
  of the stream's test images, unlabelled; EATA's own ImageNet recipe likewise uses clean
  validation images, the framework uses 2000 training images); with none (CIFAR-10-C and
  ImageNet-C trees have no clean split) there is no Fisher term, and `settings` says so;
  (2) issue 16 cited lr 0.005 for CIFAR; the framework config that produced RESEARCH.md's
  EATA row is Adam 1e-3, which is used here.
- cotta: all parameters trained with Adam lr 1e-3; loss = cross-entropy between the
  teacher's softmax and the student's log-softmax; EMA teacher 0.999 (parameters only);
  anchor = frozen source model; when the batch-mean anchor max-probability < 0.92 the
  teacher prediction is the mean of the logits over N = 32 augmented copies, else the
  teacher's plain logits; stochastic restore of each weight/bias element to the source
  value with p = 0.01. The returned logits are the teacher's prediction, as in CoTTA.
  Deviations: (1) the N augmented forwards are only run when they are used (the
  reference always runs them and discards them when the anchor is confident; the outputs
  are identical, only RNG consumption and cost differ -- the counters count what ran);
  (2) the augmentations are re-implemented in torch after CoTTA's CIFAR set: colour
  jitter (brightness [0.6, 1.4], contrast [0.7, 1.3], saturation [0.5, 1.5], hue
  [-0.06, 0.06], gamma [0.7, 1.3], random order), edge pad 16, random affine (+-15 deg,
  translate 1/16 of the padded size, scale [0.9, 1.1], bilinear), gaussian blur (kernel
  5, sigma [0.001, 0.5]), centre crop, horizontal flip p 0.5, gaussian noise std 0.005,
  clip to [0, 1]. As in the reference (torchvision transforms applied to a batch
  tensor), one draw of the random parameters is shared by the whole batch per
  augmentation; the noise is per pixel. Hue is a rotation in YIQ space instead of
  torchvision's HSV shift. Out-of-range affine samples take the nearest edge pixel
  instead of torchvision's zero fill.
- roid: BN affine only, batch statistics. Per sample: diversity d = 1 - cos(p, m) against m,
  the EMA (0.9) of the batch-mean probabilities (initially uniform), certainty c = -H, each
  min-max normalised over the batch; weight exp(d c / T), T = 1/3, and 0 for samples with d
  below the batch mean. Loss = sum over kept samples of weight * soft likelihood ratio
  (-sum p log(p / (1 - p)), p clipped at 0.99, eps 1e-5) + weight * symmetric cross-entropy
  (alpha 0.5) between the model on an augmented view of the sample and on the sample, both
  divided by the batch size. After the step, weight ensembling: theta <- 0.99 theta + 0.01
  theta_source. Prior correction of the returned output: prior = batch-mean probability,
  s = max(1/B, 1/C) / max(prior), output = logits * (prior + s) / (1 + s C): the smoothed
  prior scales the logits, as in the reference code.
  Settings by preset (P, cfgs/{cifar10_c,imagenet_c}/roid.yaml + conf.py ROID block): cifar:
  Adam lr 1e-3; imagenet: SGD lr 2.5e-4 momentum 0.9 nesterov. Deviations: the augmented view
  is `cotta_augment(blur=False, noise_std=0, pad_mode="reflect")` (the reference's
  non-CoTTA set: colour jitter, reflect pad, affine, centre crop, flip), re-implemented as
  for cotta above, one draw per batch, from a seeded generator; the min-max normalisation
  guards a zero range (one sample, or equal values) instead of dividing by zero.
  Counters: forwards = B + kept; backwards = 2 * kept (the sample and its view).
- sar: chosen instead of RMT. RMT needs labelled source data during adaptation (a cross-entropy
  replay of source samples every step, source prototypes, and a contrastive warm-up of a
  projector on 50,000 source samples). The harness's only clean images are the clean versions
  of the very test images it streams, so a labelled replay of them would leak the stream's
  labels; the product has no source training set and replay has no input for one (the
  10,000 training images in ../shared are for tests, and fall short of the warm-up's 50,000).
  SAR needs nothing but the stream.
  BN affine only, batch statistics. Reliable samples H < 0.4 ln C; SAM (rho 0.05): gradient of
  their mean entropy at w, move to w + rho g / |g|, second forward of the batch, filter again
  (H < 0.4 ln C), gradient of the mean entropy there, back to w, one SGD step (momentum 0.9)
  with that gradient. Model recovery: the EMA (0.9) of the second-pass loss; below 0.2 the
  model, optimizer and EMA reset to the source (counted in `recoveries`). Settings by preset
  (P, the framework wraps SGD at cfg OPTIM.LR): cifar lr 1e-3, imagenet lr 2.5e-4.
  Deviations: a batch without reliable samples takes no step and no second forward (the
  reference steps the momentum on a zero gradient); a second pass where no sample stays
  reliable restores w and takes no step. SAR skips ResNet layer4 / ViT top blocks; CIFAR
  ResNets have no layer4, and for other nets every norm layer adapts here.
  Counters: forwards = 2B (B when nothing is reliable); backwards = reliable + still reliable.
"""
from __future__ import annotations

import copy
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from server.augment import cotta_augment
from server.engine import entropy
from server.norm import affine_parameters, norm_layers


class OnlineMethod(Protocol):
    name: str
    forward_passes: int
    backward_passes: int

    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor: ...

    def reset(self) -> None: ...


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """TENT's configure_model for the norm layers: batch statistics always, no running ones."""
    model.eval()
    for layer in norm_layers(model).values():
        layer.train()
        layer.track_running_stats = False
        layer.running_mean = None
        layer.running_var = None
    return model


def adapt_affine_only(model: nn.Module) -> list[nn.Parameter]:
    """Batch statistics, gradients for the norm layers' affine parameters only (TENT, EATA, SAR, ROID)."""
    use_batch_statistics(model).requires_grad_(False)
    params = affine_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


CIFAR_MAX_CLASSES = 100


def preset_for(num_classes: int) -> str:
    """Which published settings apply: 'cifar' up to 100 classes (CIFAR-10/100), else 'imagenet'."""
    return "cifar" if num_classes <= CIFAR_MAX_CLASSES else "imagenet"


# Per-dataset settings (RESEARCH.md; mariodoebler/test-time-adaptation cfgs/{cifar10_c,imagenet_c}/*.yaml).
EATA_PRESETS = {
    "cifar": {"optimizer": "adam", "lr": 1e-3, "d_margin": 0.4, "fisher_alpha": 1.0},
    "imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "d_margin": 0.05, "fisher_alpha": 2000.0},
}
EATA_FISHER_IMAGES = 2000  # clean in-distribution images for the Fisher (EATA and the framework: 2000)
ROID_PRESETS = {"cifar": {"optimizer": "adam", "lr": 1e-3}, "imagenet": {"optimizer": "sgd", "lr": 2.5e-4}}
SAR_LR = {"cifar": 1e-3, "imagenet": 2.5e-4}  # SAM around plain momentum SGD in both


def make_optimizer(params: list[nn.Parameter], optimizer: str, lr: float | None) -> torch.optim.Optimizer:
    if optimizer == "adam":  # TENT / CoTTA CIFAR
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr, betas=(0.9, 0.999))
    if optimizer == "sgd":  # TENT ImageNet (nesterov), EATA uses nesterov=False
        return torch.optim.SGD(params, lr=2.5e-4 if lr is None else lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'sgd'")


class _Method:
    name = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.optimizer: torch.optim.Optimizer | None = None
        self.forward_passes = 0
        self.backward_passes = 0
        self.settings: dict = {}  # the hyperparameters in force, for the report

    def _save_source(self) -> None:
        """Call at the end of __init__: what reset() goes back to."""
        self._model_state = copy.deepcopy(self.model.state_dict())
        self._opt_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None

    def reset(self) -> None:
        self.model.load_state_dict(self._model_state)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._opt_state))


class Source(_Method):
    name = "source"

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__(model)
        self.model.eval().requires_grad_(False)
        self._save_source()

    @torch.no_grad()
    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_passes += len(x)
        return self.model(x)


class BatchNormTest(Source):
    name = "bn"

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__(model, num_classes)
        use_batch_statistics(self.model)
        self._save_source()


class Tent(_Method):
    name = "tent"

    def __init__(self, model: nn.Module, num_classes: int, optimizer: str = "adam", lr: float | None = None) -> None:
        super().__init__(model)
        self.optimizer = make_optimizer(adapt_affine_only(self.model), optimizer, lr)
        self._save_source()

    @torch.enable_grad()
    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)
        loss = entropy(outputs).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.forward_passes += len(x)
        self.backward_passes += len(x)
        return outputs.detach()


class EATA(_Method):
    name = "eata"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: str | None = None,
        lr: float | None = None,
        e_margin: float | None = None,
        d_margin: float | None = None,
        fisher_alpha: float | None = None,
        fisher_images: torch.Tensor | None = None,
        fisher_batch_size: int = 64,
        ema: float = 0.9,
    ) -> None:
        super().__init__(model)
        params = adapt_affine_only(self.model)
        preset = EATA_PRESETS[preset_for(num_classes)]
        optimizer = preset["optimizer"] if optimizer is None else optimizer
        lr = preset["lr"] if lr is None else lr
        if optimizer == "sgd":  # EATA: plain momentum SGD
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
        else:
            self.optimizer = make_optimizer(params, optimizer, lr)
        self.e_margin = 0.4 * math.log(num_classes) if e_margin is None else e_margin
        self.d_margin = preset["d_margin"] if d_margin is None else d_margin
        self.fisher_alpha = preset["fisher_alpha"] if fisher_alpha is None else fisher_alpha
        self.ema = ema
        use_fisher = fisher_images is not None and self.fisher_alpha > 0
        self.fishers = self._fishers(fisher_images, fisher_batch_size) if use_fisher else None
        self.settings = {"preset": preset_for(num_classes), "optimizer": optimizer, "lr": lr,
                         "e_margin": round(self.e_margin, 4), "d_margin": self.d_margin,
                         "fisher_alpha": self.fisher_alpha if use_fisher else 0.0,
                         "fisher_images": len(fisher_images) if use_fisher else 0}
        self.current_model_probs: torch.Tensor | None = None
        self.num_samples_update_1 = 0  # passed the reliability filter
        self.num_samples_update_2 = 0  # passed both filters
        self._save_source()

    def _fishers(self, images: torch.Tensor, batch_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Diagonal Fisher of the affine parameters, as EATA's main.py computes it."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        sums = {n: torch.zeros_like(p) for n, p in named}
        batches = list(torch.split(images, batch_size))
        with torch.enable_grad():
            for batch in batches:
                outputs = self.model(batch)
                F.cross_entropy(outputs, outputs.argmax(1)).backward()
                for n, p in named:
                    sums[n] += p.grad.detach() ** 2
                self.model.zero_grad(set_to_none=True)
        return {n: (sums[n] / len(batches), p.detach().clone()) for n, p in named}

    @torch.enable_grad()
    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)
        self.forward_passes += len(x)
        ent = entropy(outputs)
        ids1 = torch.where(ent < self.e_margin)[0]
        probs1 = outputs[ids1].softmax(1)
        if self.current_model_probs is not None and len(ids1) > 0:
            cos = F.cosine_similarity(self.current_model_probs.unsqueeze(0), probs1, dim=1)
            ids2 = torch.where(cos.abs() < self.d_margin)[0]
        else:
            ids2 = torch.arange(len(ids1))
        kept_ent, kept_probs = ent[ids1][ids2], probs1[ids2].detach()
        if len(kept_probs) > 0:
            mean = kept_probs.mean(0)
            old = self.current_model_probs
            self.current_model_probs = mean if old is None else self.ema * old + (1 - self.ema) * mean
        self.num_samples_update_1 += len(ids1)
        self.num_samples_update_2 += len(kept_ent)
        if len(kept_ent) > 0:
            loss = (kept_ent * torch.exp(self.e_margin - kept_ent.detach())).mean(0)
            if self.fishers is not None:
                for n, p in self.model.named_parameters():
                    if n in self.fishers:
                        fisher, theta0 = self.fishers[n]
                        loss = loss + self.fisher_alpha * (fisher * (p - theta0) ** 2).sum()
            loss.backward()
            self.optimizer.step()
            self.backward_passes += len(kept_ent)
        self.optimizer.zero_grad()
        return outputs.detach()

    def reset(self) -> None:
        super().reset()
        self.current_model_probs = None


# --- CoTTA ----------------------------------------------------------------------------------


class CoTTA(_Method):
    name = "cotta"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: str = "adam",
        lr: float = 1e-3,
        mt: float = 0.999,
        rst: float = 0.01,
        ap: float = 0.92,
        n_augmentations: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        use_batch_statistics(self.model).requires_grad_(True)
        self.optimizer = make_optimizer(list(self.model.parameters()), optimizer, lr)
        self.mt, self.rst, self.ap, self.n_augmentations, self.seed = mt, rst, ap, n_augmentations, seed
        self._save_source()
        self._source_params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.model_ema = copy.deepcopy(self.model).requires_grad_(False)
        self.model_anchor = copy.deepcopy(self.model).requires_grad_(False)
        self.generator = torch.Generator().manual_seed(self.seed)

    @torch.enable_grad()
    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)
        with torch.no_grad():
            anchor_prob = self.model_anchor(x).softmax(1).max(1)[0]
            outputs_ema = self.model_ema(x)
            self.forward_passes += 3 * len(x)
            if anchor_prob.mean(0) < self.ap:  # augmentation-averaged teacher prediction
                outputs_ema = torch.stack(
                    [self.model_ema(cotta_augment(x, self.generator)) for _ in range(self.n_augmentations)]
                ).mean(0)
                self.forward_passes += self.n_augmentations * len(x)
        loss = -(outputs_ema.softmax(1) * outputs.log_softmax(1)).sum(1).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.backward_passes += len(x)
        with torch.no_grad():
            for ema_p, p in zip(self.model_ema.parameters(), self.model.parameters()):
                ema_p.mul_(self.mt).add_(p, alpha=1 - self.mt)
            for n, p in self.model.named_parameters():  # stochastic restore
                if n.rsplit(".", 1)[-1] in ("weight", "bias"):
                    mask = (torch.rand(p.shape, generator=self.generator) < self.rst).to(p.device)
                    p.copy_(torch.where(mask, self._source_params[n], p))
        return outputs_ema


# --- ROID ------------------------------------------------------------------------------------


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """ROID's loss per sample: -sum p log(p / (1 - p)), p clipped to `clip` so the ratio stays finite."""
    p = logits.softmax(1).clamp(max=clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(1)


def symmetric_cross_entropy(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per sample: (1 - alpha) CE(softmax y, x) + alpha CE(softmax x, y)."""
    return -(1 - alpha) * (y.softmax(1) * x.log_softmax(1)).sum(1) - alpha * (x.softmax(1) * y.log_softmax(1)).sum(1)


def _min_max(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)


class ROID(_Method):
    name = "roid"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: str | None = None,
        lr: float | None = None,
        momentum_src: float = 0.99,
        momentum_probs: float = 0.9,
        temperature: float = 1 / 3,
        prior_correction: bool = True,
        consistency: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(model)
        params = adapt_affine_only(self.model)
        preset = ROID_PRESETS[preset_for(num_classes)]
        optimizer = preset["optimizer"] if optimizer is None else optimizer
        lr = preset["lr"] if lr is None else lr
        self.optimizer = make_optimizer(params, optimizer, lr)
        self.num_classes, self.momentum_src, self.momentum_probs = num_classes, momentum_src, momentum_probs
        self.temperature, self.prior_correction, self.consistency = temperature, prior_correction, consistency
        self.seed = seed
        self.settings = {"preset": preset_for(num_classes), "optimizer": optimizer, "lr": lr,
                         "momentum_src": momentum_src, "momentum_probs": momentum_probs,
                         "temperature": round(temperature, 4), "prior_correction": prior_correction,
                         "consistency": consistency}
        self._save_source()
        self._source_params = [p.detach().clone() for p in params]
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.class_probs_ema = torch.full((self.num_classes,), 1 / self.num_classes)
        self.generator = torch.Generator().manual_seed(self.seed)

    def weights(self, outputs: torch.Tensor) -> torch.Tensor:
        """Certainty x diversity weight per sample; 0 for the less diverse half (below the mean)."""
        probs = outputs.softmax(1)
        ema = self.class_probs_ema.to(probs)
        diversity = _min_max(1 - F.cosine_similarity(ema.unsqueeze(0), probs, dim=1))
        certainty = _min_max(-entropy(outputs))
        weights = torch.exp(diversity * certainty / self.temperature)
        return torch.where(diversity < diversity.mean(), torch.zeros_like(weights), weights)

    @torch.enable_grad()
    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)
        self.forward_passes += len(x)
        with torch.no_grad():
            weights = self.weights(outputs)
            probs_mean = outputs.softmax(1).mean(0).cpu()
            self.class_probs_ema = self.momentum_probs * self.class_probs_ema + (1 - self.momentum_probs) * probs_mean
        kept = weights > 0
        loss = (soft_likelihood_ratio(outputs[kept]) * weights[kept]).sum() / len(x)
        self.backward_passes += int(kept.sum())
        if self.consistency:
            views = cotta_augment(x[kept], self.generator, noise_std=0.0, blur=False, pad_mode="reflect")
            outputs_aug = self.model(views)
            loss = loss + (symmetric_cross_entropy(outputs_aug, outputs[kept]) * weights[kept]).sum() / len(x)
            self.forward_passes += len(views)
            self.backward_passes += len(views)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():  # weight ensembling with the source
            for p, p0 in zip(affine_parameters(self.model), self._source_params):
                p.mul_(self.momentum_src).add_(p0, alpha=1 - self.momentum_src)
            outputs = outputs.detach()
            if not self.prior_correction:
                return outputs
            prior = outputs.softmax(1).mean(0)
            smooth = max(1 / outputs.shape[0], 1 / outputs.shape[1]) / prior.max()
            return outputs * (prior + smooth) / (1 + smooth * outputs.shape[1])


# --- SAR -------------------------------------------------------------------------------------


class SAR(_Method):
    name = "sar"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float | None = None,
        rho: float = 0.05,
        e_margin: float | None = None,
        reset_constant: float = 0.2,
        ema: float = 0.9,
    ) -> None:
        super().__init__(model)
        self.params = adapt_affine_only(self.model)
        lr = SAR_LR[preset_for(num_classes)] if lr is None else lr
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        self.rho, self.reset_constant, self.ema_momentum = rho, reset_constant, ema
        self.e_margin = 0.4 * math.log(num_classes) if e_margin is None else e_margin
        self.settings = {"preset": preset_for(num_classes), "optimizer": "sam+sgd", "lr": lr, "rho": rho,
                         "e_margin": round(self.e_margin, 4), "reset_constant": reset_constant}
        self.ema: float | None = None  # of the second-pass loss: model recovery when it falls below reset_constant
        self.recoveries = 0
        self._save_source()

    def reset(self) -> None:
        super().reset()
        self.ema = None

    @torch.enable_grad()
    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)
        self.forward_passes += len(x)
        reliable = entropy(outputs) < self.e_margin
        if not reliable.any():
            return outputs.detach()
        entropy(outputs[reliable]).mean().backward()
        self.backward_passes += int(reliable.sum())
        with torch.no_grad():  # climb to the sharpest nearby point, w + rho g / |g|
            moved = [p for p in self.params if p.grad is not None]
            originals = [p.detach().clone() for p in moved]
            norm = torch.norm(torch.stack([p.grad.norm() for p in moved]))
            for p in moved:
                p.add_(p.grad * (self.rho / (norm + 1e-12)))
        self.optimizer.zero_grad()
        ent2 = entropy(self.model(x))[reliable]  # second pass at w + e(w), reliable samples filtered again
        self.forward_passes += len(x)
        kept = ent2 < self.e_margin
        if kept.any():
            loss = ent2[kept].mean()
            loss.backward()
            self.backward_passes += int(kept.sum())
            value = float(loss.detach())
            self.ema = value if self.ema is None else self.ema_momentum * self.ema + (1 - self.ema_momentum) * value
        with torch.no_grad():  # back to w; the step uses the gradient taken at w + e(w)
            for p, original in zip(moved, originals):
                p.copy_(original)
        if kept.any():
            self.optimizer.step()
        self.optimizer.zero_grad()
        if self.ema is not None and self.ema < self.reset_constant:
            self.reset()
            self.recoveries += 1
        return outputs.detach()


METHODS = {m.name: m for m in (Source, BatchNormTest, Tent, EATA, CoTTA, ROID, SAR)}


def build_method(name: str, model: nn.Module, num_classes: int, **overrides) -> OnlineMethod:
    """A fresh online method around a copy of `model`; overrides are the class's keyword args."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name](model, num_classes, **overrides)
