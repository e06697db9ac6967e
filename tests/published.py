"""Independent, literal transcriptions of the two published training loops.

Nothing here imports mmfast: this module is the yardstick mmfast is measured
against (tests/test_published.py).

* MMPareto (Wei & Hu, ICML 2024): GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``
  (``train_epoch``) and ``code/min_norm_solvers.py`` (``MinNormSolver``), checked
  against the published files (commit cc923ec3). The step below keeps the published
  structure line for line: three backward passes with ``retain_graph=True``,
  ``param.grad.data.clone()`` into per-loss dicts with a ``"concat"`` entry,
  ``F.cosine_similarity(..., dim=0)``, ``if cos > 0`` / min-norm solver, a fourth
  backward of the summed loss, then the per-parameter Python loop. Deviations,
  all cosmetic: no DataParallel (names have no ``module.`` prefix), no logging,
  the audio/visual heads are called ``head_audio`` / ``head_visual`` (published:
  ``head_audio`` / ``head_video``; both are skipped by the same ``'head'`` test),
  and the ``optimizer.step()`` is optional so that a test can inspect ``.grad``.
* DGL (ICCV 2025): shicaiwei123/ICCV2025-GDL, ``main_dgl.py`` (``train_epoch``) and
  ``models/fusion_modules.py`` (``ConcatFusion_DGL``), checked against the published
  files (commit 2c601d89). The published ``ConcatFusion_DGL`` also creates an
  ``fc_auxi`` layer it never uses (its grad stays None); it is left out here because
  a parameter that never gets a gradient only adds noise to the comparison.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------- models


def _encoder(in_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


FEAT = 8  # feature width of each encoder


class SeedAV(nn.Module):
    """A tiny stand-in for the published ``AVClassifier`` (ResNet-18 encoders)."""

    def __init__(self, n_classes: int = 4):
        super().__init__()
        self.audio_net = _encoder(1)
        self.visual_net = _encoder(3)
        self.fusion_module = nn.Linear(2 * FEAT, n_classes)  # concat head
        self.head_audio = nn.Linear(FEAT, n_classes)
        self.head_visual = nn.Linear(FEAT, n_classes)

    def forward(self, x_a, x_v):
        f_a = self.audio_net(x_a)
        f_v = self.visual_net(x_v)
        out = self.fusion_module(torch.cat((f_a, f_v), 1))
        out_a = self.head_audio(f_a)
        out_v = self.head_visual(f_v)
        return out, out_a, out_v


class ConcatFusionDGL(nn.Module):
    """``ConcatFusion_DGL`` of models/fusion_modules.py (without the unused fc_auxi)."""

    def __init__(self, input_dim: int = 2 * FEAT, output_dim: int = 4, detach: bool = True):
        super().__init__()
        self.fc_out = nn.Linear(input_dim, output_dim)
        self.detach = detach  # False only to model a user who forgot the detach

    def forward(self, x, y):
        output = torch.cat((x, y), dim=1)
        if self.detach:
            output = output.detach()
        output = self.fc_out(output)
        x_out = self.fc_out(torch.cat((x, torch.zeros_like(y)), dim=1))
        y_out = self.fc_out(torch.cat((torch.zeros_like(x), y), dim=1))
        return x_out, y_out, output


class SeedDGL(nn.Module):
    """A tiny stand-in for the published ``AVClassifier_DGL`` with concat fusion."""

    def __init__(self, n_classes: int = 4, detach: bool = True):
        super().__init__()
        self.fusion_module = ConcatFusionDGL(2 * FEAT, n_classes, detach=detach)
        self.audio_net = _encoder(1)
        self.visual_net = _encoder(3)

    def forward(self, audio, visual):
        a = self.audio_net(audio)
        v = self.visual_net(visual)
        a_out, v_out, out = self.fusion_module(a, v)
        return out, a_out, v_out


# ------------------------------------------------------------ MinNormSolver (2 vectors)


class MinNormSolver:
    """``code/min_norm_solvers.py`` of MMPareto, the part a 2-task call reaches.

    ``find_min_norm_element`` with ``n >= 3`` runs a projected-gradient loop that the
    MMPareto loop never reaches (it always passes two vectors); it is not transcribed.
    """

    MAX_ITER = 250
    STOP_CRIT = 1e-5

    @staticmethod
    def _min_norm_element_from2(v1v1, v1v2, v2v2):
        if v1v2 >= v1v1:
            # Case: Fig 1, third column
            gamma = 0.999
            cost = v1v1
            return gamma, cost
        if v1v2 >= v2v2:
            # Case: Fig 1, first column
            gamma = 0.001
            cost = v2v2
            return gamma, cost
        # Case: Fig 1, second column
        gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        cost = v2v2 + gamma * (v1v2 - v2v2)
        return gamma, cost

    @staticmethod
    def _min_norm_2d(vecs, dps):
        dmin = 1e8
        for i in range(len(vecs)):
            for j in range(i + 1, len(vecs)):
                if (i, j) not in dps:
                    dps[(i, j)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(i, j)] += torch.mul(vecs[i][k], vecs[j][k]).sum().data.cpu()
                    dps[(j, i)] = dps[(i, j)]
                if (i, i) not in dps:
                    dps[(i, i)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(i, i)] += torch.mul(vecs[i][k], vecs[i][k]).sum().data.cpu()
                if (j, j) not in dps:
                    dps[(j, j)] = 0.0
                    for k in range(len(vecs[i])):
                        dps[(j, j)] += torch.mul(vecs[j][k], vecs[j][k]).sum().data.cpu()
                c, d = MinNormSolver._min_norm_element_from2(dps[(i, i)], dps[(i, j)], dps[(j, j)])
                if d < dmin:
                    dmin = d
                    sol = [(i, j), c, d]
        return sol, dps

    @staticmethod
    def find_min_norm_element(vecs):
        # Solution lying at the combination of two points
        dps = {}
        init_sol, dps = MinNormSolver._min_norm_2d(vecs, dps)

        new_dps = {}
        new_init_sol = []
        for item in dps:
            new_dps[item] = dps[item].numpy()
        for item in init_sol:
            if torch.is_tensor(item):
                data = item.numpy()
            else:
                data = item
            new_init_sol.append(data)
        dps = new_dps
        init_sol = new_init_sol

        n = len(vecs)
        sol_vec = np.zeros(n)
        sol_vec[init_sol[0][0]] = init_sol[1]
        sol_vec[init_sol[0][1]] = 1 - init_sol[1]
        if n < 3:
            # This is optimal for n=2, so return the solution
            return sol_vec, init_sol[2]
        raise NotImplementedError("only the 2-vector case of MinNormSolver is transcribed")


# ------------------------------------------------------------------ MMPareto step


def published_mmpareto_step(model, optimizer, x_a, x_v, y, gamma=1.5, step=False):
    """One iteration of ``train_epoch`` in code/MMPareto.py.

    Leaves the MMPareto gradients in ``param.grad``; calls ``optimizer.step()`` only
    when ``step`` is true. Returns the published intermediate values for the tests.
    """
    criterion = nn.CrossEntropyLoss()

    record_names_audio = []
    record_names_visual = []
    for name, param in model.named_parameters():
        if 'head' in name:
            continue
        if 'audio' in name:
            record_names_audio.append((name, param))
            continue
        if 'visual' in name:
            record_names_visual.append((name, param))
            continue

    optimizer.zero_grad()
    out, out_a, out_v = model(x_a.float(), x_v.float())

    loss_mm = criterion(out, y)
    loss_a = criterion(out_a, y)
    loss_v = criterion(out_v, y)

    losses = [loss_mm, loss_a, loss_v]
    all_loss = ['both', 'audio', 'visual']

    grads_audio = {}
    grads_visual = {}

    for idx, loss_type in enumerate(all_loss):
        loss = losses[idx]
        loss.backward(retain_graph=True)

        if loss_type == 'visual':
            for tensor_name, param in record_names_visual:
                if loss_type not in grads_visual.keys():
                    grads_visual[loss_type] = {}
                grads_visual[loss_type][tensor_name] = param.grad.data.clone()
            grads_visual[loss_type]["concat"] = torch.cat(
                [grads_visual[loss_type][tensor_name].flatten() for tensor_name, _ in record_names_visual])

        elif loss_type == 'audio':
            for tensor_name, param in record_names_audio:
                if loss_type not in grads_audio.keys():
                    grads_audio[loss_type] = {}
                grads_audio[loss_type][tensor_name] = param.grad.data.clone()
            grads_audio[loss_type]["concat"] = torch.cat(
                [grads_audio[loss_type][tensor_name].flatten() for tensor_name, _ in record_names_audio])

        else:
            for tensor_name, param in record_names_audio:
                if loss_type not in grads_audio.keys():
                    grads_audio[loss_type] = {}
                grads_audio[loss_type][tensor_name] = param.grad.data.clone()
            grads_audio[loss_type]["concat"] = torch.cat(
                [grads_audio[loss_type][tensor_name].flatten() for tensor_name, _ in record_names_audio])
            for tensor_name, param in record_names_visual:
                if loss_type not in grads_visual.keys():
                    grads_visual[loss_type] = {}
                grads_visual[loss_type][tensor_name] = param.grad.data.clone()
            grads_visual[loss_type]["concat"] = torch.cat(
                [grads_visual[loss_type][tensor_name].flatten() for tensor_name, _ in record_names_visual])

        optimizer.zero_grad()

    this_cos_audio = F.cosine_similarity(grads_audio['both']["concat"], grads_audio['audio']["concat"], dim=0)
    this_cos_visual = F.cosine_similarity(grads_visual['both']["concat"], grads_visual['visual']["concat"], dim=0)

    audio_task = ['both', 'audio']
    visual_task = ['both', 'visual']

    # audio_k[0]: weight of multimodal loss, audio_k[1]: weight of audio loss
    # if cos angle < 0, solve pareto, else use equal weight
    audio_k = [0, 0]
    visual_k = [0, 0]

    if this_cos_audio > 0:
        audio_k[0] = 0.5
        audio_k[1] = 0.5
    else:
        audio_k, min_norm = MinNormSolver.find_min_norm_element([list(grads_audio[t].values()) for t in audio_task])
    if this_cos_visual > 0:
        visual_k[0] = 0.5
        visual_k[1] = 0.5
    else:
        visual_k, min_norm = MinNormSolver.find_min_norm_element([list(grads_visual[t].values()) for t in visual_task])

    loss = loss_mm + loss_a + loss_v
    loss.backward()

    for name, param in model.named_parameters():
        if param.grad is not None:
            layer = re.split('[_.]', str(name))
            if 'head' in layer:
                continue
            if 'audio' in layer:
                three_norm = torch.norm(param.grad.data.clone())
                new_grad = 2 * audio_k[0] * grads_audio['both'][name] + 2 * audio_k[1] * grads_audio['audio'][name]
                new_norm = torch.norm(new_grad)
                diff = three_norm / new_norm
                if diff > 1:
                    param.grad = diff * new_grad * gamma
                else:
                    param.grad = new_grad * gamma

            if 'visual' in layer:
                three_norm = torch.norm(param.grad.data.clone())
                new_grad = 2 * visual_k[0] * grads_visual['both'][name] + 2 * visual_k[1] * grads_visual['visual'][name]
                new_norm = torch.norm(new_grad)
                diff = three_norm / new_norm
                if diff > 1:
                    param.grad = diff * new_grad * gamma
                else:
                    param.grad = new_grad * gamma

    if step:
        optimizer.step()

    return {
        "loss": loss.item(),
        "cos_audio": float(this_cos_audio),
        "cos_visual": float(this_cos_visual),
        "audio_k": [float(k) for k in audio_k],
        "visual_k": [float(k) for k in visual_k],
    }


def published_mmpareto_combine(grads_mm, grads_uni, groups, gamma=1.5):
    """The second half of the published loop, on given per-tensor gradient lists.

    ``grads_mm[t]`` plays ``grads_<m>['both'][name]``, ``grads_uni[t]`` plays
    ``grads_<m>['<m>'][name]`` for a tensor of group ``groups[t] >= 0``; the fourth
    backward's gradient of such a tensor is ``grads_mm[t] + grads_uni[t]``.
    A tensor of group -1 keeps the fourth backward's gradient ``grads_mm[t] +
    grads_uni[t]`` untouched (the loop never rewrites it).

    Returns ``(new_grads, info)``; ``info`` has per group ``cos`` and ``k`` and per
    tensor the published ``diff`` (None outside groups).
    """
    n = len(grads_mm)
    names = [f"t{t}" for t in range(n)]
    num_groups = max(groups) + 1 if groups else 0

    # The dicts the three backward passes build: per group, 'both' and 'uni'.
    grads = []
    for g in range(num_groups):
        record = [(names[t], t) for t in range(n) if groups[t] == g]
        d = {"both": {}, "uni": {}}
        for tensor_name, t in record:
            d["both"][tensor_name] = grads_mm[t].data.clone()
            d["uni"][tensor_name] = grads_uni[t].data.clone()
        for key in ("both", "uni"):
            d[key]["concat"] = torch.cat([d[key][tensor_name].flatten() for tensor_name, _ in record])
        grads.append(d)

    cos, ks = [], []
    for g in range(num_groups):
        this_cos = F.cosine_similarity(grads[g]["both"]["concat"], grads[g]["uni"]["concat"], dim=0)
        k = [0, 0]
        if this_cos > 0:
            k[0] = 0.5
            k[1] = 0.5
        else:
            k, min_norm = MinNormSolver.find_min_norm_element([list(grads[g][t].values()) for t in ("both", "uni")])
        cos.append(float(this_cos))
        ks.append(k)

    new_grads, diffs = [], []
    for t in range(n):
        three = grads_mm[t] + grads_uni[t]  # the fourth backward's gradient
        g = groups[t]
        if g < 0:
            new_grads.append(three)
            diffs.append(None)
            continue
        k = ks[g]
        three_norm = torch.norm(three.data.clone())
        new_grad = 2 * k[0] * grads[g]["both"][names[t]] + 2 * k[1] * grads[g]["uni"][names[t]]
        new_norm = torch.norm(new_grad)
        diff = three_norm / new_norm
        if diff > 1:
            new_grads.append(diff * new_grad * gamma)
        else:
            new_grads.append(new_grad * gamma)
        diffs.append(float(diff))
    return new_grads, {"cos": cos, "k": [[float(x) for x in k] for k in ks], "diff": diffs}


# ----------------------------------------------------------------------- DGL step


def published_dgl_step(model, x_a, x_v, y, alpha=4.0, max_norm=40.0, optimizer=None):
    """One iteration of ``train_epoch`` in main_dgl.py.

    Leaves the DGL gradients (clipped) in ``param.grad``; steps ``optimizer`` if one
    is given. Returns the total norm ``clip_grad_norm_`` reported.
    """
    criterion = nn.CrossEntropyLoss()
    if optimizer is not None:
        optimizer.zero_grad()
    else:
        model.zero_grad(set_to_none=True)

    out, out_a, out_v = model(x_a.float(), x_v.float())

    loss_v = criterion(out_v, y)
    loss_a = criterion(out_a, y)
    loss_f = criterion(out, y)

    # calculate the unimodal gradient for modality encoder
    loss_unimodal = (loss_a + loss_v) * alpha
    loss_unimodal.backward(retain_graph=True)

    # remove unimodal gradient in the fusion module
    for name, parms in model.named_parameters():
        # published: split('.')[1], its names carry DataParallel's 'module.' prefix
        layer = str(name).split('.')[0]
        if 'fusion' in layer:
            parms.grad = None

    # calculate the gradient in the fusion module
    loss_f.backward()

    total_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm, norm_type=2)

    if optimizer is not None:
        optimizer.step()
    return total_norm


# ------------------------------------------------------------------------ helpers


def per_loss_grads(model, losses):
    """For each loss, the gradients of all ``model.parameters()`` (None -> zeros)."""
    params = list(model.parameters())
    result = []
    for loss in losses:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        result.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
    return result
