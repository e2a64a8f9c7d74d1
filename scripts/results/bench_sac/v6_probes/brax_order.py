"""Probe (issue 14, v6): SAC gradient steps in Brax's order (alpha, critics and actor all from the
pre-update parameters), as drop-in replacements of ``lunarl.agents.sac._learn`` for A/B timing.

* ``make_learn(False)``: Brax's order, separate passes (a custom-VJP dense so ``dtype`` can be bf16).
* ``make_learn(True)``: one actor pass over ``[obs; next_obs]`` (512 rows) and one critic pass over
  ``[(obs, a); (obs, pi(obs))]``, with parameter gradients from the first half of the rows only.
* ``make_learn_split()``: the same sharing, but only the matmul runs over 512 rows; bias and
  activation per 256-row half.

Not used by lunarl; measured in ``scripts/results/sac.md`` (v6).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from lunarl.agents import sac
from lunarl.agents.networks import ACTIVATIONS


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def dense(x, w, b, param_rows, input_rows, dtype):
    y = jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return y + b


def _dense_fwd(x, w, b, param_rows, input_rows, dtype):
    return dense(x, w, b, param_rows, input_rows, dtype), (x, w)


def _dense_bwd(param_rows, input_rows, dtype, res, dy):
    x, w = res
    n = x.shape[0]
    pr = n if param_rows is None else param_rows
    ir = n if input_rows is None else input_rows
    dyp = dy[:pr]
    dw = jnp.dot(x[:pr].T.astype(dtype), dyp.astype(dtype), preferred_element_type=jnp.float32)
    db = jnp.sum(dyp, axis=0)
    dx = jnp.dot(dy[:ir].astype(dtype), w.T.astype(dtype), preferred_element_type=jnp.float32)
    if ir < n:
        dx = jnp.concatenate([dx, jnp.zeros((n - ir,) + dx.shape[1:], dx.dtype)])
    return dx.astype(x.dtype), dw, db


dense.defvjp(_dense_fwd, _dense_bwd)


def mlp(layers, x, act, param_rows=None, input_rows=None, dtype=jnp.float32):
    names = sorted(layers, key=lambda s: int(s.split("_")[1]))
    for i, name in enumerate(names):
        x = dense(x, layers[name]["kernel"], layers[name]["bias"], param_rows, input_rows, dtype)
        if i < len(names) - 1:
            x = act(x)
    return x


def actor_fwd(cfg, p, obs, **kw):
    out = mlp(p["params"]["MLP_0"], obs, ACTIVATIONS[cfg.activation], **kw)
    mean, raw = jnp.split(out, 2, axis=-1)
    log_std = cfg.log_std_min + 0.5 * (cfg.log_std_max - cfg.log_std_min) * (jnp.tanh(raw) + 1.0)
    return mean, log_std


def critic_fwd(cfg, p, obs, action, **kw):
    x = jnp.concatenate([obs, action], axis=-1)
    act = ACTIVATIONS[cfg.activation]
    q1 = mlp(p["params"]["q1"], x, act, **kw)
    q2 = mlp(p["params"]["q2"], x, act, **kw)
    return jnp.stack([q1[..., 0], q2[..., 0]])


def make_learn(share: bool, dtype=jnp.float32):
    """Brax order: alpha, critic and actor all from the pre-update parameters (old alpha)."""

    def _learn(env, cfg, params, opt_state, batches, rng, hparams=None):
        hp = {"learning_rate": cfg.learning_rate, "tau": cfg.tau} | dict(hparams or {})
        adam = sac._adam(cfg, hp["learning_rate"])
        target_entropy = -float(env.action_size)
        B = cfg.batch_size

        def sample(mean, log_std, key):
            return sac.squashed_gaussian(mean, log_std).sample_and_log_prob(seed=key)

        def loss(ac, batch, target_p, alpha, k_next, k_actor):
            actor_p, critic_p = ac
            if share:
                mean, log_std = actor_fwd(
                    cfg,
                    actor_p,
                    jnp.concatenate([batch.obs, batch.next_obs]),
                    param_rows=B,
                    input_rows=B,
                    dtype=dtype,
                )
                a_pi, log_prob = sample(mean[:B], log_std[:B], k_actor)
                next_a, next_lp = sample(
                    jax.lax.stop_gradient(mean[B:]), jax.lax.stop_gradient(log_std[B:]), k_next
                )
            else:
                mean, log_std = actor_fwd(cfg, actor_p, batch.obs, dtype=dtype)
                a_pi, log_prob = sample(mean, log_std, k_actor)
                nm, nl = actor_fwd(cfg, jax.lax.stop_gradient(actor_p), batch.next_obs, dtype=dtype)
                next_a, next_lp = sample(nm, nl, k_next)
            next_q = critic_fwd(cfg, target_p, batch.next_obs, next_a, dtype=dtype)
            target = jax.lax.stop_gradient(
                sac.td_target(next_q, next_lp, batch.reward, batch.discount, alpha)
            )
            if share:
                q_all = critic_fwd(
                    cfg,
                    critic_p,
                    jnp.concatenate([batch.obs, batch.obs]),
                    jnp.concatenate([batch.action, a_pi]),
                    param_rows=B,
                    dtype=dtype,
                )
                q, q_pi = q_all[:, :B], q_all[:, B:]
            else:
                q = critic_fwd(cfg, critic_p, batch.obs, batch.action, dtype=dtype)
                q_pi = critic_fwd(cfg, jax.lax.stop_gradient(critic_p), batch.obs, a_pi, dtype=dtype)
            per_critic = jnp.mean(jnp.square(q - target), axis=1)
            a_loss = jnp.mean(alpha * log_prob - jnp.min(q_pi, axis=0))
            return jnp.sum(per_critic) + a_loss, (per_critic, jnp.mean(q, axis=1), a_loss, log_prob)

        def update(carry, xs):
            actor_p, critic_p, target_p, log_alpha, opt = carry
            batch, key = xs
            k_next, k_actor = jax.random.split(key)
            alpha = jnp.exp(log_alpha)
            (_, (per_critic, q_mean, a_loss, log_prob)), (g_actor, g_critic) = jax.value_and_grad(
                loss, has_aux=True
            )((actor_p, critic_p), batch, target_p, alpha, k_next, k_actor)
            up, critic_opt = adam.update(g_critic, opt["critic"])
            critic_p = optax.apply_updates(critic_p, up)
            up, actor_opt = adam.update(g_actor, opt["actor"])
            actor_p = optax.apply_updates(actor_p, up)
            log_prob = jax.lax.stop_gradient(log_prob)
            al_loss, grad = jax.value_and_grad(
                lambda la: -jnp.mean(jnp.exp(la) * (log_prob + target_entropy))
            )(log_alpha)
            if cfg.autotune:
                up, alpha_opt = adam.update(grad, opt["log_alpha"])
                log_alpha = log_alpha + up
            else:
                alpha_opt = opt["log_alpha"]
            target_p = jax.tree.map(lambda t, c: t + hp["tau"] * (c - t), target_p, critic_p)
            opt = {"actor": actor_opt, "critic": critic_opt, "log_alpha": alpha_opt}
            metrics = {
                "losses/qf1_loss": per_critic[0],
                "losses/qf2_loss": per_critic[1],
                "losses/qf_loss": jnp.sum(per_critic) / 2.0,
                "losses/qf1_values": q_mean[0],
                "losses/qf2_values": q_mean[1],
                "losses/actor_loss": a_loss,
                "losses/alpha": alpha,
                "losses/alpha_loss": al_loss,
                "losses/entropy": -jnp.mean(log_prob),
            }
            return (actor_p, critic_p, target_p, log_alpha, opt), metrics

        keys = jax.random.split(rng, cfg.updates_per_iteration)
        carry = (params["actor"], params["critic"], params["target_critic"], params["log_alpha"], opt_state)
        (actor_p, critic_p, target_p, log_alpha, opt_state), metrics = jax.lax.scan(
            update, carry, (batches, keys)
        )
        params = {"actor": actor_p, "critic": critic_p, "target_critic": target_p, "log_alpha": log_alpha}
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    return _learn


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense2(x1, x2, w, b, grad_x1):
    """One matmul over the rows of x1 and x2; bias per block. Param grads from block 1 only."""
    n1 = x1.shape[0]
    y = jnp.dot(jnp.concatenate([x1, x2]), w)
    return y[:n1] + b, y[n1:] + b


def _dense2_fwd(x1, x2, w, b, grad_x1):
    return _dense2(x1, x2, w, b, grad_x1), (x1, x2, w)


def _dense2_bwd(grad_x1, res, dys):
    x1, x2, w = res
    dy1, dy2 = dys
    n1 = x1.shape[0]
    dw = jnp.dot(x1.T, dy1)
    db = jnp.sum(dy1, axis=0)
    if grad_x1:
        dx = jnp.dot(jnp.concatenate([dy1, dy2]), w.T)
        dx1, dx2 = dx[:n1], dx[n1:]
    else:
        dx1 = jnp.zeros_like(x1)
        dx2 = jnp.dot(dy2, w.T)
    return dx1, dx2, dw, db


_dense2.defvjp(_dense2_fwd, _dense2_bwd)


def mlp2(layers, x1, x2, act, grad_x1):
    names = sorted(layers, key=lambda s: int(s.split("_")[1]))
    for i, name in enumerate(names):
        x1, x2 = _dense2(x1, x2, layers[name]["kernel"], layers[name]["bias"], grad_x1 or i > 0)
        if i < len(names) - 1:
            x1, x2 = act(x1), act(x2)
    return x1, x2


def make_learn_split():
    def _learn(env, cfg, params, opt_state, batches, rng, hparams=None):
        hp = {"learning_rate": cfg.learning_rate, "tau": cfg.tau} | dict(hparams or {})
        adam = sac._adam(cfg, hp["learning_rate"])
        target_entropy = -float(env.action_size)
        act = ACTIVATIONS[cfg.activation]

        def sample(mean, log_std, key):
            return sac.squashed_gaussian(mean, log_std).sample_and_log_prob(seed=key)

        def heads(out):
            mean, raw = jnp.split(out, 2, axis=-1)
            return mean, cfg.log_std_min + 0.5 * (cfg.log_std_max - cfg.log_std_min) * (jnp.tanh(raw) + 1.0)

        def loss(ac, batch, target_p, alpha, k_next, k_actor):
            actor_p, critic_p = ac
            # actor: block 1 = obs (param grads), block 2 = next_obs (no grads needed)
            o1, o2 = mlp2(actor_p["params"]["MLP_0"], batch.obs, batch.next_obs, act, grad_x1=False)
            a_pi, log_prob = sample(*heads(o1), k_actor)
            next_a, next_lp = sample(*heads(jax.lax.stop_gradient(o2)), k_next)
            next_q = critic_fwd(cfg, target_p, batch.next_obs, next_a)
            target = jax.lax.stop_gradient(
                sac.td_target(next_q, next_lp, batch.reward, batch.discount, alpha)
            )
            x1 = jnp.concatenate([batch.obs, batch.action], -1)
            x2 = jnp.concatenate([batch.obs, a_pi], -1)
            qs = [mlp2(critic_p["params"][k], x1, x2, act, grad_x1=False) for k in ("q1", "q2")]
            q = jnp.stack([qs[0][0][..., 0], qs[1][0][..., 0]])
            q_pi = jnp.stack([qs[0][1][..., 0], qs[1][1][..., 0]])
            per_critic = jnp.mean(jnp.square(q - target), axis=1)
            a_loss = jnp.mean(alpha * log_prob - jnp.min(q_pi, axis=0))
            return jnp.sum(per_critic) + a_loss, (per_critic, jnp.mean(q, axis=1), a_loss, log_prob)

        def update(carry, xs):
            actor_p, critic_p, target_p, log_alpha, opt = carry
            batch, key = xs
            k_next, k_actor = jax.random.split(key)
            alpha = jnp.exp(log_alpha)
            (_, (per_critic, q_mean, a_loss, log_prob)), (g_actor, g_critic) = jax.value_and_grad(
                loss, has_aux=True
            )((actor_p, critic_p), batch, target_p, alpha, k_next, k_actor)
            up, critic_opt = adam.update(g_critic, opt["critic"])
            critic_p = optax.apply_updates(critic_p, up)
            up, actor_opt = adam.update(g_actor, opt["actor"])
            actor_p = optax.apply_updates(actor_p, up)
            log_prob = jax.lax.stop_gradient(log_prob)
            al_loss, grad = jax.value_and_grad(
                lambda la: -jnp.mean(jnp.exp(la) * (log_prob + target_entropy))
            )(log_alpha)
            if cfg.autotune:
                up, alpha_opt = adam.update(grad, opt["log_alpha"])
                log_alpha = log_alpha + up
            else:
                alpha_opt = opt["log_alpha"]
            target_p = jax.tree.map(lambda t, c: t + hp["tau"] * (c - t), target_p, critic_p)
            opt = {"actor": actor_opt, "critic": critic_opt, "log_alpha": alpha_opt}
            metrics = {
                "losses/qf1_loss": per_critic[0],
                "losses/qf2_loss": per_critic[1],
                "losses/qf_loss": jnp.sum(per_critic) / 2.0,
                "losses/qf1_values": q_mean[0],
                "losses/qf2_values": q_mean[1],
                "losses/actor_loss": a_loss,
                "losses/alpha": alpha,
                "losses/alpha_loss": al_loss,
                "losses/entropy": -jnp.mean(log_prob),
            }
            return (actor_p, critic_p, target_p, log_alpha, opt), metrics

        keys = jax.random.split(rng, cfg.updates_per_iteration)
        carry = (params["actor"], params["critic"], params["target_critic"], params["log_alpha"], opt_state)
        (actor_p, critic_p, target_p, log_alpha, opt_state), metrics = jax.lax.scan(
            update, carry, (batches, keys)
        )
        params = {"actor": actor_p, "critic": critic_p, "target_critic": target_p, "log_alpha": log_alpha}
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    return _learn
