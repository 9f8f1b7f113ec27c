import torch

from rqvae.data.images import make_grid
from rqvae.eval.figures import coarse_to_fine_grid
from rqvae.models.vae import RQVAE

CFG = dict(image_size=16, in_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
           z_channels=4, embed_dim=4, codebook_size=8, depth=3)


def _model():
    torch.manual_seed(0)
    return RQVAE.from_preset("tiny", **CFG)


def test_grid_rows_are_originals_then_each_depth():
    vae = _model().train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    grid = coarse_to_fine_grid(vae, x)
    assert vae.training  # mode restored
    assert grid.shape == (3, 4 * 18 + 2, 2 * 18 + 2)
    with torch.no_grad():
        vae.eval()
        codes = vae.encode(x)
        rows = [x] + [vae.decode(codes, depth=d).clamp(-1, 1) for d in (1, 2, 3)]
    torch.testing.assert_close(grid, make_grid(torch.cat(rows), nrow=2))
    assert not torch.equal(rows[1], rows[3])  # depth matters, so row order is checked


def test_grid_given_depths_and_one_row_per_image():
    vae = _model().eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    grid = coarse_to_fine_grid(vae, x, [2], one_row_per_image=True)
    assert not vae.training
    assert grid.shape == (3, 3 * 18 + 2, 2 * 18 + 2)
    with torch.no_grad():
        r2 = vae.decode(vae.encode(x), depth=2).clamp(-1, 1)
    torch.testing.assert_close(grid[:, 2 + 18:2 + 18 + 16, 2:18], x[1])
    torch.testing.assert_close(grid[:, 2 + 18:2 + 18 + 16, 20:36], r2[1])
