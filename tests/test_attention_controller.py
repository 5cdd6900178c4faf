"""The controller on hand-built sites: row roles, capture -> match, temporal probabilities, skip-interval."""

import pytest
import torch
import torch.nn.functional as F

from i2vedit_core.attention import (AttentionController, AttentionSite, BatchLayout, MatchSettings, TemporalSelector,
                                    matched_attention, threshold_ramp)

FRAMES, HEADS, TOKENS, DIM = 3, 2, 12, 8


def _spatial(rows):
    return AttentionSite("spatial", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", 1,
                         BatchLayout(tuple(rows), FRAMES, TOKENS, (3, 4)))


def _temporal(rows, downscale=1):
    return AttentionSite("temporal", "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1", downscale,
                         BatchLayout(tuple(rows), FRAMES, TOKENS, (3, 4)))


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_spatial_capture_then_match_on_the_cond_row_only():
    controller = AttentionController(MatchSettings(thresholds=(0.2, 0.6)))
    controller.begin_step(0)
    q_src, k_src, v_src = (_rand(FRAMES, HEADS, TOKENS, DIM, seed=s) for s in range(3))
    plain = controller.source_pass()(q_src, k_src, v_src, _spatial(["source"]))
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q_src, k_src, v_src))
    q, k, v = (_rand(2 * FRAMES, HEADS, TOKENS, DIM, seed=s) for s in range(3, 6))
    q[FRAMES:] = q_src + 0.1 * q[FRAMES:]  # a cond row close to the source: partial masks
    out = controller.edit_pass()(q, k, v, _spatial(["uncond", "cond"]))
    torch.testing.assert_close(out[:FRAMES], F.scaled_dot_product_attention(q[:FRAMES], k[:FRAMES], v[:FRAMES]))
    ref, mask = matched_attention(q_src, k_src, q[FRAMES:], k[FRAMES:], v[FRAMES:], threshold_ramp((0.2, 0.6), FRAMES))
    torch.testing.assert_close(out[FRAMES:], ref)
    path = _spatial([]).path
    torch.testing.assert_close(controller.buffer.masks[path][0], mask)
    assert controller.maps.per_layer()[path].shape == (1, FRAMES, 3, 4)


def test_edit_before_source_and_wrong_rows_are_refused():
    controller = AttentionController()
    controller.begin_step(0)
    q = _rand(2 * FRAMES, HEADS, TOKENS, DIM, seed=0)
    with pytest.raises(ValueError, match="source_pass"):
        controller.edit_pass()(q, q, q, _spatial(["uncond", "cond"]))
    with pytest.raises(ValueError, match="batch layout"):
        controller.edit_pass()(q, q, q, _spatial(["cond"]))
    with pytest.raises(ValueError, match="roles"):
        BatchLayout(("negative",), FRAMES, TOKENS)


def test_temporal_uses_source_probabilities_in_stage_one_and_own_attention_after():
    controller = AttentionController(MatchSettings(temporal=TemporalSelector(0.2, 0.2)), steps=10)
    q_src, k_src = (_rand(TOKENS, HEADS, FRAMES, DIM, seed=s) for s in range(2))
    q, k, v = (_rand(2 * TOKENS, HEADS, FRAMES, DIM, seed=s) for s in range(2, 5))
    site = _temporal(["uncond", "cond"])
    for step, expect_source in [(0, True), (1, True), (2, False)]:
        controller.begin_step(step)
        controller.source_pass()(q_src, k_src, q_src, _temporal(["source"]))
        out = controller.edit_pass()(q, k, v, site)
        probs = torch.softmax(q_src @ k_src.transpose(-1, -2) * DIM ** -0.5, -1)
        expected = probs @ v[TOKENS:] if expect_source else F.scaled_dot_product_attention(q[TOKENS:], k[TOKENS:],
                                                                                            v[TOKENS:])
        torch.testing.assert_close(out[TOKENS:], expected)
        torch.testing.assert_close(out[:TOKENS], F.scaled_dot_product_attention(q[:TOKENS], k[:TOKENS], v[:TOKENS]))
        assert (site.path in controller.buffer.temporal_source) == expect_source
        assert (site.path in controller.buffer.probs) == expect_source  # kept only when it will be used


def test_skip_interval_prepends_clip0_kv_per_role_and_step_buffer_is_dropped():
    controller = AttentionController(skip_interval=True)
    controller.begin_step(0)
    k0, v0 = (_rand(2 * TOKENS, HEADS, FRAMES, DIM, seed=s) for s in range(2))
    controller.kv_pass(("uncond", "cond"))(k0, k0, v0, _temporal(["uncond", "cond"]))
    q, k, v = (_rand(2 * TOKENS, HEADS, FRAMES, DIM, seed=s) for s in range(2, 5))
    out = controller.plain_pass(("uncond", "cond"))(q, k, v, _temporal(["uncond", "cond"]))
    ref = F.scaled_dot_product_attention(q, torch.cat([k0, k], 2), torch.cat([v0, v], 2))
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-3)
    # A single kept role (training: source clip 0) serves any row role.
    controller.begin_step(1)
    controller.kv_pass(("source",))(k0[:TOKENS], k0[:TOKENS], v0[:TOKENS], _temporal(["source"]))
    out = controller.plain_pass(("cond",))(q[:TOKENS], k[:TOKENS], v[:TOKENS], _temporal(["cond"]))
    ref = F.scaled_dot_product_attention(q[:TOKENS], torch.cat([k0[:TOKENS], k[:TOKENS]], 2),
                                         torch.cat([v0[:TOKENS], v[:TOKENS]], 2))
    torch.testing.assert_close(out, ref)
    controller.begin_step(2)
    assert not controller.buffer.clip0_kv
    with pytest.raises(ValueError, match="kv_pass"):
        controller.plain_pass(("cond",))(q[:TOKENS], k[:TOKENS], v[:TOKENS], _temporal(["cond"]))


def test_match_settings_validate():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MatchSettings(thresholds=(0.3, 1.5))
    with pytest.raises(ValueError, match="chunk_budget"):
        MatchSettings(chunk_budget=0)


def test_difference_maps_sum_where_m_is_and_reach_the_cpu_only_when_read():
    # A copy to the CPU in add() made the host wait for the GPU at each matched layer (docs/PERFORMANCE.md, run 9).
    # A meta tensor cannot be copied to the CPU, so add() on one fails if it copies.
    from i2vedit_core.attention import DifferenceMaps

    on_meta = DifferenceMaps()
    on_meta.add("layer", (2, 3), torch.empty(1, 4, 6, device="meta"))
    on_meta.add("layer", (2, 3), torch.empty(1, 4, 6, device="meta"))
    steps = [torch.rand(1, 4, 6, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    maps = DifferenceMaps()
    for m in steps:
        maps.add("layer", (2, 3), m)
        m.zero_()  # M's buffer, reused by the next call, must not change the recorded sum
    expected = (torch.stack([torch.rand(1, 4, 6, generator=torch.Generator().manual_seed(s)) for s in range(3)])
                .sum(0) / 3).reshape(1, 4, 2, 3)
    assert maps.per_layer()["layer"].device.type == "cpu"
    torch.testing.assert_close(maps.per_layer()["layer"], expected, rtol=0, atol=1e-7)
