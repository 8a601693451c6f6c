"""The distillation loss and the student's settings, without ranks or a registry."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tasks.config import ConfigError
from tasks.train.distill import DistillError, resolve_teacher, student_settings
from tasks.train.rank import distill_loss
from tests.helpers.project import make_settings


def test_kd_term_is_zero_for_the_teachers_own_logits_and_positive_otherwise():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 11)
    ce = torch.tensor(3.0)
    loss, kd = distill_loss(t, t, ce, temperature=2.0, alpha=0.5)
    assert kd.item() == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(1.5)
    loss, kd = distill_loss(torch.randn(2, 5, 11), t, ce, temperature=2.0, alpha=0.5)
    assert kd.item() > 0 and loss.item() == pytest.approx(0.5 * kd.item() + 1.5)
    assert distill_loss(torch.randn(2, 5, 11), t, ce, 2.0, alpha=0.0)[0].item() == pytest.approx(3.0)


def test_kd_term_is_temperature_squared_times_the_kl_of_softened_distributions():
    torch.manual_seed(1)
    s, t = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
    T = 3.0
    p = F.softmax(t / T, -1)
    kl = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    assert distill_loss(s, t, torch.tensor(0.0), T, 1.0)[1].item() == \
        pytest.approx(T * T * kl.item(), rel=1e-5)


def test_kd_gradient_moves_the_student_toward_the_teacher():
    torch.manual_seed(2)
    t = torch.randn(1, 3, 5)
    s = torch.zeros(1, 3, 5, requires_grad=True)
    before = distill_loss(s, t, torch.tensor(0.0), 2.0, 1.0)[1]
    before.backward()
    with torch.no_grad():
        stepped = s - 1.0 * s.grad
    assert distill_loss(stepped, t, torch.tensor(0.0), 2.0, 1.0)[1] < before


def test_student_settings_take_the_students_shape_and_the_teachers_block(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model": {
        "vocab_size": 2048, "n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 64, "pos": "learned"}}))
    s = make_settings(tmp_path, "distill.n_layer=1", "distill.d_model=32", "distill.n_head=2",
                      "distill.max_steps=7")
    st = student_settings(s, teacher)
    assert (st.model.n_layer, st.model.d_model, st.model.n_head) == (1, 32, 2)
    assert (st.model.block_size, st.model.pos) == (64, "learned")
    assert st.train.max_steps == 7 and st.tracking.registered_model == "chat-gpt-small"
    assert st.train.lr == s.distill.lr and st.train.lr != s.train.lr
    # the teacher's settings are untouched
    assert st.hash("model") != s.hash("model") and s.train.max_steps != 7


def test_bad_distill_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"distill: .*d_model=66 must be divisible by n_head=4"):
        make_settings(tmp_path, "distill.d_model=66", "distill.n_head=4")
    with pytest.raises(ConfigError, match="distill.alpha"):
        make_settings(tmp_path, "distill.alpha=1.5")


def test_a_teacher_directory_without_weights_is_refused_by_name(tmp_path):
    with pytest.raises(DistillError, match="model.safetensors"):
        resolve_teacher(make_settings(tmp_path), weights_dir=tmp_path)
