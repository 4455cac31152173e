import pytest
import torch
import torch.nn.functional as F

from vitkit.layers import resample_pos_embed, sincos_2d_pos_embed


def test_identity_when_grid_unchanged():
    table = torch.randn(1, 1 + 49, 16)
    torch.testing.assert_close(resample_pos_embed(table, (7, 7)), table)


def test_grid_for_384_and_non_square():
    table = torch.randn(1, 1 + 196, 8)
    assert resample_pos_embed(table, (24, 24)).shape == (1, 1 + 576, 8)
    out = resample_pos_embed(table, (14, 20))
    assert out.shape == (1, 1 + 280, 8)
    torch.testing.assert_close(out[:, :1], table[:, :1])  # [CLS] row untouched


def test_matches_interpolating_the_2d_grid_row_major():
    table = torch.randn(1, 2 + 12, 5)  # two prefix rows, a 3x4 grid
    out = resample_pos_embed(table, (6, 8), old_grid=(3, 4), num_prefix_tokens=2)
    grid = table[0, 2:].reshape(3, 4, 5).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[0, 2:], expected[0].permute(1, 2, 0).reshape(48, 5))
    torch.testing.assert_close(out[:, :2], table[:, :2])


def test_constant_table_stays_constant():
    table = torch.full((1, 1 + 16, 3), 0.7)
    torch.testing.assert_close(resample_pos_embed(table, (9, 5)), torch.full((1, 46, 3), 0.7))


def test_non_square_table_needs_its_grid():
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4))


def test_sincos_layout():
    table = sincos_2d_pos_embed((2, 3), 8)
    assert table.shape == (6, 8)
    # token 4 is row 1, column 1; channels: sin x, cos x (2 freqs each), sin y, cos y
    omega = torch.tensor([1.0, 0.01])
    expected = torch.cat(
        [torch.sin(1 * omega), torch.cos(1 * omega), torch.sin(1 * omega), torch.cos(1 * omega)]
    )
    torch.testing.assert_close(table[4], expected)
    torch.testing.assert_close(
        table[2][:4], torch.cat([torch.sin(2 * omega), torch.cos(2 * omega)])
    )
