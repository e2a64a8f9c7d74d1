"""Per-program XLA options: lunarl compiles its own programs with the fusion emitters each env wants."""

from __future__ import annotations

import os

import jax

import lunarl
from lunarl.envs import env_class


def test_envs_declare_their_cpu_fusion_emitter_setting(monkeypatch):
    monkeypatch.setenv("LUNARL_USER_XLA_FLAGS", "")
    assert jax.default_backend() == "cpu"
    key = "xla_cpu_use_fusion_emitters"
    assert lunarl.compile_options(env_class("rover")) == {key: True}
    assert lunarl.compile_options(env_class("car_track")) == {key: True}
    # MJX is orders of magnitude slower with them on: kuka keeps the process default (off).
    assert lunarl.compile_options(env_class("kuka")) == {key: False}
    # Anything that is not a lunarl env keeps the process default too.
    assert lunarl.compile_options(object()) == {key: False}


def test_a_user_set_flag_wins(monkeypatch):
    monkeypatch.setenv("LUNARL_USER_XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    assert lunarl.compile_options(env_class("kuka")) == {}
    assert lunarl.compile_options(env_class("rover")) == {}


def test_set_process_fusion_emitters_replaces_lunarls_default(monkeypatch):
    from lunarl._platform import set_process_fusion_emitters

    monkeypatch.setenv("LUNARL_USER_XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_cpu_use_fusion_emitters=false")
    assert set_process_fusion_emitters(True) is True
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_cpu_use_fusion_emitters=true"
    # The user's own setting is kept and reported.
    monkeypatch.setenv("LUNARL_USER_XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
    assert set_process_fusion_emitters(True) is False
    assert os.environ["XLA_FLAGS"].endswith("--xla_cpu_use_fusion_emitters=true")  # untouched


def test_options_compile_and_give_the_same_numbers():
    env = lunarl.envs.make("rover")
    key = jax.random.PRNGKey(3)
    step = lambda k: env.step(env.reset(k), jax.numpy.array([1.0, 0.3, 1.0]))  # noqa: E731
    on = jax.jit(step, compiler_options={"xla_cpu_use_fusion_emitters": True})(key)
    off = jax.jit(step, compiler_options={"xla_cpu_use_fusion_emitters": False})(key)
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off), strict=True):
        assert jax.numpy.allclose(a, b, atol=1e-5), (a, b)
