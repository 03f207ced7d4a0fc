"""CryoLike's comparator algorithm (spec §10.2) in torch, as the speed baseline.

Per template batch: displaced templates ``T·K``, times ``σ``, FFT over all W angles (every
order kept). Per image batch: ``conj(FFT(σ·C·I))``, ``einsum("mnq,sdnq->msdq")`` over all W
orders, ``irfft`` (which reads only W/2+1 of them), template norms through an
``[m, s, n, q]`` temporary, normalisation, and the max over (d, w) of the full ``[m, s, d, w]``
tensor; image FFTs are recomputed for every template batch, as in CryoLike. Batch sizes are
CryoLike's example script's (16 templates × 64 images).
"""

from __future__ import annotations

import numpy as np
import torch


def cryolike_best_pose(
    templates: np.ndarray,
    images: np.ndarray,
    ctf: np.ndarray,
    kernel: np.ndarray,
    shell_weights: np.ndarray,
    n_templates_per_batch: int = 16,
    n_images_per_batch: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Best cross-correlation per image and its flat pose index ``s·D·W + d·W + w``."""
    t_all = torch.from_numpy(np.asarray(templates))
    i_all = torch.from_numpy(np.asarray(images))
    c_all = torch.from_numpy(np.asarray(ctf, dtype=np.float32))
    k = torch.from_numpy(np.asarray(kernel))
    sigma = torch.sqrt(torch.from_numpy(np.asarray(shell_weights, dtype=np.float32)))[:, None]
    n_s, _, n_w = t_all.shape
    n_m = i_all.shape[0]
    n_d = k.shape[0]
    best = torch.full((n_m, n_s), -torch.inf)
    arg = torch.zeros((n_m, n_s), dtype=torch.int64)
    for t0 in range(0, n_s, n_templates_per_batch):
        t = t_all[t0 : t0 + n_templates_per_batch]
        t_sigma = t * sigma
        displaced = (t[:, None] * k[None]) * sigma  # [s, d, n, w]
        tq = torch.fft.fft(displaced, dim=-1, norm="ortho")
        t_sq = torch.fft.fft(t_sigma.conj() * t_sigma, dim=-1, norm="ortho").unsqueeze(0)
        for i0 in range(0, n_m, n_images_per_batch):
            im = i_all[i0 : i0 + n_images_per_batch]
            c = c_all[i0 : i0 + n_images_per_batch]
            iq = torch.fft.fft(sigma * im * c, dim=-1, norm="ortho").conj()
            xq = torch.einsum("mnq,sdnq->msdq", iq, tq)
            x = torch.fft.irfft(xq, n=n_w, dim=-1, norm="forward")
            c_sq = (
                torch.fft.fft((c * c).to(torch.complex64), dim=-1, norm="ortho").conj().unsqueeze(1)
            )
            ixx = torch.fft.irfft((t_sq * c_sq).sum(2), n=n_w, dim=-1, norm="forward")
            iyy = torch.sum((im * sigma).abs() ** 2, dim=(-1, -2))
            cc = x / torch.sqrt(ixx[:, :, None, :] * iyy[:, None, None, None])
            values, index = cc.flatten(2).max(dim=-1)
            best[i0 : i0 + len(im), t0 : t0 + len(t)] = values
            arg[i0 : i0 + len(im), t0 : t0 + len(t)] = index
    s_best = best.argmax(dim=1)
    rows = torch.arange(n_m)
    return best[rows, s_best].numpy(), (s_best * n_d * n_w + arg[rows, s_best]).numpy()
