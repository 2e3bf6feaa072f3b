"""Negative-aware forward-process loss, uncertainty-masked KL and dynamic reference.

Paper Eq. 1, 2, 4 and the training step of Algorithm 1. How train.py uses this file, per step:

    A, r = advantages(rewards, G)                  # Eq. 4, once, on the whole local batch
    mask = ctrl.uncertainty_mask(primary, aux)     # once; who gets the KL penalty
    for sl in micro_batches:                       # local batch of N samples, m = int(mask.sum())
        loss = policy_loss(x0_theta, x0_old, x0[sl], r[sl], n=N)
        if mask[sl].any():                         # else: skip the reference forward
            loss = loss + kl_loss(x0_theta, x0_ref, mask[sl], n_masked=m)
        loss.backward()
    optimizer.step(); ema_(old_params, params)
    if ctrl.should_reset_reference(kl):            # kl: the step's mean masked mse, without lambda
        copy_(ref_params, params)

x0 predictions come from velocities: x_t = (1 - t) x0 + t eps, v = eps - x0, so x0_pred = x_t - t v_pred.
"""
import math

import torch
import torch.distributed as dist


def _world():
    return dist.is_available() and dist.is_initialized()


def _gather(x):
    """x from every rank, concatenated in rank order (every rank must pass the same shape)."""
    if not _world():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _check_finite(name, x):
    bad = ~torch.isfinite(x)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: {int(bad.sum())} non-finite value(s), e.g. {x[tuple(i)].item()} at index {i}")


def _check_same_shape(**xs):
    shapes = {k: tuple(v.shape) for k, v in xs.items()}
    if len(set(shapes.values())) != 1 or () in shapes.values():
        raise ValueError(f"shape mismatch: {shapes} (need equal shapes with a batch dimension)")


def _mse(a, b):
    """Per-sample mean squared error over all non-batch elements, in fp32 (x0 may come out of bf16 autocast)."""
    return (a.float() - b.float()).square().flatten(1).mean(1)


def _rank(x):
    """Ascending 1-based ranks along dim 0 (highest reward = rank N); tied values share their average rank."""
    x = x.movedim(0, -1).contiguous()
    s = x.sort().values  # rank = #smaller + (#equal + 1) / 2, found by binary search: O(N log N) for big steps
    return ((torch.searchsorted(s, x) + torch.searchsorted(s, x, right=True) + 1).double() / 2).movedim(-1, 0)


def advantages(rewards, group_size, a_max=5.0):
    """Eq. 4. rewards: float [N], this rank's samples, whole groups of `group_size` contiguous candidates; under
    torch.distributed every rank calls it with the same N. Returns A [N] (centred on the group mean, divided by
    the std of all rewards of the step on all ranks, clipped to [-a_max, a_max]) and r [N] in [0, 1]: the weight
    of the positive policy in Eq. 2."""
    if rewards.ndim != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a 1-D float tensor, got shape {tuple(rewards.shape)} {rewards.dtype}")
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch of {len(rewards)} rewards")
    all_rewards = _gather(rewards.float())
    _check_finite("rewards", all_rewards)  # after the gather: every rank raises, none is left waiting
    R = rewards.float().view(-1, group_size)
    A = (R - R.mean(1, keepdim=True)).flatten()  # Eq. 4: A_i = R_i - mean of the G candidates sharing a prefix
    A = A / (all_rewards.std(correction=0) + 1e-4)  # Eq. 4: the step's global std (+1e-4: all rewards equal)
    A = A.clamp(-a_max, a_max)  # Eq. 4: clip to A_max, so one outlier cannot dominate
    return A, 0.5 + 0.5 * A / a_max  # Eq. 4: r = clip(A / A_max, -1, 1) / 2 + 1/2


def policy_loss(x0_theta, x0_old, x0, r, beta=1.0, n=None):
    """Eq. 1, 2: negative-aware loss in x0 space. x0_theta (grad), x0_old (theta_old), x0 (clean sample): [B, ...];
    r [B] from advantages(). Returns the sum of the B per-sample losses divided by n (default B: a plain mean).
    For micro-batches of a local batch of N samples pass n=N: the micro-batch losses add up to the full mean."""
    _check_same_shape(x0_theta=x0_theta, x0_old=x0_old, x0=x0)
    if r.shape != x0.shape[:1]:
        raise ValueError(f"shape mismatch: r {tuple(r.shape)} should be {tuple(x0.shape[:1])}, one weight per sample")
    x0_old, x0 = x0_old.detach(), x0.detach()
    # Eq. 1 in x0 space: x0 = x_t - t v is affine in v with x_t shared, so interpolating velocities
    # v+ = (1 - beta) v_old + beta v_theta, v- = (1 + beta) v_old - beta v_theta is interpolating x0 predictions.
    x0_plus = (1 - beta) * x0_old + beta * x0_theta  # Eq. 1: implicit positive policy
    x0_minus = (1 + beta) * x0_old - beta * x0_theta  # Eq. 1: implicit negative policy, x0_plus mirrored about x0_old
    # Eq. 2: pull the positive policy toward good samples (r -> 1) and the negative one toward bad samples
    # (r -> 0); pulling x0_minus toward x0 pushes x0_theta away from it. No adaptive weighting (it diverged).
    L = r * _mse(x0_plus, x0) + (1 - r) * _mse(x0_minus, x0)
    return L.sum() / (len(L) if n is None else n)


def kl_loss(x0_theta, x0_ref, mask, lam=1e-4, n_masked=None):
    """Selective KL (Algorithm 1): lam * mean over masked samples of mse(x0_theta, x0_ref), x0 space as Eq. 2.
    mask: bool [B] from Controller.uncertainty_mask. With no sample masked it returns an exact 0 without touching
    x0_ref (pass None and skip the reference forward). For micro-batches pass n_masked = the masked count of the
    whole local batch: the micro-batch terms then add up to the full-batch value."""
    if mask.dtype != torch.bool or mask.shape != x0_theta.shape[:1]:
        raise ValueError(f"mask: expected bool of shape {tuple(x0_theta.shape[:1])}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if not mask.any():
        return torch.zeros((), device=x0_theta.device)
    if x0_ref is None:
        raise ValueError(f"x0_ref is None but the mask selects {int(mask.sum())} sample(s)")
    _check_same_shape(x0_theta=x0_theta, x0_ref=x0_ref)
    d = _mse(x0_theta[mask], x0_ref[mask].detach())
    return lam * d.sum() / (len(d) if n_masked is None else n_masked)  # Algorithm 1: KL only on risky samples


class Controller:
    """Step-to-step state of Algorithm 1: the masked fraction rho and the dynamic-reference clock. Its inputs
    are gathered over ranks (or must be equal on all ranks), so every rank holds the same state."""

    def __init__(self, rho=0.1, rho_min=0.02, rho_max=0.2, history=20, tau_kl=0.15, k_max=15):
        self.rho, self.rho_min, self.rho_max, self.history = rho, rho_min, rho_max, history
        self.tau_kl, self.k_max = tau_kl, k_max
        self.d_history = []  # mean non-negative d of the last `history` steps
        self.steps_since_reset = 0

    def uncertainty_mask(self, primary, auxiliaries):
        """primary [N]: composite reward; auxiliaries [N, K]: the individual rewards; this rank's samples. Ranks
        over the whole step (all ranks); returns this rank's bool mask [N] (True: apply the KL) and adapts rho.
        Call once per step, on every rank."""
        if primary.ndim != 1 or auxiliaries.ndim != 2 or len(auxiliaries) != len(primary):
            raise ValueError(f"shape mismatch: primary {tuple(primary.shape)} should be [N], "
                             f"auxiliaries {tuple(auxiliaries.shape)} should be [N, K]")
        P, X = _gather(primary.float()), _gather(auxiliaries.float())
        _check_finite("primary", P)
        _check_finite("auxiliaries", X)
        # Algorithm 1: d > 0 when the primary ranks a sample above what the auxiliaries say: likely reward hacking.
        # We keep K * d: exact in float64 (ranks are half-integers), so equally uncertain steps compare equal below.
        K = X.shape[1]
        Kd = K * _rank(P) - _rank(X).sum(1)
        Kd_pos = Kd[Kd >= 0]  # never empty: every ranking sums to N(N+1)/2, so d sums to 0
        m = Kd_pos.sum().item() / (len(Kd_pos) * K)  # mean non-negative d
        if self.d_history:  # Algorithm 1: mask more when the discrepancy outgrows the last steps, less when it shrinks
            if m > max(self.d_history):
                self.rho *= 1.1
            elif m < min(self.d_history):
                self.rho *= 0.9
            self.rho = min(max(self.rho, self.rho_min), self.rho_max)
        self.d_history = (self.d_history + [m])[-self.history:]
        tau = torch.quantile(Kd_pos, 1 - self.rho)  # Algorithm 1: (1 - rho) percentile, linear like np.percentile
        i, n = (dist.get_rank() if _world() else 0), len(primary)
        return (Kd > tau)[i * n:(i + 1) * n]  # this rank's samples

    def should_reset_reference(self, kl_value):
        """Dynamic reference (Algorithm 1); call once per optimizer step. kl_value: that step's mean masked
        mse(x0_theta, x0_ref) without lambda, the same on every rank (average it over ranks). True: copy theta
        into theta_ref now: when the KL exceeds tau_kl or k_max steps have passed since the last reset."""
        kl_value = float(kl_value)
        if not math.isfinite(kl_value):
            raise ValueError(f"kl_value: non-finite value {kl_value}")
        self.steps_since_reset += 1
        reset = kl_value > self.tau_kl or self.steps_since_reset >= self.k_max
        if reset:
            self.steps_since_reset = 0
        return reset

    def state_dict(self):
        return {"rho": self.rho, "d_history": list(self.d_history), "tau_kl": self.tau_kl,
                "steps_since_reset": self.steps_since_reset}

    def load_state_dict(self, d):
        self.rho, self.d_history = float(d["rho"]), [float(x) for x in d["d_history"]]
        self.tau_kl, self.steps_since_reset = float(d["tau_kl"]), int(d["steps_since_reset"])


def _pairs(dst, src):
    dst, src = list(dst), list(src)
    if len(dst) != len(src):
        raise ValueError(f"parameter lists differ in length: {len(dst)} vs {len(src)}")
    for i, (a, b) in enumerate(zip(dst, src)):
        if a.shape != b.shape:
            raise ValueError(f"parameter {i}: shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return zip(dst, src)


@torch.no_grad()
def ema_(old_params, params, gamma=0.9):
    """Algorithm 1: theta_old <- gamma theta_old + (1 - gamma) theta, in place, after every optimizer step."""
    for o, p in _pairs(old_params, params):
        o.lerp_(p.to(o.dtype), 1 - gamma)  # o + (1 - gamma)(p - o)


@torch.no_grad()
def copy_(dst_params, src_params):
    """Algorithm 1: theta_ref <- theta, in place (LoRA adapter tensors or full parameter copies alike)."""
    for d, s in _pairs(dst_params, src_params):
        d.copy_(s)
